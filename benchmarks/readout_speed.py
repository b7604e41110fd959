"""Serving cost of the per-token SAE readout vs stock vLLM, on this machine.

The harness of :mod:`benchmarks.plugin_speed` (same flags for both servers, cells
interleaved between them, medians of ``--reps`` rounds, process-tree PSS), with stock
vLLM and ``sae-steer serve --readout`` with one SAE registered. Each cell is a ratio to
stock vLLM at the same concurrency, 16 and 64 concurrent streamed chat requests:

* (0) the readout server, no readout, no steering (goal >= 0.98x);
* (a) readout on every request: one SAE, top 8 features, generated positions (>= 0.90x);
* (b) that readout plus steering (1 layer, 4 clamps, as in plugin_speed) (>= 0.85x);
* (c) half the requests with readout (a).

It also reports the bytes per generated token that the readout adds to a response: the
same requests, non-streaming, without and with readout (a), their raw JSON bodies' length
difference over the generated tokens. Usage (the defaults, 32 tokens x 3 rounds of 10
cells, take about 8-11 minutes on an idle 2-core machine: 1-3 minutes per server start-up,
about 5 of measuring; ``--tokens 128`` as in the README's plugin table takes about 3x longer):

    .venv/bin/python -m benchmarks.readout_speed --out results/readout_speed.json
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from benchmarks.bench_serving import DEFAULT_PROMPTS
from benchmarks.client import merge_extra_body
from benchmarks.plugin_speed import (
    SAE_NAME,
    Cell,
    Harness,
    add_harness_args,
    every_other,
    four_clamps,
    measure_once,
    medians,
    memory_line,
    ratio_table,
    run_interleaved,
    tree_pss_mb,
    warm_up,
)
from benchmarks.server_process import ServerProcess
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.readout_api import RESPONSE_KEY, readout_from_response
from sae_steer_vllm.spec import ReadoutSpec, SAEReadout, SteeringSpec

CONCURRENCY = (16, 64)

ROWS: list[tuple[str, str, float | None]] = [
    ("readout server, no readout, no steering", "readout/none", 0.98),
    ("(a) readout on every request (1 SAE, top-8, generated)", "readout/read", 0.90),
    ("(b) readout + steering (1 layer, 4 clamp) on every request", "readout/read+steer", 0.85),
    ("(c) half the requests with readout", "readout/half", None),
]
"""Table rows: label, cell key (without the concurrency), goal as a ratio to stock."""


def readout_spec(sae: str = SAE_NAME) -> SteeringSpec:
    """Readout alone: one SAE, its top 8 features, at the generated positions."""
    return SteeringSpec(
        readout=ReadoutSpec(saes=[SAEReadout(sae=sae, top_k=8)], positions="generated")
    )


def readout_and_steering(sae: str = SAE_NAME) -> SteeringSpec:
    """The readout of :func:`readout_spec` plus plugin_speed's 4 clamps on the same SAE."""
    return SteeringSpec(
        interventions=four_clamps(sae).interventions, readout=readout_spec(sae).readout
    )


def scenarios(conc: int) -> dict[str, list[SteeringSpec | None]]:
    """The readout server's requests per cell key (see :data:`ROWS`), ``conc`` of them."""
    read = readout_spec()
    return {
        "readout/none": [None] * conc,
        "readout/read": [read] * conc,
        "readout/read+steer": [readout_and_steering()] * conc,
        "readout/half": every_other(read, conc),
    }


def readout_plan(stock: ServerProcess, server: ServerProcess) -> list[Cell]:
    """One round of cells: per concurrency, stock first, then the readout server's cells."""
    plan: list[Cell] = []
    for conc in CONCURRENCY:
        plan.append(Cell(f"stock/none/{conc}", stock, [None] * conc))
        plan += [Cell(f"{k}/{conc}", server, specs) for k, specs in scenarios(conc).items()]
    return plan


def ratios(cells: Mapping[str, float]) -> dict[str, float]:
    """Every readout-server cell as a ratio to stock at the same concurrency."""
    return {
        f"{key}/{conc}": cells[f"{key}/{conc}"] / cells[f"stock/none/{conc}"]
        for _, key, _ in ROWS
        for conc in CONCURRENCY
    }


class ResponseBytes(BaseModel):
    """What the readout adds to non-streaming responses: the same requests without and with."""

    requests: int
    max_tokens: int
    plain_bytes: int
    """Sum of the raw JSON bodies without readout."""
    readout_bytes: int
    """Sum of the raw JSON bodies with readout."""
    generated_tokens: int
    """Sum of ``usage.completion_tokens`` of the readout responses."""
    read_positions: int
    """Positions the readouts report (the last generated token is never read)."""
    same_text: int
    """Pairs whose generated text is identical (so the difference is the readout alone)."""
    bytes_per_token: float


def bytes_per_token(plain: Sequence[int], read: Sequence[int], tokens: Sequence[int]) -> float:
    """(sum of readout bodies - sum of plain bodies) / generated tokens, over paired requests."""
    if not (len(plain) == len(read) == len(tokens)) or not plain:
        raise ValueError("need the same, non-zero number of plain, readout and token counts")
    total = sum(tokens)
    if total <= 0:
        raise ValueError("no generated tokens")
    return (sum(read) - sum(plain)) / total


def chat_body(
    model: str, prompt: str, spec: SteeringSpec | None, max_tokens: int
) -> dict[str, Any]:
    """A non-streaming chat request of exactly ``max_tokens`` (``ignore_eos``), greedy."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **merge_extra_body(spec, {"ignore_eos": True}),
    }


def _text(body: Mapping[str, Any]) -> str:
    return str(body["choices"][0]["message"].get("content") or "")


async def response_bytes(
    base_url: str,
    model: str,
    spec: SteeringSpec,
    *,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_tokens: int,
    timeout_s: float = 600.0,
) -> ResponseBytes:
    """Send every prompt without, then with ``spec`` (a readout), each batch all at once, and
    measure the raw response bodies. Raises when a request fails, a plain response carries a
    readout, or a readout response lacks one: such a pair would measure something else."""
    url = base_url.rstrip("/") + "/chat/completions"
    async with httpx.AsyncClient(timeout=timeout_s) as client:

        async def one(prompt: str, s: SteeringSpec | None) -> tuple[int, dict[str, Any]]:
            r = await client.post(url, json=chat_body(model, prompt, s, max_tokens))
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            return len(r.content), r.json()

        plain = await asyncio.gather(*(one(p, None) for p in prompts))
        read = await asyncio.gather(*(one(p, spec) for p in prompts))
    if any(RESPONSE_KEY in body for _, body in plain):
        raise RuntimeError(f"a response without readout request carries {RESPONSE_KEY!r}")
    readouts = [readout_from_response(body) for _, body in read]
    if any(r is None for r in readouts):
        raise RuntimeError(f"a readout request's response has no {RESPONSE_KEY!r}")
    tokens = [int(body["usage"]["completion_tokens"]) for _, body in read]
    return ResponseBytes(
        requests=len(prompts),
        max_tokens=max_tokens,
        plain_bytes=sum(n for n, _ in plain),
        readout_bytes=sum(n for n, _ in read),
        generated_tokens=sum(tokens),
        read_positions=sum(len(s.positions) for r in readouts if r for s in r.saes.values()),
        same_text=sum(_text(a) == _text(b) for (_, a), (_, b) in zip(plain, read, strict=True)),
        bytes_per_token=bytes_per_token([n for n, _ in plain], [n for n, _ in read], tokens),
    )


def bytes_line(b: ResponseBytes) -> str:
    """The response-size sentence under the table."""
    return (
        f"Response size: the readout (1 SAE, top-8, generated positions) adds "
        f"{b.bytes_per_token:.0f} bytes per generated token to a non-streaming chat completion "
        f"({b.requests} requests of {b.max_tokens} tokens: {b.plain_bytes:,} bytes without, "
        f"{b.readout_bytes:,} with; {b.read_positions} positions read; "
        f"{b.same_text}/{b.requests} pairs generated the same text)."
    )


def readout_table(cells: Mapping[str, float], memory: str, sizes: ResponseBytes) -> str:
    """The README's table (plugin_speed's columns plus a goal column) and its two sentences."""
    rows = [(label, f"{key}/16", f"{key}/64") for label, key, _ in ROWS]
    goals = {label: f"≥ {goal:.2f}" for label, _, goal in ROWS if goal is not None}
    return "\n".join([*ratio_table(rows, cells, goals), "", memory, "", bytes_line(sizes)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_harness_args(ap, out=Path("results/readout_speed.json"), tokens=32, reps=3)
    args = ap.parse_args(argv)
    h = Harness.from_args(args)
    results: dict[str, Any] = {
        "tokens_per_request": args.tokens,
        "reps": args.reps,
        "dtype": args.dtype,
        "extra": args.extra,
        "readout_spec": readout_spec().to_json(),
        "readout_and_steering_spec": readout_and_steering().to_json(),
    }
    with h.serving({"stock": None, "readout": ["--readout"]}) as srv:
        stock, server = srv["stock"], srv["readout"]
        pss = {"stock": [tree_pss_mb(stock.pid)], "readout": [tree_pss_mb(server.pid)]}
        warm_up((stock, server), h.name)
        # and the readout path itself, so no one-time set-up lands in the first round's cells
        measure_once(server.base_url, h.name, [readout_and_steering()] * 16, 16)
        results["samples"] = run_interleaved(
            readout_plan(stock, server), h.name, args.tokens, args.reps
        )
        sizes = asyncio.run(
            response_bytes(server.base_url, h.name, readout_spec(), max_tokens=args.tokens)
        )
        pss["stock"].append(tree_pss_mb(stock.pid))
        pss["readout"].append(tree_pss_mb(server.pid))
    results["cells"] = cells = medians(results["samples"])
    results["ratios"] = ratios(cells)
    results["pss_mb"] = {"at_start": {k: v[0] for k, v in pss.items()}}
    results["pss_mb"]["after_runs"] = {k: v[1] for k, v in pss.items()}
    results["response_bytes"] = sizes.model_dump()
    memory = memory_line(
        "readout server", (pss["stock"][0], pss["stock"][1]), (pss["readout"][0], pss["readout"][1])
    )
    results["table_md"] = readout_table(cells, memory, sizes)
    atomic_write_json(args.out, results, indent=1)
    print(results["table_md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
