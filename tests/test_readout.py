"""Per-token SAE feature readout through the OpenAI server, on Model Runner V1 and V2 (issue 14):
exact against transformers, isolated under continuous batching, streamed before ``[DONE]``,
bad input answered 400, and nothing left behind by a client that leaves."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from sae_steer_vllm.readout_api import STATS_PATH, SAEReadoutResponse, readout_from_response
from sae_steer_vllm.spec import SteeringSpec

pytestmark = pytest.mark.server

TOL = 1e-4
"""Absolute below 1, relative above: float32 holds ~7 digits, and a random SAE's activations
on the first token (the attention sink, a huge residual norm) reach the thousands."""


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


WATCH = [3, 5, 7]


def _readout(server: Any, positions: str = "all", top_k: int = 8) -> dict[str, Any]:
    return {
        "saes": [
            {"sae": server.sae_name, "top_k": top_k, "features": WATCH},
            {"sae": server.jumprelu_sae_name, "top_k": top_k, "features": WATCH},
            {"sae": server.topk_sae_name, "top_k": top_k},
        ],
        "positions": positions,
    }


def _post(server: Any, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        server.base_url + route,
        data=json.dumps({"model": server.model, **body}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _complete(
    server: Any, ids: list[int], spec: dict[str, Any] | None, max_tokens: int = 6, **extra: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {"prompt": ids, "max_tokens": max_tokens, "temperature": 0, **extra}
    if spec is not None:
        body["vllm_xargs"] = {"steering": json.dumps(spec)}
    status, out = _post(server, "/completions", body)
    assert status == 200, out
    return out


def _ids(server: Any, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(str(server.model_path))(text)["input_ids"])


def _check_against(got: SAEReadoutResponse, ref: dict[str, Any], ids: list[int]) -> None:
    for name, res in got.saes.items():
        f = ref[name]
        assert res.token_ids == [ids[p] for p in res.positions]
        for row, p in enumerate(res.positions):
            pairs = res.top_k[row]
            want = f[p][f[p] > 0].sort(descending=True).values[: len(pairs) or 8]
            assert len(pairs) == min(8, int((f[p] > 0).sum())), (name, p)
            for (feat, act), w in zip(pairs, want.tolist(), strict=True):
                assert _close(act, float(f[p, feat])), (name, p, feat)
                assert _close(act, w), (name, p, "not the top activations")
            if res.features:
                for j, feat in enumerate(res.features):
                    assert _close(res.watched[row][j], float(f[p, feat]))


def test_readout_matches_transformers(server: Any) -> None:
    """Prompt and generated positions (the prompt prefilled in two chunks on V2), standard /
    JumpReLU / TopK, without and with a clamp on the JumpReLU layer (14): there the readout is
    what the SAE saw before the clamp; layer 18 below it shows the clamp's effect, layer 10
    above it is untouched (within 1e-4, float32)."""
    from helpers.steering import reference_features

    # 70+ tokens: the V2 server prefills it in two chunks (64-token budget)
    ids = _ids(server, "The mitochondria is the powerhouse of the cell, and " * 8)
    assert len(ids) > 64
    saes = {
        server.sae_name: server.sae_path,
        server.jumprelu_sae_name: server.jumprelu_sae_path,
        server.topk_sae_name: server.sae_path.parent / "sae-topk-l10",
    }
    clamp = {"sae": server.jumprelu_sae_name, "feature": 3, "value": 40.0, "mode": "clamp"}
    read: dict[str, SAEReadoutResponse] = {}
    for label, interventions in (("plain", []), ("steered", [clamp])):
        spec = {"interventions": interventions, "readout": _readout(server)}
        out = _complete(server, ids, spec, return_token_ids=True)
        got = readout_from_response(out)
        assert got is not None
        gen = out["choices"][0]["token_ids"]
        full = ids + gen
        want_pos = list(range(len(ids) + len(gen) - 1))
        for res in got.saes.values():
            assert res.positions == want_pos and not res.missing_positions
        steer = SteeringSpec.from_obj({"interventions": interventions}) if interventions else None
        ref = reference_features(str(server.model_path), full, steer, saes, list(saes))
        _check_against(got, ref, full)
        read[label] = got
    # the clamp is downstream of layer 10 and upstream of layer 18 (same prompt prefix)
    plain, steered = read["plain"], read["steered"]
    n = len(ids)
    top10 = server.topk_sae_name
    assert plain.saes[top10].top_k[:n] == steered.saes[top10].top_k[:n]
    a, b = plain.saes[server.sae_name].watched[:n], steered.saes[server.sae_name].watched[:n]
    assert (
        max(abs(x - y) for ra, rb in zip(a, b, strict=True) for x, y in zip(ra, rb, strict=True))
        > 1e-2
    )


def test_readout_streams_before_done_and_hides_token_ids(server: Any) -> None:
    """Chat, streamed: one final chunk carries ``sae_readout`` right before ``data: [DONE]``; it
    equals the non-streamed readout; token ids the client did not ask for stay hidden."""
    spec = {"readout": _readout(server, "generated")}
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 6,
        "temperature": 0,
        "vllm_xargs": {"steering": json.dumps(spec)},
    }
    with httpx.Client(timeout=300) as c:
        events = []
        with c.stream(
            "POST", server.base_url + "/chat/completions", json={**body, "stream": True}
        ) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
        plain = c.post(server.base_url + "/chat/completions", json=body).json()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"] == [] and "sae_readout" in last
    chunks = [json.loads(e) for e in events[:-2]]
    assert all("sae_readout" not in ch for ch in chunks)
    assert all(not ch.get("prompt_token_ids") for ch in chunks)
    assert all(not c.get("token_ids") for ch in chunks for c in ch["choices"])
    assert not plain.get("prompt_token_ids") and not plain["choices"][0].get("token_ids")
    streamed = SAEReadoutResponse.model_validate(last["sae_readout"])
    whole = readout_from_response(plain)
    assert whole is not None and streamed.positions == "generated"
    for name, res in whole.saes.items():
        other = streamed.saes[name]
        assert res.positions == other.positions and res.token_ids == other.token_ids
        assert len(res.positions) == plain["usage"]["completion_tokens"] - 1
        assert all(p >= whole.prompt_tokens for p in res.positions)
        for r1, r2 in zip(res.top_k, other.top_k, strict=True):
            assert [f for f, _ in r1] == [f for f, _ in r2]
            assert all(_close(a, b) for (_, a), (_, b) in zip(r1, r2, strict=True))
        if res.features:
            assert set(res.summary) == {str(f) for f in WATCH}
            s = res.summary[str(WATCH[0])]
            col = [row[0] for row in res.watched]
            assert s.tokens == len(col) and s.max is not None
            assert abs(s.max - max(col)) < TOL and abs(s.mean - sum(col) / len(col)) < TOL  # type: ignore[operator]


async def _many(
    server: Any, jobs: list[tuple[str, dict[str, Any] | None]], tokens: int
) -> list[Any]:
    client = AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)

    async def one(prompt: str, spec: dict[str, Any] | None) -> tuple[list[int], Any]:
        extra: dict[str, Any] = {"ignore_eos": True, "return_token_ids": True}
        if spec is not None:
            extra["vllm_xargs"] = {"steering": json.dumps(spec)}
        r = await client.completions.create(
            model=server.model, prompt=prompt, max_tokens=tokens, temperature=0, extra_body=extra
        )
        return [int(t) for t in r.choices[0].model_extra["token_ids"]], readout_from_response(r)

    try:
        return list(await asyncio.gather(*(one(p, s) for p, s in jobs)))
    finally:
        await client.close()


def _same_readout(a: SAEReadoutResponse, b: SAEReadoutResponse) -> None:
    for name, ra in a.saes.items():
        rb = b.saes[name]
        assert ra.positions == rb.positions and ra.token_ids == rb.token_ids
        for x, y in zip(ra.top_k, rb.top_k, strict=True):
            assert len(x) == len(y)
            assert all(_close(u, v) for (_, u), (_, v) in zip(x, y, strict=True))
        for x, y in zip(ra.watched, rb.watched, strict=True):
            assert all(_close(u, v) for u, v in zip(x, y, strict=True))


def test_readout_isolated_under_continuous_batching(server: Any) -> None:
    """16 concurrent requests mixing readout, steering, both and neither: each readout equals
    its solo run; requests without readout are bit-identical to an all-plain batch (or their
    steered solo run) and carry no readout."""
    steer = [{"sae": server.sae_name, "feature": 3, "value": 80.0, "mode": "clamp"}]
    kinds = [
        None,
        {"readout": _readout(server)},
        {"interventions": steer},
        {"interventions": steer, "readout": _readout(server, "generated", top_k=4)},
    ]
    prompts = [f"Note {i}: the river that runs past house number {i} is" for i in range(16)]
    jobs = [(p, kinds[i % 4]) for i, p in enumerate(prompts)]
    tokens = 8 if server.runner == "v1" else 5
    mixed = asyncio.run(_many(server, jobs, tokens))
    plain = asyncio.run(_many(server, [(p, None) for p in prompts], tokens))
    for i, (p, spec) in enumerate(jobs):
        ids, ro = mixed[i]
        reads = spec is not None and "readout" in spec
        assert (ro is not None) == reads, f"request {i}: readout present = {ro is not None}"
        if spec is None or "interventions" not in spec:
            assert ids == plain[i][0], f"request {i} changed in a mixed batch"
        if spec is not None and (reads or i < 4):
            alone_ids, alone_ro = asyncio.run(_many(server, [(p, spec)], tokens))[0]
            assert ids == alone_ids, f"request {i} differs from running alone"
            if reads:
                _same_readout(ro, alone_ro)


@pytest.mark.parametrize(
    ("case", "body", "needle"),
    [
        ("unknown-sae", {"readout": {"saes": [{"sae": "nope"}]}}, "unknown SAE 'nope'"),
        ("top-k-limit", {"readout": {"saes": [{"sae": "test-sae", "top_k": 65}]}}, "limit of 64"),
        (
            "feature-range",
            {"readout": {"saes": [{"sae": "jr-sae", "features": [256]}]}},
            "out of range",
        ),
        ("nothing", {"readout": {"saes": [{"sae": "test-sae", "top_k": 0}]}}, "nothing to read"),
    ],
    ids=["unknown-sae", "top-k-limit", "feature-range", "nothing"],
)
def test_readout_bad_spec_is_400(server: Any, case: str, body: dict[str, Any], needle: str) -> None:
    status, out = _post(
        server,
        "/completions",
        {"prompt": "Hi", "max_tokens": 1, "vllm_xargs": {"steering": json.dumps(body)}},
    )
    assert status == 400 and needle in out["error"]["message"], out


def test_readout_refused_where_it_cannot_be_read(server: Any) -> None:
    """``n`` > 1, routes whose response is not one completion: 400 naming why; then serving."""
    spec = json.dumps({"readout": {"saes": [{"sae": "test-sae"}]}})
    xargs = {"vllm_xargs": {"steering": spec}}
    status, out = _post(server, "/completions", {"prompt": "Hi", "max_tokens": 1, "n": 2, **xargs})
    assert status == 400 and "'n': 2" in out["error"]["message"]
    msg = [{"role": "user", "content": "Hi"}]
    status, out = _post(server, "/chat/completions/batch", {"messages": [msg], **xargs})
    assert status == 400 and "cannot return a readout" in out["error"]["message"]
    status, out = _post(server, "/completions", {"prompt": ["a", "b"], "max_tokens": 1, **xargs})
    assert status == 400 and "one prompt per request" in out["error"]["message"]
    assert _complete(server, [1, 2, 3], None, max_tokens=1)["choices"]


def _stats(server: Any) -> dict[str, Any]:
    with urllib.request.urlopen(server.root_url + STATS_PATH, timeout=30) as r:
        out: dict[str, Any] = json.loads(r.read())
    return out


def test_readout_client_leaving_mid_stream_leaves_nothing(server: Any) -> None:
    """A client that disconnects mid-stream: its readout entry is freed at once, and the worker
    stops sending for it (vLLM aborts the request, which releases its slot)."""
    spec = {"readout": _readout(server, "generated")}
    body = {
        "model": server.model,
        "prompt": "Count slowly: one, two,",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
        "vllm_xargs": {"steering": json.dumps(spec)},
    }
    with (
        httpx.Client(timeout=300) as c,
        c.stream("POST", server.base_url + "/completions", json=body) as r,
    ):
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 3:
                break
    deadline = time.time() + 60
    while _stats(server)["open"] and time.time() < deadline:
        time.sleep(0.2)
    stats = _stats(server)
    assert stats["open"] == 0 and stats["bytes"] == 0, stats
    # blocks still arrive until vLLM has aborted the request (it notices the disconnect at
    # its next write); then they must stop: the worker released the slot
    last, quiet_since = stats["stale_blocks"], time.time()
    while time.time() - quiet_since < 3:
        assert time.time() < deadline + 60, "the worker kept reading for a gone client"
        time.sleep(0.5)
        now = _stats(server)["stale_blocks"]
        if now != last:
            last, quiet_since = now, time.time()


def test_readme_readout_snippet_runs(steer_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's readout snippet, run verbatim except for the URL and SAE name: the stock
    ``openai`` client exposes ``sae_readout`` in ``model_extra``, ``readout_from_response``
    parses it (prompt and generated positions, the last generated token unread), and the
    streamed request's final chunk carries the same readout."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"<!-- snippet:readout -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README lost its readout snippet"
    code = m.group(1).replace("http://127.0.0.1:8000/v1", steer_server.base_url)
    code = code.replace('"smol"', repr(steer_server.sae_name))
    ns: dict[str, Any] = {}
    exec(compile(code, "README-readout-snippet", "exec"), ns)
    resp, raw, readout = ns["resp"], ns["raw"], ns["readout"]
    assert isinstance(raw, dict) and isinstance(readout, SAEReadoutResponse)
    assert SAEReadoutResponse.model_validate(raw) == readout
    assert readout.prompt_tokens == resp.usage.prompt_tokens
    res = readout.saes[steer_server.sae_name]
    n_gen = resp.usage.completion_tokens
    assert n_gen >= 2 and res.positions == list(range(readout.prompt_tokens + n_gen - 1))
    assert not res.missing_positions and res.features == [123, 456]
    assert all(0 < len(row) <= 3 for row in res.top_k)
    assert set(res.summary) == {"123", "456"} and res.summary["123"].tokens == n_gen - 1
    out = capsys.readouterr().out.splitlines()
    printed = [ln for ln in out if re.match(r"\d+ ['\"]", ln)]  # pos repr(token) top
    assert [int(ln.split()[0]) for ln in printed] == res.positions[readout.prompt_tokens :]
    assert any(ln.startswith("summary: {'123': (") for ln in out)
    streamed = ns["last"].saes[steer_server.sae_name]
    assert out[-1] == f"streamed readout: {len(res.positions)} positions"
    assert streamed.positions == res.positions and streamed.token_ids == res.token_ids
