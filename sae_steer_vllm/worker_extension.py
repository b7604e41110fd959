"""vLLM worker extension: the engine side of ``POST``/``DELETE /v1/saes``.

vLLM's supported way to reach every worker (every tensor-parallel rank) from the API
server is ``--worker-extension-cls`` plus ``engine_client.collective_rpc(method)``:
vLLM mixes this class into its worker class, and a collective RPC calls the named
method on every worker, between model steps. ``sae-steer serve`` passes
``--worker-extension-cls sae_steer_vllm.worker_extension.SAESteerWorkerExtension``
when runtime SAE updates are allowed.

Every method answers a plain :class:`RpcResult` dict and never raises: an exception in
a worker RPC would surface as an engine failure, while a refused registration is an
ordinary answer (HTTP 4xx) for one client.
"""

from __future__ import annotations

import logging
from typing import TypedDict

from .errors import SaeSteerError
from .worker_steering import current_worker_steering

logger = logging.getLogger("sae_steer_vllm")

EXTENSION = "sae_steer_vllm.worker_extension.SAESteerWorkerExtension"
"""The ``--worker-extension-cls`` value (hand-launch path: public API)."""


class RpcResult(TypedDict):
    ok: bool
    error: str


def _no_steering() -> RpcResult:
    return {
        "ok": False,
        "error": "this worker has no steering state (is the model a Steered* class?)",
    }


class SAESteerWorkerExtension:
    """Methods vLLM adds to its worker class; names are prefixed to never clash with it."""

    def sae_steer_register(self, name: str, path: str) -> RpcResult:
        ws = current_worker_steering()
        if ws is None:
            return _no_steering()
        try:
            ws.register_sae(name, path)
        except SaeSteerError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # noqa: BLE001 - never take the engine down for one client
            logger.exception("sae-steer: registering SAE %r failed", name)
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"ok": True, "error": ""}

    def sae_steer_unregister(self, name: str) -> RpcResult:
        ws = current_worker_steering()
        if ws is None:
            return _no_steering()
        if not ws.unregister_sae(name):
            return {"ok": False, "error": f"no SAE named {name!r} on this worker"}
        return {"ok": True, "error": ""}

    def sae_steer_names(self) -> list[str]:
        """The SAE names this worker serves (for consistency checks and tests)."""
        ws = current_worker_steering()
        return [] if ws is None else sorted(ws.catalog.saes)
