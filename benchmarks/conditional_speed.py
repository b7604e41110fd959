"""Serving cost of conditional steering: think-phase positions and feature conditions.

The harness of :mod:`benchmarks.plugin_speed` (same vLLM flags, one random 16x SAE at layer
18, medians of ``--reps`` rounds), with one ``sae-steer serve`` started with
``--think-start-marker ""`` (the reasoning starts with the first generated token) and
``--think-end-marker .``. Every request of a cell carries the same spec; 16 and 64
concurrent streamed chat requests of exactly ``--tokens`` tokens:

* ``none``: no steering (context);
* ``plain``: 2 clamps (features 0 and 1, value 4.0) at every position, the baseline;
* ``thinking``: the same 2 clamps, the request's positions ``thinking`` (goal >= 0.95x plain);
* ``thinking_each``: the same, but each intervention carries ``positions: "thinking"`` (the
  per-intervention gate rather than the request's scope);
* ``when``: the same 2 clamps, the first only where feature 2 is above 0.5, the second only
  where feature 3 is below 0.5: 2 conditions on features of the same SAE (goal >= 0.95x plain).

All cells run on one server; the order of the cells within a round is reversed every other
round, so drift in machine load does not favour the arms that run first.

Why ``.`` ends the reasoning: SmolLM2-135M-Instruct, the default model, has no
``<think>``/``</think>``; ``.`` is one token of its tokenizer (id 30) and its greedy answers
to the benchmark's prompts end their first sentence 1-32 generated tokens in (median about
20; measured with transformers), so within 64 tokens nearly every request has a thinking
span *and* an answer, and requests change phase in the middle of decoding while others in
the batch are still thinking. A newline (id 198) first comes 16-93 tokens in, so most 64-token
requests would never leave the thinking phase. After the rounds, a phase check sends each
prompt once more with the thinking spec, non-streamed with ``return_token_ids``, and reports
where the end marker fell. Usage (1-3 minutes of server start-up, then 3 rounds of 10 cells;
the one run so far, with other jobs on the 2 cores, took 32 minutes):

    .venv/bin/python -m benchmarks.conditional_speed --out results/conditional_speed.json
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel

from benchmarks.bench_serving import DEFAULT_PROMPTS
from benchmarks.client import fetch_sae_list, make_client
from benchmarks.plugin_speed import (
    SAE_NAME,
    Cell,
    Harness,
    add_harness_args,
    measure_once,
    medians,
    run_interleaved,
    warm_up,
)
from benchmarks.readout_speed import chat_body
from benchmarks.server_process import ServerProcess
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.sae_api import SAEList, check_spec_against
from sae_steer_vllm.spec import Condition, FeatureIntervention, Intervention, SteeringSpec

CONCURRENCY = (16, 64)
CLAMPED = (0, 1)
"""The features every steered cell clamps."""
CLAMP_VALUE = 4.0


def conditions(sae: str = SAE_NAME) -> tuple[Condition, Condition]:
    """The ``when`` of each clamp in the ``when`` cell, on features of the same SAE: one
    above, one below."""
    return Condition(sae=sae, feature=2, above=0.5), Condition(sae=sae, feature=3, below=0.5)


BASELINE = "plain"
DEFAULT_END_MARKER = "."

ROWS: list[tuple[str, str, float | None]] = [
    ("no steering", "none", None),
    ("2 clamps, all positions (baseline)", "plain", None),
    ("(a) the 2 clamps, request positions `thinking`", "thinking", 0.95),
    ("(a') the 2 clamps, each with positions `thinking`", "thinking_each", 0.95),
    ("(b) the 2 clamps, each with a `when` (one above, one below)", "when", 0.95),
]
"""Table rows: label, cell key (without the concurrency), goal as a ratio to the baseline."""


def arm_specs(sae: str = SAE_NAME) -> dict[str, SteeringSpec | None]:
    """Each cell's spec (see :data:`ROWS`); the steered ones differ only in their gates."""

    def clamps(**gate: Any) -> list[Intervention]:
        return [
            FeatureIntervention(sae=sae, feature=f, value=CLAMP_VALUE, mode="clamp", **gate)
            for f in CLAMPED
        ]

    conditioned: list[Intervention] = [
        FeatureIntervention(sae=sae, feature=f, value=CLAMP_VALUE, mode="clamp", when=c)
        for f, c in zip(CLAMPED, conditions(sae), strict=True)
    ]
    return {
        "none": None,
        "plain": SteeringSpec(interventions=clamps()),
        "thinking": SteeringSpec(interventions=clamps(), positions="thinking"),
        "thinking_each": SteeringSpec(interventions=clamps(positions="thinking")),
        "when": SteeringSpec(interventions=conditioned),
    }


def think_flags(end_marker: str) -> list[str]:
    """The server's think markers: no start marker (reasoning starts with the first generated
    token), ``end_marker`` ends it."""
    return ["--think-start-marker", "", "--think-end-marker", end_marker]


def round_plan(server: ServerProcess, rep: int, sae: str = SAE_NAME) -> list[Cell]:
    """One round: per concurrency every cell once, in :data:`ROWS` order on even rounds and
    reversed on odd ones."""
    specs = arm_specs(sae)
    keys = [key for _, key, _ in ROWS]
    if rep % 2:
        keys.reverse()
    return [Cell(f"{k}/{conc}", server, [specs[k]] * conc) for conc in CONCURRENCY for k in keys]


def run_rounds(
    server: ServerProcess, model: str, tokens: int, reps: int, sae: str = SAE_NAME
) -> dict[str, list[float]]:
    """tok/s samples per cell key, ``reps`` rounds of :func:`round_plan`."""
    samples: dict[str, list[float]] = {}
    for rep in range(reps):
        print(f"[bench] round {rep + 1}/{reps}", flush=True)
        got = run_interleaved(round_plan(server, rep, sae), model, tokens, 1)
        for k, v in got.items():
            samples.setdefault(k, []).extend(v)
    return samples


def ratios(cells: Mapping[str, float]) -> dict[str, float]:
    """Every cell as a ratio to the baseline (2 plain clamps) at the same concurrency."""
    return {
        f"{key}/{conc}": cells[f"{key}/{conc}"] / cells[f"{BASELINE}/{conc}"]
        for _, key, _ in ROWS
        for conc in CONCURRENCY
    }


def paired_ratios(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median over rounds of each round's ratio to that round's baseline (a check on
    :func:`ratios`, less sensitive to drift between rounds)."""
    out = {}
    for _, key, _ in ROWS:
        for conc in CONCURRENCY:
            arm, base = samples[f"{key}/{conc}"], samples[f"{BASELINE}/{conc}"]
            out[f"{key}/{conc}"] = float(
                statistics.median(a / b for a, b in zip(arm, base, strict=True))
            )
    return out


class PhaseStats(BaseModel):
    """Where the think end marker fell in the generated tokens of the phase check."""

    end_marker: str
    end_id: int
    requests: int
    max_tokens: int
    reached_answer: int
    """Requests whose generated tokens contain the end marker (so they had an answer phase)."""
    thinking_tokens: list[int]
    """Per request: generated tokens in the thinking phase (up to and including the marker;
    ``max_tokens`` when it never came)."""

    @property
    def median_thinking(self) -> float:
        return float(statistics.median(self.thinking_tokens))


def thinking_length(token_ids: Sequence[int], end_id: int) -> int:
    """Generated tokens in the thinking phase when reasoning starts with the first generated
    token: up to and including the first ``end_id``, or all of them."""
    ids = list(token_ids)
    return ids.index(end_id) + 1 if end_id in ids else len(ids)


async def phase_check(
    base_url: str,
    model: str,
    spec: SteeringSpec,
    *,
    end_marker: str,
    end_id: int,
    max_tokens: int,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    timeout_s: float = 600.0,
) -> PhaseStats:
    """Send every prompt once with ``spec``, non-streamed with ``return_token_ids``, and find
    the end marker in each request's generated tokens. Raises when a request fails or the
    server returns no token ids."""
    url = base_url.rstrip("/") + "/chat/completions"
    async with httpx.AsyncClient(timeout=timeout_s) as client:

        async def one(prompt: str) -> list[int]:
            body = {**chat_body(model, prompt, spec, max_tokens), "return_token_ids": True}
            r = await client.post(url, json=body)
            if r.status_code != 200:
                raise RuntimeError(f"phase check: HTTP {r.status_code}: {r.text[:300]}")
            ids = r.json()["choices"][0].get("token_ids")
            if not isinstance(ids, list):
                raise RuntimeError("phase check: the server returned no token_ids")
            return [int(x) for x in ids]

        got = await asyncio.gather(*(one(p) for p in prompts))
    return PhaseStats(
        end_marker=end_marker,
        end_id=end_id,
        requests=len(got),
        max_tokens=max_tokens,
        reached_answer=sum(end_id in ids for ids in got),
        thinking_tokens=[thinking_length(ids, end_id) for ids in got],
    )


def server_listing(base_url: str) -> SAEList:
    """The server's ``GET /v1/saes``; raises when it has none (not an sae-steer server)."""

    async def get() -> SAEList | None:
        client = make_client(base_url, timeout_s=60)
        try:
            return await fetch_sae_list(client)
        finally:
            await client.close()

    listing = asyncio.run(get())
    if listing is None:
        raise RuntimeError(f"{base_url}: no sae-steer listing (GET /v1/saes)")
    return listing


def end_marker_id(listing: SAEList, end_marker: str) -> int:
    """The id of the server's end marker; a clear error when the server has no phases (the
    marker is not one token of the model's tokenizer) or another marker."""
    markers = listing.model.think_markers
    if markers is None:
        raise UsageError(
            f"the server has no think markers: --think-end-marker {end_marker!r} is not exactly "
            "one token of the model's tokenizer"
        )
    if markers.end != end_marker or markers.start is not None:
        raise RuntimeError(
            f"the server's think markers are {markers.start!r} / {markers.end!r}, "
            f"not None / {end_marker!r}"
        )
    return markers.end_id


def phases_line(p: PhaseStats) -> str:
    """The sentence under the table on where the phases changed."""
    return (
        f"Phases (think end marker {p.end_marker!r}, token {p.end_id}; reasoning starts with the "
        f"first generated token): with the thinking spec, {p.reached_answer} of {p.requests} "
        f"requests reached the answer phase within {p.max_tokens} tokens; thinking lasted a "
        f"median of {p.median_thinking:.0f} generated tokens (each: "
        f"{', '.join(map(str, p.thinking_tokens))})."
    )


def table(cells: Mapping[str, float], phases: PhaseStats) -> str:
    """The README's table: tok/s and ratio to the baseline per concurrency, and the goal."""
    lines = [
        "| setting | 16 concurrent tok/s | vs baseline | 64 concurrent tok/s | vs baseline | goal |",
        "|---|---|---|---|---|---|",
    ]
    r = ratios(cells)
    for label, key, goal in ROWS:
        row = [label]
        for conc in CONCURRENCY:
            row += [f"{cells[f'{key}/{conc}']:.1f}", f"{r[f'{key}/{conc}']:.3f}"]
        row.append(f"≥ {goal:.2f}" if goal is not None else "–")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join([*lines, "", phases_line(phases)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_harness_args(ap, out=Path("results/conditional_speed.json"), tokens=64, reps=3)
    ap.add_argument(
        "--think-end-marker",
        default=DEFAULT_END_MARKER,
        help="the server's think end marker: one token of the model's tokenizer that the model "
        "emits within --tokens (default '.', see above)",
    )
    args = ap.parse_args(argv)
    h = Harness.from_args(args)
    specs = arm_specs()
    results: dict[str, Any] = {
        "tokens_per_request": args.tokens,
        "reps": args.reps,
        "dtype": args.dtype,
        "extra": args.extra,
        "think_markers": {"start": "", "end": args.think_end_marker},
        "specs": {k: s.to_json() for k, s in specs.items() if s is not None},
    }
    with h.serving({"plugin": think_flags(args.think_end_marker)}) as srv:
        server = srv["plugin"]
        listing = server_listing(server.base_url)
        end_id = end_marker_id(listing, args.think_end_marker)
        for s in specs.values():
            if s is not None:
                check_spec_against(s, listing)
        warm_up((server,), h.name)
        for s in specs.values():  # each gate's path, so no one-time set-up lands in a cell
            if s is not None:
                measure_once(server.base_url, h.name, [s] * 16, 16)
        results["samples"] = run_rounds(server, h.name, args.tokens, args.reps)
        thinking = specs["thinking"]
        assert thinking is not None
        phases = asyncio.run(
            phase_check(
                server.base_url,
                h.name,
                thinking,
                end_marker=args.think_end_marker,
                end_id=end_id,
                max_tokens=args.tokens,
            )
        )
    results["cells"] = cells = medians(results["samples"])
    results["ratios"] = ratios(cells)
    results["paired_ratios"] = paired_ratios(results["samples"])
    results["phases"] = phases.model_dump()
    results["table_md"] = table(cells, phases)
    atomic_write_json(args.out, results, indent=1)
    print(results["table_md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
