"""``/v1/saes`` in vLLM's API server: list SAEs, and register or remove them at runtime.

* ``GET /v1/saes``: :class:`~sae_steer_vllm.sae_api.SAEList` (names, layers, sizes,
  accepted modes and positions, whether ``strength`` works, the server's limits).
* ``POST /v1/saes`` ``{"name", "path" | "hf"}`` and ``DELETE /v1/saes/{name}``: only with
  ``--allow-runtime-sae-updates`` (off by default, like vLLM's runtime LoRA updating).
  ``path`` is resolved under ``--sae-root`` and must stay inside it; ``hf`` is
  ``repo_id[/subfolder][@revision]`` fetched through huggingface_hub's cache
  (:mod:`sae_steer_vllm.sae.hub`, ``HF_HUB_OFFLINE`` respected). The folder is checked by the same function as at start-up, first here,
  then in every worker through vLLM's collective RPC (the worker extension), and only
  then admitted by the middleware. A name used by a running request cannot be removed
  (409) until that request has finished.

Why an ASGI middleware rather than a ``vllm.endpoint_plugins`` entry point: endpoint
plugins load only when named in ``VLLM_PLUGINS``, an allowlist that also filters the
``general_plugins`` the model classes are registered by, so every deployment would
need an extra environment variable; a middleware is one more ``--middleware`` flag,
as the admission middleware already is. Installed after vLLM's own middlewares it
runs before them, so it applies vLLM's ``--api-key`` check itself (vLLM's own
``AuthenticationMiddleware``, same tokens). Every error is a JSON 4xx (503 when the
engine cannot be reached), never a 500.

Install with ``--middleware sae_steer_vllm.sae_routes.SAERoutes`` (``sae-steer serve`` does).
"""

from __future__ import annotations

import asyncio
import importlib
import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from .errors import SaeSteerError
from .plugin_config import PluginConfigError
from .sae_api import SAES_PATH, RegisterSAE, SAEEntry
from .server_saes import ServerSAEs, server_saes
from .steering_plan import SAEInfo
from .worker_extension import EXTENSION, SAESteerWorkerExtension

logger = logging.getLogger("sae_steer_vllm")

Scope = dict[str, Any]

MAX_BODY = 64 * 1024
"""A registration request is a name and a path: anything larger is refused (413)."""
RPC_TIMEOUT_S = 300.0


class RouteError(Exception):
    """An answer other than 200: status and message (JSON, OpenAI's error shape)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SAERoutes:
    """ASGI middleware answering ``/v1/saes`` and ``/v1/saes/{name}``; everything else passes."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not _is_ours(_path(scope)):
            await self.app(scope, receive, send)
            return
        tokens = _api_tokens(scope)
        if tokens:
            from vllm.entrypoints.serve.middleware.authenticate import AuthenticationMiddleware

            guarded = AuthenticationMiddleware(self._handle, tokens=tokens)  # type: ignore[arg-type]
            await guarded(scope, receive, send)
        else:
            await self._handle(scope, receive, send)

    async def _handle(self, scope: Scope, receive: Any, send: Any) -> None:
        try:
            status, payload = await self._route(scope, receive)
        except RouteError as e:
            status, payload = e.status, _error(e.status, e.message)
        except PluginConfigError as e:
            status, payload = 503, _error(503, f"steering is not available on this server: {e}")
        await _send_json(send, status, payload)

    async def _route(self, scope: Scope, receive: Any) -> tuple[int, Any]:
        path, method = _path(scope), scope.get("method", "GET")
        if path.rstrip("/") == SAES_PATH:
            if method == "GET":
                return 200, server_saes(scope).catalog.listing().model_dump(mode="json")
            if method == "POST":
                return 200, await self._register(scope, await _read_body(receive))
            raise RouteError(405, f"{SAES_PATH} accepts GET and POST")
        name = path[len(SAES_PATH) + 1 :]
        if method == "GET":
            entry = server_saes(scope).catalog.listing().by_name().get(name)
            if entry is None:
                raise RouteError(404, f"no SAE named {name!r}")
            return 200, entry.model_dump(mode="json")
        if method == "DELETE":
            return 200, await self._delete(scope, name)
        raise RouteError(405, f"{SAES_PATH}/{{name}} accepts GET and DELETE")

    # ------------------------------------------------------------------ POST
    async def _register(self, scope: Scope, body: bytes) -> dict[str, Any]:
        saes = server_saes(scope)
        engine = _updatable(scope, saes)
        try:
            req = RegisterSAE.model_validate_json(body)
        except ValidationError as e:
            raise RouteError(400, "POST /v1/saes: " + _describe(e)) from None
        cat = saes.catalog
        async with saes.update_lock:
            if req.name in cat.saes:
                raise RouteError(409, f"an SAE named {req.name!r} is already registered")
            root = cat.limits.sae_root
            if req.path is not None:
                folder = resolve_under_root(root, req.path)
            else:
                assert req.hf is not None
                folder = await asyncio.to_thread(hf_folder, req.hf)
            try:
                info = await asyncio.to_thread(cat.read_runtime_sae, req.name, folder)
            except PluginConfigError as e:
                raise RouteError(400, _hide_root(str(e), root)) from None
            results = await _rpc(engine, "sae_steer_register", req.name, str(folder))
            failed = [r.get("error", "?") for r in results if not r.get("ok")]
            if failed:
                await _rpc(engine, "sae_steer_unregister", req.name)  # roll back the others
                raise RouteError(400, _hide_root(failed[0], root))
            cat.add(info)
        logger.info("sae-steer: registered SAE %r (layer %d)", req.name, info.cfg.hook_layer)
        return _entry(saes, info)

    # ------------------------------------------------------------------ DELETE
    async def _delete(self, scope: Scope, name: str) -> dict[str, Any]:
        saes = server_saes(scope)
        engine = _updatable(scope, saes)
        cat = saes.catalog
        async with saes.update_lock:
            if name not in cat.saes:
                raise RouteError(404, f"no SAE named {name!r}")
            running = saes.in_use.get(name, 0)
            if running:
                raise RouteError(
                    409,
                    f"SAE {name!r} is in use by {running} running request(s); "
                    "retry when they have finished",
                )
            cat.remove(name)  # no await since the check: nothing was admitted in between
            results = await _rpc(engine, "sae_steer_unregister", name)
        failed = [r.get("error", "?") for r in results if not r.get("ok")]
        if failed:  # no longer admitted either way; say what the workers answered
            logger.error("sae-steer: removing SAE %r: a worker answered %s", name, failed[0])
        logger.info("sae-steer: removed SAE %r", name)
        return {"object": "sae.deleted", "name": name, "deleted": True}


# ---------------------------------------------------------------------- checks
def _updatable(scope: Scope, saes: ServerSAEs) -> Any:
    """The engine client, if this server may change its SAEs at runtime (else a 403)."""
    cat = saes.catalog
    if not cat.limits.allow_runtime_sae_updates:
        raise RouteError(
            403,
            "runtime SAE updates are off on this server (start it with "
            "--allow-runtime-sae-updates); GET /v1/saes lists what it serves",
        )
    vc = saes.vllm_config
    par = getattr(vc, "parallel_config", None)
    if not _extension_installed(getattr(par, "worker_extension_cls", "")):
        raise RouteError(
            403,
            f"runtime SAE updates need the worker extension: --worker-extension-cls {EXTENSION}",
        )
    if int(getattr(par, "_api_process_count", 1) or 1) > 1:
        raise RouteError(
            403,
            "runtime SAE updates need one API server process (--api-server-count 1): each "
            "process admits requests against its own SAE list",
        )
    if int(getattr(par, "data_parallel_size", 1) or 1) > 1:
        raise RouteError(403, "runtime SAE updates are not supported with data parallelism")
    state = getattr(scope.get("app"), "state", None)
    engine = getattr(state, "engine_client", None)
    if engine is None:
        raise RouteError(503, "the engine is not available")
    return engine


def _extension_installed(qualname: str) -> bool:
    if not qualname:
        return False
    module, _, name = qualname.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, SAESteerWorkerExtension)


def resolve_under_root(root: str | None, rel: str) -> Path:
    """``root / rel`` if it stays inside ``root`` after resolving ``..`` and symlinks.

    Clients never name server paths: absolute paths, ``~`` and anything that resolves
    outside the operator's ``--sae-root`` are refused (400).
    """
    if root is None:
        raise RouteError(
            400, "this server has no --sae-root, so it registers no folder 'path'; ask its operator"
        )
    if "\x00" in rel or rel.startswith(("/", "\\", "~")) or Path(rel).is_absolute():
        raise RouteError(400, "'path' must be relative to the server's --sae-root")
    base = Path(root).resolve()
    full = (base / rel).resolve()
    if full != base and base not in full.parents:
        raise RouteError(400, "'path' resolves outside the server's --sae-root; refused")
    return full


def hf_folder(hf: str) -> Path:
    """The local folder of ``repo_id[/subfolder][@revision]`` (``hf:`` optional) from
    huggingface_hub's cache, through the one resolver every entry point uses
    (:mod:`sae_steer_vllm.sae.hub`: only the SAE files, ``HF_HUB_OFFLINE`` respected)."""
    from .sae.hub import HF_PREFIX, hub_folder, parse_hub_address

    try:
        address = parse_hub_address(hf if hf.startswith(HF_PREFIX) else HF_PREFIX + hf)
        return hub_folder(address)
    except SaeSteerError as e:  # bad syntax, offline misses, 404s: all a 400
        raise RouteError(400, f"'hf': {e}"[:1000]) from None


def _hide_root(message: str, root: str | None) -> str:
    """Error messages name files relative to the root (or the Hub cache), never where
    those are on the server."""
    if root:
        message = message.replace(str(Path(root).resolve()), "<sae-root>")
    try:
        from huggingface_hub import constants

        hub = str(Path(constants.HF_HUB_CACHE).expanduser().resolve())
    except Exception:  # noqa: BLE001 - no huggingface_hub: nothing of it to hide
        return message
    return message.replace(hub, "<hf-cache>")


# ---------------------------------------------------------------------- plumbing
async def _rpc(engine: Any, method: str, *args: Any) -> list[dict[str, Any]]:
    try:
        out = await engine.collective_rpc(method, timeout=RPC_TIMEOUT_S, args=args)
    except Exception as e:  # noqa: BLE001 - a dead or misconfigured engine: 503, not 500
        logger.exception("sae-steer: collective_rpc %s failed", method)
        msg = f"the engine did not answer {method}: {type(e).__name__}: {e}"
        raise RouteError(503, msg) from None
    results = list(out) if isinstance(out, (list, tuple)) else [out]
    return [r if isinstance(r, dict) else {"ok": False, "error": repr(r)} for r in results]


def _entry(saes: ServerSAEs, info: SAEInfo) -> dict[str, Any]:
    entry: SAEEntry = saes.catalog.listing().by_name()[info.name]
    return entry.model_dump(mode="json")


def _path(scope: Scope) -> str:
    path = str(scope.get("path", ""))
    root = str(scope.get("root_path", "") or "")
    return path.removeprefix(root) if root else path


def _is_ours(path: str) -> bool:
    return path.rstrip("/") == SAES_PATH or path.startswith(SAES_PATH + "/")


def _api_tokens(scope: Scope) -> list[str]:
    """The tokens vLLM guards ``/v1`` with (``--api-key``, else ``VLLM_API_KEY``)."""
    args = getattr(getattr(scope.get("app"), "state", None), "args", None)
    keys = list(getattr(args, "api_key", None) or [])
    if not keys:
        from vllm import envs

        keys = [envs.VLLM_API_KEY] if envs.VLLM_API_KEY else []
    return [k for k in keys if k]


async def _read_body(receive: Any) -> bytes:
    body = b""
    more = True
    while more:
        msg = await receive()
        if msg.get("type") == "http.disconnect":
            raise RouteError(400, "client disconnected")
        body += msg.get("body", b"")
        if len(body) > MAX_BODY:
            raise RouteError(413, f"request body over {MAX_BODY} bytes")
        more = msg.get("more_body", False)
    return body


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def _error(status: int, message: str) -> dict[str, Any]:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError"}
    kinds |= {404: "NotFoundError", 409: "ConflictError", 413: "RequestTooLargeError"}
    return {
        "error": {
            "message": message,
            "type": kinds.get(status, "ServiceUnavailableError"),
            "param": None,
            "code": status,
        }
    }


async def _send_json(send: Any, status: int, payload: Any) -> None:
    data = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": data, "more_body": False})
