"""Admission on every route, without starting vLLM: where a spec is found in any body shape,
which routes admit it, the limits on bodies and specs, the ASGI middleware around a fake
app, and the worker's loud failure path (fuzzing: test_admission_fuzz.py)."""

from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers.admission import LAYERS, D, admit_with, small_catalog, spec_json

from sae_steer_vllm import admission, middleware
from sae_steer_vllm.admission import (
    REQUEST_ID_KEY,
    STEERING_ROUTES,
    AdmissionError,
    find_spec_keys,
    find_spec_keys_in_form,
    parse_json_body,
    route_path,
)
from sae_steer_vllm.sae import random_sae
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError
from sae_steer_vllm.steering_plan import SAECatalog


@pytest.fixture()
def catalog(tmp_path: Path) -> SAECatalog:
    return small_catalog(tmp_path / "sae")


# ---------------------------------------------------------------- finding a spec anywhere
BODIES: list[tuple[str, Any, list[tuple[Any, ...]]]] = [
    ("none", {"model": "m", "messages": [{"role": "user", "content": "steering"}]}, []),
    ("vllm_xargs", {"vllm_xargs": {"steering": "x"}}, [("vllm_xargs", "steering")]),
    ("top level", {"steering": "x"}, [("steering",)]),
    (
        "sampling_params.extra_args",
        {"sampling_params": {"extra_args": {"steering": {}}}},
        [("sampling_params", "extra_args", "steering")],
    ),
    (
        "inside a list",
        {"requests": [{}, {"vllm_xargs": {"steering": "x"}}]},
        [("requests", 1, "vllm_xargs", "steering")],
    ),
    (
        "kv_transfer_params",
        {"kv_transfer_params": {"steering": 1}},
        [("kv_transfer_params", "steering")],
    ),
    ("top-level list", [{"steering": None}], [(0, "steering")]),
    ("two places", {"steering": 1, "a": {"steering": 2}}, [("a", "steering"), ("steering",)]),
]


@pytest.mark.parametrize(("case", "body", "paths"), BODIES, ids=[b[0] for b in BODIES])
def test_spec_keys_are_found_in_every_body_shape(case: str, body: Any, paths: list) -> None:
    assert find_spec_keys(body) == paths


def test_form_fields_with_a_spec_are_found() -> None:
    assert find_spec_keys_in_form([("model", "m"), ("file", None)]) == []
    assert find_spec_keys_in_form([("steering", "{}")]) == [("steering",)]
    xargs = json.dumps({"steering": spec_json()})
    assert find_spec_keys_in_form([("vllm_xargs", xargs)]) == [("vllm_xargs", "steering")]
    assert find_spec_keys_in_form([("prompt", "[not json")]) == []


def test_deep_bodies_are_refused_not_crashed() -> None:
    with pytest.raises(AdmissionError, match="nested deeper"):
        parse_json_body(b"[" * 200_000 + b"]" * 200_000)
    ok, deep = parse_json_body(b"[" * 500 + b"]" * 500)
    assert ok
    with pytest.raises(AdmissionError, match="nested deeper"):
        find_spec_keys(deep)
    assert parse_json_body(b"\xff\xfe{") == (False, None)
    assert parse_json_body(b"") == (False, None)


def test_route_path_strips_root_path() -> None:
    assert route_path("/api/v1/messages", "/api") == "/v1/messages"
    assert route_path("/apiv1/messages", "/api") == "/apiv1/messages"
    assert route_path("/v1/messages") == "/v1/messages"


# ---------------------------------------------------------------- the decision
@pytest.mark.parametrize("route", STEERING_ROUTES, ids=[r.path for r in STEERING_ROUTES])
def test_each_steering_route_validates_canonicalizes_and_salts(
    catalog: SAECatalog, route: admission.SteeringRoute
) -> None:
    def body(spec: Any, **extra: Any) -> dict[str, Any]:
        data: dict[str, Any] = {"model": "m", **extra}
        holder = data
        for key in route.spec_at[:-1]:
            holder = holder.setdefault(key, {})
        holder[route.spec_at[-1]] = spec
        return data

    data = body(json.loads(spec_json()))  # an object is accepted and forwarded as a string
    spec = admit_with(catalog, route.method, route.path, data)
    assert spec is not None and not spec.is_noop
    holder = data
    for key in route.spec_at[:-1]:
        holder = holder[key]
    assert holder["steering"] == spec.to_json() and holder[REQUEST_ID_KEY] == "req-1"
    assert data["cache_salt"] == spec.cache_salt()
    tenant = body(spec_json(), cache_salt="tenant-a")
    admit_with(catalog, route.method, route.path, tenant)
    assert tenant["cache_salt"] not in ("tenant-a", spec.cache_salt())
    assert len(tenant["cache_salt"]) <= 128 and "/" not in tenant["cache_salt"]
    with pytest.raises(AdmissionError, match="unknown SAE 'nope'") as e:
        admit_with(catalog, route.method, route.path, body(spec_json(sae="nope")))
    assert e.value.status == 400 and e.value.param == route.where
    with pytest.raises(AdmissionError, match="only at"):
        admit_with(catalog, route.method, route.path, {**body(spec_json()), "x": {"steering": "y"}})
    noop = body(json.dumps({"interventions": []}))
    assert admit_with(catalog, route.method, route.path, noop) is not None
    assert "cache_salt" not in noop


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/messages/count_tokens"),
        ("POST", "/v1/chat/completions/render"),
        ("POST", "/tokenize"),
        ("POST", "/invocations"),
        ("POST", "/v1/audio/transcriptions"),
        ("POST", "/v2/some/future/route"),
        ("GET", "/v1/chat/completions"),
        ("POST", "/v1/chat/completions/"),
    ],
)
def test_other_routes_refuse_a_spec_and_name_the_supported_ones(
    catalog: SAECatalog, method: str, path: str
) -> None:
    data = {"vllm_xargs": {"steering": spec_json()}}
    with pytest.raises(AdmissionError) as e:
        admit_with(catalog, method, path, data)
    assert e.value.status == 400
    assert "/v1/messages" in str(e.value) and "/inference/v1/generate" in str(e.value)
    assert admit_with(catalog, method, path, {"model": "m"}) is None  # no spec: untouched


def test_spec_size_limit(catalog: SAECatalog) -> None:
    big = {"interventions": [{"layer": 1, "vector": [0.5] * 2000}]}  # > 4096 bytes
    with pytest.raises(AdmissionError, match="max_spec_bytes"):
        admit_with(
            catalog, "POST", "/v1/completions", {"vllm_xargs": {"steering": json.dumps(big)}}
        )
    with pytest.raises(AdmissionError, match="max_spec_bytes"):
        admit_with(catalog, "POST", "/v1/completions", {"vllm_xargs": {"steering": big}})
    deep = "[" * 200_000 + "]" * 200_000
    with pytest.raises(SteeringSpecError, match="nested deeper"):
        SteeringSpec.from_json(deep, max_bytes=None)


def test_the_route_table_matches_vllm() -> None:
    """Every admitted route exists in the installed vLLM, and its request model carries
    ``cache_salt`` (and ``vllm_xargs`` where the spec travels there)."""
    import importlib
    import pkgutil

    import vllm.entrypoints as ep
    from fastapi.routing import APIRoute

    registered: set[tuple[str, str]] = set()
    for info in pkgutil.walk_packages(ep.__path__, ep.__name__ + "."):
        if info.name.endswith(".api_router"):
            try:
                mod = importlib.import_module(info.name)
            except ImportError:  # optional SDKs (cohere)
                continue
            for r in getattr(mod, "router", SimpleNamespace(routes=[])).routes:
                if isinstance(r, APIRoute):
                    registered |= {(m, r.path) for m in r.methods}
    for route in STEERING_ROUTES:
        assert (route.method, route.path) in registered, route
    from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
    from vllm.entrypoints.openai.chat_completion.protocol import (
        BatchChatCompletionRequest,
        ChatCompletionRequest,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.openai.responses.protocol import ResponsesRequest
    from vllm.entrypoints.scale_out.token_in_token_out.protocol import GenerateRequest

    for model in (ChatCompletionRequest, CompletionRequest, ResponsesRequest):
        assert {"vllm_xargs", "cache_salt"} <= set(model.model_fields), model
    assert {"vllm_xargs", "cache_salt"} <= set(AnthropicMessagesRequest.model_fields)
    assert {"sampling_params", "cache_salt"} <= set(GenerateRequest.model_fields)
    conv = [{"role": "user", "content": "hi"}]
    batch = BatchChatCompletionRequest.model_validate(
        {"messages": [conv], "vllm_xargs": {"steering": "x"}, "cache_salt": "salt"}
    )
    one = batch.to_chat_completion_request(conv)  # type: ignore[arg-type]
    assert one.vllm_xargs == {"steering": "x"} and one.cache_salt == "salt"


def test_admission_imports_without_vllm() -> None:
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import sae_steer_vllm.admission, sae_steer_vllm.spec\nprint('ok')"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "ok", r.stderr[-2000:]


# ---------------------------------------------------------------- the ASGI middleware
def _run(
    mw_catalog: SAECatalog | None,
    body: bytes,
    *,
    path: str = "/v1/chat/completions",
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: int = 1,
    cpu: bool = False,
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[int, dict[str, Any], list[Any]]:
    """(status, JSON answer, what the inner app received) for one request."""
    monkeypatch.setattr(middleware, "_is_cpu_backend", lambda: cpu)
    seen: list[Any] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        msg = await receive()
        seen.append((scope, msg["body"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b'{"ok": true}'})

    state = SimpleNamespace()
    if mw_catalog is not None:
        state.sae_steer_catalog = mw_catalog
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers if headers is not None else [(b"content-type", b"application/json")],
        "app": SimpleNamespace(state=state),
    }
    step = -(-len(body) // chunks) or 1
    parts = [body[i : i + step] for i in range(0, len(body), step)] or [b""]
    msgs = [
        {"type": "http.request", "body": p, "more_body": i < len(parts) - 1}
        for i, p in enumerate(parts)
    ]
    out: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return msgs.pop(0) if msgs else {"type": "http.disconnect"}

    async def send(msg: dict[str, Any]) -> None:
        out.append(msg)

    asyncio.run(middleware.SteeringMiddleware(inner)(scope, receive, send))
    status = out[0]["status"]
    return status, json.loads(out[1]["body"]), seen


def test_middleware_forwards_unsteered_bodies_byte_for_byte(
    catalog: SAECatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = b'{"model": "m",   "messages": [], "cache_salt": "x"}'
    hdrs = [(b"content-type", b"application/json"), (b"content-length", b"999")]
    status, _, seen = _run(catalog, raw, headers=hdrs, chunks=3, monkeypatch=monkeypatch)
    assert status == 200 and seen[0][1] == raw and seen[0][0]["headers"] == hdrs


def test_middleware_admits_rewrites_and_names_the_request(
    catalog: SAECatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    raw = json.dumps({"model": "m", "vllm_xargs": {"steering": spec_json()}}).encode()
    status, _, seen = _run(catalog, raw, path="/v1/messages", monkeypatch=monkeypatch)
    scope, body = seen[0]
    data = json.loads(body)
    headers = dict(scope["headers"])
    assert status == 200 and int(headers[b"content-length"]) == len(body)
    assert data["cache_salt"].startswith("steer-")
    assert headers[b"x-request-id"].decode() == data["vllm_xargs"][REQUEST_ID_KEY]
    given_id = [(b"content-type", b"application/json"), (b"x-request-id", b"mine")]
    _, _, seen = _run(catalog, raw, headers=given_id, monkeypatch=monkeypatch)
    assert json.loads(seen[0][1])["vllm_xargs"][REQUEST_ID_KEY] == "mine"


def test_middleware_refusals(catalog: SAECatalog, monkeypatch: pytest.MonkeyPatch) -> None:
    spec_body = json.dumps({"vllm_xargs": {"steering": spec_json()}}).encode()
    status, out, seen = _run(catalog, spec_body, path="/tokenize", monkeypatch=monkeypatch)
    assert status == 400 and "accepted only by" in out["error"]["message"] and not seen
    deep = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    assert _run(catalog, deep, monkeypatch=monkeypatch)[0] == 400
    huge = b" " * (catalog.limits.max_body_bytes + 1)
    status, out, seen = _run(catalog, huge, chunks=4, monkeypatch=monkeypatch)
    assert status == 413 and "max_body_bytes" in out["error"]["message"] and not seen
    claimed = [(b"content-length", str(1 << 40).encode())]
    assert _run(catalog, b"{}", headers=claimed, monkeypatch=monkeypatch)[0] == 413
    seeded = json.dumps({"model": "m", "seed": 3}).encode()
    assert _run(catalog, seeded, cpu=True, monkeypatch=monkeypatch)[0] == 400
    assert _run(catalog, seeded, cpu=False, monkeypatch=monkeypatch)[0] == 200
    gen_seed = json.dumps({"sampling_params": {"seed": 1}}).encode()
    assert _run(catalog, gen_seed, path="/x", cpu=True, monkeypatch=monkeypatch)[0] == 400
    # no catalog: unsteered traffic flows, a spec is the server's fault (503)
    assert _run(None, seeded, monkeypatch=monkeypatch)[0] == 200
    assert _run(None, spec_body, monkeypatch=monkeypatch)[0] == 503


def test_middleware_refuses_a_spec_in_a_form(
    catalog: SAECatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    xargs = json.dumps({"steering": spec_json()})
    boundary = "b0undary"
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="model"\r\n\r\nm\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="vllm_xargs"\r\n\r\n{xargs}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\nRIFF\r\n--{boundary}--\r\n"
    ).encode()
    mp = [(b"content-type", f"multipart/form-data; boundary={boundary}".encode())]
    status, out, _ = _run(
        catalog, form, path="/v1/audio/transcriptions", headers=mp, monkeypatch=monkeypatch
    )
    assert status == 400 and out["error"]["param"] == "vllm_xargs.steering"
    from urllib.parse import urlencode

    url = [(b"content-type", b"application/x-www-form-urlencoded")]
    # a JSON string that is also a form with a clean vllm_xargs field
    encoded = json.dumps("x&" + urlencode({"vllm_xargs": xargs}) + "&y=").encode()
    assert _run(catalog, encoded, headers=url, monkeypatch=monkeypatch)[0] == 400
    plain = urlencode({"model": "m", "prompt": "steering wheel"}).encode()
    assert _run(catalog, plain, headers=url, monkeypatch=monkeypatch)[0] == 200


# ---------------------------------------------------------------- the worker's failure path
def _worker(tmp_path: Path) -> Any:
    from sae_steer_vllm.worker_steering import WorkerSteering

    random_sae(tmp_path / "wsae", d_in=D, d_sae=32, layer=1)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(
            hf_config=SimpleNamespace(hidden_size=D, num_hidden_layers=LAYERS)
        ),
        scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=32),
        additional_config={"sae_steer": {"saes": {"s": str(tmp_path / "wsae")}}},
    )
    return WorkerSteering(cfg)


def test_a_spec_failing_in_the_worker_is_loud_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = _worker(tmp_path)
    good = SimpleNamespace(extra_args={"steering": spec_json()})
    assert ws.plan_for(good) is ws.plan_for(good) is not None  # cached
    admitted = SimpleNamespace(
        extra_args={"steering": spec_json(sae="gone"), REQUEST_ID_KEY: "r-7"}
    )
    with caplog.at_level(logging.ERROR, logger="sae_steer_vllm"):
        for _ in range(2):  # every time, not once per spec
            assert ws.plan_for(admitted) is None
        deep = SimpleNamespace(extra_args={"steering": "[" * 99_999 + "]" * 99_999})
        assert ws.plan_for(deep, "v2-id") is None
        assert ws.plan_for(SimpleNamespace(extra_args=["not", "a", "dict"])) is None
    assert ws.plan_failures.admitted == 2 and ws.plan_failures.unadmitted == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert sum("r-7" in m and "ADMITTED" in m for m in errors) == 2
    assert any("v2-id" in m and "nested deeper" in m for m in errors)
