"""The API server's one view of its SAEs, shared by admission and the ``/v1/saes`` routes.

Admission (:class:`~sae_steer_vllm.middleware.SteeringMiddleware`) checks every spec
against a catalog, and the management routes (:mod:`sae_steer_vllm.sae_routes`) change
that catalog at runtime; both must see the same object, so it lives on the FastAPI app's
``state`` (:func:`api_server_catalog`), created by whichever of them needs it first.

:class:`ServerSAEs` (also on the app's state) counts, per SAE, the admitted requests that
are still running (from admission until their response has been sent):
``DELETE /v1/saes/{name}`` is refused while the count is not zero. Everything here runs
on the API server's event loop, so an admission check and the lease that follows it
happen without an ``await`` in between and cannot interleave with a deletion.

Imports neither torch nor vLLM.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .plugin_config import PluginConfigError
from .spec import FeatureIntervention, SteeringSpec
from .steering_plan import SAECatalog

CATALOG_STATE = "sae_steer_catalog"
"""Attribute of the FastAPI app's ``state`` holding the API server's :class:`SAECatalog`:
one per API server, shared by everything in it that needs the registered SAEs."""
REGISTRY_STATE = "sae_steer_registry"
"""Attribute of the app's ``state`` holding the :class:`ServerSAEs`."""
ADMITTED_SPEC = "sae_steer.admitted_spec"
"""ASGI scope key where admission leaves the spec it admitted, for :func:`hold_saes`."""


def api_server_catalog(state: Any) -> SAECatalog:
    """The API server's catalog, loaded on first use from the ``vllm_config`` vLLM puts on
    the app's state. Raises :class:`PluginConfigError` when it cannot be loaded."""
    catalog = getattr(state, CATALOG_STATE, None)
    if catalog is None:
        vllm_config = getattr(state, "vllm_config", None)
        if vllm_config is None:
            raise PluginConfigError("vLLM config not available to the middleware")
        catalog = SAECatalog.from_vllm_config(vllm_config)
        setattr(state, CATALOG_STATE, catalog)
    return catalog


class ServerSAEs:
    """Requests in flight per SAE, and the lock serialising registry updates."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.in_use: Counter[str] = Counter()
        self._lock: asyncio.Lock | None = None

    @property
    def catalog(self) -> SAECatalog:
        return api_server_catalog(self.state)

    @property
    def vllm_config(self) -> Any:
        return getattr(self.state, "vllm_config", None)

    @property
    def update_lock(self) -> asyncio.Lock:
        """One registry update at a time (created on the server's loop when first needed)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @contextmanager
    def lease(self, spec: SteeringSpec | None) -> Iterator[None]:
        """Mark the SAEs ``spec`` names as in use for the duration of the ``with`` block."""
        names = spec_sae_names(spec)
        self.in_use.update(names)
        try:
            yield
        finally:
            self.in_use.subtract(names)
            for n in names:
                if self.in_use[n] <= 0:
                    del self.in_use[n]


def spec_sae_names(spec: SteeringSpec | None) -> set[str]:
    if spec is None:
        return set()
    names = {iv.sae for iv in spec.interventions if isinstance(iv, FeatureIntervention)}
    if spec.readout is not None:
        names.update(r.sae for r in spec.readout.saes)
    return names


def server_saes(scope: dict[str, Any]) -> ServerSAEs:
    """The app's :class:`ServerSAEs` (created on first use). Raises
    :class:`PluginConfigError` when the app has no state (not vLLM's API server)."""
    state = getattr(scope.get("app"), "state", None)
    if state is None:
        raise PluginConfigError("no app state: not running inside vLLM's API server")
    existing = getattr(state, REGISTRY_STATE, None)
    if isinstance(existing, ServerSAEs):
        return existing
    made = ServerSAEs(state)
    setattr(state, REGISTRY_STATE, made)
    return made


@contextmanager
def hold_saes(scope: dict[str, Any], spec: SteeringSpec | None) -> Iterator[None]:
    """Around the call into the rest of the app: the admitted ``spec``'s SAEs stay in use
    (``DELETE`` answers 409) until the response has been sent. Enter it right after the
    admission check, with no ``await`` in between."""
    if spec is None or not spec_sae_names(spec):
        yield
        return
    with server_saes(scope).lease(spec):
        yield
