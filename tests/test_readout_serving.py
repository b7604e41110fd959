"""Readout under the serving conditions that move tokens around (issue 14): prefill chunked at
256 tokens, preemption (a KV pool of 9 usable 128-token blocks for 8 requests that each need
2), and prefix caching, on a server of its own (Model Runner V1, eager)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.server_metrics import prefix_cache_hits
from helpers.servers import ServerFiles
from openai import AsyncOpenAI

from benchmarks import server_process
from sae_steer_vllm.readout_api import SAEReadoutResponse, readout_from_response
from sae_steer_vllm.serve import small_cpu_env

pytestmark = pytest.mark.server

TOL = 1e-4
SAE = "test-sae"


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


@pytest.fixture(scope="module")
def tight_server(
    default_model: Path, server_files: ServerFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    root = tmp_path_factory.mktemp("tight")
    port = server_process.free_port()
    cmd = [
        sys.executable,
        "-m",
        "sae_steer_vllm.cli",
        "serve",
        "--sae",
        f"{SAE}={server_files.sae}",
    ]
    cmd += ["--readout", "--dtype", "float32", "--enforce-eager", "--seed", "0"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512"]
    cmd += ["--max-num-seqs", "8", "--max-num-batched-tokens", "256"]
    cmd += ["--num-gpu-blocks-override", "10", "--enable-prefix-caching", "--no-self-check"]
    env = small_cpu_env({**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    srv = server_process.launch(cmd, root / "server.log", port=port, env=env, healthy_within=900)
    try:
        yield srv
    finally:
        srv.stop()


FILLER = " ".join(
    f"The lighthouse keeper counted {w} ships, and the harbour master wrote each one down."
    for w in range(40)
)


def _prompt(tokenizer: Any, n: int, start: int = 0) -> list[int]:
    """``n`` token ids of filler text (prompts of 118-125 tokens fill one 128-token KV block
    and need a second within a few generated tokens)."""
    ids: list[int] = tokenizer(FILLER)["input_ids"]
    return ids[start : start + n]


async def _run(
    srv: Any, jobs: list[tuple[str, str]], tokens: int = 24
) -> list[tuple[list[int], Any]]:
    client = AsyncOpenAI(base_url=srv.base_url, api_key="none", max_retries=0, timeout=900)
    model = (await client.models.list()).data[0].id

    async def one(prompt: list[int], positions: str) -> tuple[list[int], Any]:
        spec = {
            "readout": {
                "saes": [{"sae": SAE, "top_k": 8, "features": [3, 5]}],
                "positions": positions,
            }
        }
        r = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=tokens,
            temperature=0,
            extra_body={
                "ignore_eos": True,
                "return_token_ids": True,
                "vllm_xargs": {"steering": json.dumps(spec)},
            },
        )
        ids = [int(t) for t in r.choices[0].model_extra["token_ids"]]
        prompt_ids = [int(t) for t in r.choices[0].model_extra["prompt_token_ids"]]
        return prompt_ids + ids, readout_from_response(r)

    try:
        return list(await asyncio.gather(*(one(p, pos) for p, pos in jobs)))
    finally:
        await client.close()


def _preemptions(srv: Any) -> float:
    text = urllib.request.urlopen(srv.root_url + "/metrics", timeout=30).read().decode()
    return sum(
        float(ln.split()[-1])
        for ln in text.splitlines()
        if ln.startswith("vllm:num_preemptions_total")
    )


def _same(a: SAEReadoutResponse, b: SAEReadoutResponse) -> None:
    ra, rb = a.saes[SAE], b.saes[SAE]
    assert ra.positions == rb.positions and ra.token_ids == rb.token_ids
    assert not ra.missing_positions and not rb.missing_positions
    for x, y in zip(ra.top_k, rb.top_k, strict=True):
        assert [f for f, _ in x] == [f for f, _ in y]
        assert all(_close(u, v) for (_, u), (_, v) in zip(x, y, strict=True))
    for x, y in zip(ra.watched, rb.watched, strict=True):
        assert all(_close(u, v) for u, v in zip(x, y, strict=True))


def _tokenizer(model: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model))


def test_readout_under_preemption(tight_server: Any, default_model: Path) -> None:
    """8 concurrent requests that cannot all fit: some are preempted and recomputed, yet each
    readout lists every position once, in order, equal to its solo run."""
    tok = _tokenizer(default_model)
    jobs = [(_prompt(tok, 118 + i, 5 * i), "all" if i % 2 else "generated") for i in range(8)]
    solo = [asyncio.run(_run(tight_server, [j]))[0] for j in jobs]
    before = _preemptions(tight_server)
    together = asyncio.run(_run(tight_server, jobs))
    assert _preemptions(tight_server) > before, "no request was preempted: the test proves nothing"
    for i, ((ids, ro), (solo_ids, solo_ro)) in enumerate(zip(together, solo, strict=True)):
        assert ids == solo_ids, f"request {i}: tokens differ from its solo run"
        res = ro.saes[SAE]
        first = 0 if jobs[i][1] == "all" else ro.prompt_tokens
        assert res.positions == list(range(first, len(ids) - 1)), f"request {i}: positions"
        _same(ro, solo_ro)


def test_readout_of_a_chunked_prefill_is_exact(
    tight_server: Any, server_files: ServerFiles, default_model: Path
) -> None:
    """A 300-token prompt is prefilled in two chunks (256 + 44): every prompt and generated
    position equals transformers followed by the SAE's encode."""
    from helpers.steering import reference_features

    [(ids, ro)] = asyncio.run(
        _run(tight_server, [(_prompt(_tokenizer(default_model), 300), "all")])
    )
    res = ro.saes[SAE]
    assert res.positions == list(range(len(ids) - 1)) and not res.missing_positions
    ref = reference_features(str(default_model), ids, None, {SAE: server_files.sae}, [SAE])[SAE]
    for row, p in enumerate(res.positions):
        active = ref[p][ref[p] > 0].sort(descending=True).values[:8]
        assert len(res.top_k[row]) == len(active), p
        for (feat, act), want in zip(res.top_k[row], active.tolist(), strict=True):
            assert _close(act, float(ref[p, feat])) and _close(act, want), (p, feat)
        for j, feat in enumerate(res.features):
            assert _close(res.watched[row][j], float(ref[p, feat])), (p, feat)


def test_readout_and_the_prefix_cache(tight_server: Any, default_model: Path) -> None:
    """Generated-only readout shares the prefix cache (its prompt was never read); reading the
    prompt bypasses it, so every prompt position is computed for this request and reported."""
    prompt = _prompt(_tokenizer(default_model), 200, 40)  # one full block can be cached
    [(ids, first)] = asyncio.run(_run(tight_server, [(prompt, "generated")]))
    hits = prefix_cache_hits(tight_server)
    [(ids2, again)] = asyncio.run(_run(tight_server, [(prompt, "generated")]))
    assert prefix_cache_hits(tight_server) > hits, "generated-only readout should reuse the cache"
    assert ids2 == ids
    _same(first, again)
    hits = prefix_cache_hits(tight_server)
    [(ids3, whole)] = asyncio.run(_run(tight_server, [(prompt, "all")]))
    assert prefix_cache_hits(tight_server) == hits, "a prompt readout must not reuse cached KV"
    res = whole.saes[SAE]
    assert ids3 == ids and res.positions == list(range(len(ids) - 1))
    assert not res.missing_positions
    gen = {
        p: row
        for p, row in zip(res.positions, res.watched, strict=True)
        if p >= whole.prompt_tokens
    }
    for p, row in zip(first.saes[SAE].positions, first.saes[SAE].watched, strict=True):
        assert all(_close(u, v) for u, v in zip(row, gen[p], strict=True))
