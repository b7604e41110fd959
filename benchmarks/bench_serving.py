"""``sae-steer bench``: serving throughput for a mix of steered and unsteered requests.

What it answers: how many output tokens/s the endpoint sustains, and at which
latency, when a given fraction of the requests in flight carry steering specs
(and how many distinct specs share a batch). Requests are streamed so time to
first token is measured too; ``ignore_eos`` (a vLLM extension, sent through
``extra_body``) makes every request generate exactly ``max_tokens`` so runs
are comparable. :func:`measure_throughput` is the library entry point the
plugin's own benchmarks (``plugin_speed``, ``readout_speed``) reuse.

A spec may steer, read (``SteeringSpec.readout``: the stream then ends with one chunk
carrying ``sae_readout``) or both; the "steered" arm is every request whose spec asks for
either, and a no-op spec (``SteeringSpec()``) counts with the plain requests, since the
server runs it as if it had none.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import openai
from pydantic import BaseModel, Field

from benchmarks.client import (
    check_endpoint,
    make_client,
    merge_extra_body,
    resolve_model,
    status_message,
)
from benchmarks.options import CommaList, EndpointOptions, command_parser
from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.readout_api import RESPONSE_KEY
from sae_steer_vllm.spec import FeatureIntervention, Mode, SteeringSpec

PROG = "sae-steer bench"

DESCRIPTION = (
    "Measure serving throughput (output tokens/s, latency and time-to-first-token "
    "percentiles) of an OpenAI-compatible endpoint for a mix of steered and unsteered "
    "chat requests."
)

EXAMPLES = (
    "example:\n  sae-steer bench --base-url http://127.0.0.1:8000/v1 --sae default "
    "--features 12,34 --steered-fraction 0.5 --distinct-specs 4 -c 16 -N 128"
)


DEFAULT_PROMPTS = [
    "Explain why the sum of two even numbers is even.",
    "Write a short story about a lighthouse keeper.",
    "What is the derivative of x^3 + 2x? Show your steps.",
    "List five uses of a paperclip.",
    "Describe how a rainbow forms.",
    "Solve for x: 3x + 7 = 22.",
    "Summarize the plot of a heist movie in three sentences.",
    "How many prime numbers are less than 30? Reason step by step.",
]


class LatencyStats(BaseModel):
    mean: float
    p50: float
    p90: float
    p99: float


class GroupStats(BaseModel):
    """Per-arm numbers (steered / unsteered) within the same run; "steered": the spec steers
    or reads, see :func:`asks_server`."""

    n_ok: int
    output_tokens: int
    latency_s: LatencyStats | None
    ttft_s: LatencyStats | None
    decode_tokens_per_s_per_request: float | None


class ThroughputResult(BaseModel):
    n_requests: int
    n_ok: int
    n_errors: int
    concurrency: int
    max_tokens: int
    steered_fraction: float
    """Share of requests whose spec steers or reads (:func:`asks_server`)."""
    distinct_specs: int
    """Distinct steering configurations (cache salts) among the steering requests; a readout
    alone adds none (it changes no value the server caches)."""
    read_fraction: float = 0.0
    """Share of requests that ask for a readout."""
    readouts_received: int = 0
    """Successful readout requests whose stream carried ``sae_readout`` (a server that
    ignored the readout would leave this below the number of readout requests)."""
    wall_s: float
    output_tokens: int
    output_tokens_per_s: float
    requests_per_s: float
    latency_s: LatencyStats | None
    ttft_s: LatencyStats | None
    steered: GroupStats
    unsteered: GroupStats
    errors: list[str]
    """The first few error messages (all errors are counted in ``n_errors``)."""


class _One(BaseModel):
    steered: bool
    read: bool = False
    got_readout: bool = False
    ok: bool
    latency_s: float = 0.0
    ttft_s: float | None = None
    output_tokens: int = 0
    error: str | None = None


def _stats(xs: Sequence[float]) -> LatencyStats | None:
    if not xs:
        return None
    a = np.asarray(xs, dtype=float)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return LatencyStats(mean=float(a.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


def _group(results: Sequence[_One]) -> GroupStats:
    ok = [r for r in results if r.ok]
    rates = [
        (r.output_tokens - 1) / (r.latency_s - r.ttft_s)
        for r in ok
        if r.ttft_s is not None and r.latency_s > r.ttft_s and r.output_tokens > 1
    ]
    return GroupStats(
        n_ok=len(ok),
        output_tokens=sum(r.output_tokens for r in ok),
        latency_s=_stats([r.latency_s for r in ok]),
        ttft_s=_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        decode_tokens_per_s_per_request=float(np.mean(rates)) if rates else None,
    )


def asks_server(spec: SteeringSpec | None) -> bool:
    """Whether a request's spec asks the server for anything (steering, readout or both)."""
    return spec is not None and not spec.is_noop


def reads(spec: SteeringSpec | None) -> bool:
    """Whether a request asks for a readout."""
    return spec is not None and spec.readout is not None


async def _one_request(
    client: Any,
    model: str,
    prompt: str,
    spec: SteeringSpec | None,
    max_tokens: int,
    ignore_eos: bool,
) -> _One:
    extra = {"ignore_eos": True} if ignore_eos else {}
    t0 = time.perf_counter()
    ttft = None
    n_chunks = 0
    usage_tokens: int | None = None
    got_readout = False
    steered, read = asks_server(spec), reads(spec)
    try:
        stream = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            max_tokens=max_tokens,
            temperature=0.0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=merge_extra_body(spec, extra),
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                n_chunks += 1
            if getattr(chunk, "usage", None) is not None and chunk.usage.completion_tokens:
                usage_tokens = int(chunk.usage.completion_tokens)
            if (chunk.model_extra or {}).get(RESPONSE_KEY) is not None:
                got_readout = True
    except openai.APIStatusError as e:
        return _One(steered=steered, read=read, ok=False, error=status_message(e))
    except openai.APIConnectionError as e:
        return _One(steered=steered, read=read, ok=False, error=f"{type(e).__name__}: {e}")
    return _One(
        steered=steered,
        read=read,
        got_readout=got_readout,
        ok=True,
        latency_s=time.perf_counter() - t0,
        ttft_s=ttft,
        output_tokens=usage_tokens if usage_tokens is not None else n_chunks,
    )


async def measure_throughput(
    base_url: str,
    model: str,
    *,
    prompts: list[str],
    specs: list[SteeringSpec | None],
    concurrency: int,
    max_tokens: int,
    ignore_eos: bool = True,
    api_key: str = "EMPTY",
    warmup: int = 0,
    timeout_s: float = 600.0,
) -> ThroughputResult:
    """Send ``len(specs)`` requests (request i: ``prompts[i % len]`` with ``specs[i]``).

    At most ``concurrency`` are in flight. Throughput is total output tokens
    over the wall time of the measured requests (``warmup`` extra unsteered
    requests run first and are not counted). Raises :class:`EndpointError`
    when the server cannot be reached.
    """
    if not prompts or not specs:
        raise UsageError("need at least one prompt and one request")
    client = make_client(base_url, api_key=api_key, timeout_s=timeout_s)
    try:
        await check_endpoint(client, model)
        sem = asyncio.Semaphore(max(1, concurrency))

        async def go(i: int, spec: SteeringSpec | None) -> _One:
            async with sem:
                return await _one_request(
                    client, model, prompts[i % len(prompts)], spec, max_tokens, ignore_eos
                )

        if warmup:
            await asyncio.gather(*(go(i, None) for i in range(warmup)))
        t0 = time.perf_counter()
        results = await asyncio.gather(*(go(i, s) for i, s in enumerate(specs)))
        wall = time.perf_counter() - t0
    finally:
        await client.close()

    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    distinct = len({s.cache_salt() for s in specs if s is not None and s.steers})
    n_steered = sum(1 for s in specs if asks_server(s))
    return ThroughputResult(
        n_requests=len(specs),
        n_ok=len(ok),
        n_errors=len(results) - len(ok),
        concurrency=concurrency,
        max_tokens=max_tokens,
        steered_fraction=n_steered / len(specs),
        distinct_specs=distinct,
        read_fraction=sum(1 for s in specs if reads(s)) / len(specs),
        readouts_received=sum(1 for r in ok if r.read and r.got_readout),
        wall_s=wall,
        output_tokens=tokens,
        output_tokens_per_s=tokens / wall if wall > 0 else 0.0,
        requests_per_s=len(ok) / wall if wall > 0 else 0.0,
        latency_s=_stats([r.latency_s for r in ok]),
        ttft_s=_stats([r.ttft_s for r in ok if r.ttft_s is not None]),
        steered=_group([r for r in results if r.steered]),
        unsteered=_group([r for r in results if not r.steered]),
        errors=[r.error for r in results if r.error][:5],
    )


def request_mix(
    n_requests: int,
    steered_fraction: float,
    distinct: Sequence[SteeringSpec],
    *,
    seed: int = 0,
) -> list[SteeringSpec | None]:
    """``round(fraction x n)`` requests cycling through ``distinct``, shuffled in among
    ``None`` (plain) requests. The specs may steer, read (``SteeringSpec.readout``) or both.

    The seeded shuffle interleaves steered and unsteered requests so every
    batch the server forms is mixed, which is the case worth measuring.
    """
    if not 0.0 <= steered_fraction <= 1.0:
        raise UsageError("steered fraction must be within [0, 1]")
    n_steer = round(steered_fraction * n_requests)
    if n_steer and not distinct:
        raise UsageError("steered requests need at least one spec")
    mix: list[SteeringSpec | None] = [distinct[i % len(distinct)] for i in range(n_steer)]
    mix += [None] * (n_requests - n_steer)
    random.Random(seed).shuffle(mix)
    return mix


def feature_specs(
    sae: str, features: Sequence[int], count: int, strength: float, mode: Mode
) -> list[SteeringSpec]:
    """``count`` distinct single-feature specs: features in turn; once they run out,
    strengths step by 0.1 so every spec is still distinct (different cache salt)."""
    out = []
    for j in range(count):
        f = features[j % len(features)]
        s = strength + 0.1 * (j // len(features))
        out.append(
            SteeringSpec(
                interventions=[FeatureIntervention(sae=sae, feature=f, strength=s, mode=mode)]
            )
        )
    return out


def _fmt(r: ThroughputResult) -> str:
    def lat(x: LatencyStats | None) -> str:
        return "–" if x is None else f"p50 {x.p50:.3f}s  p90 {x.p90:.3f}s  p99 {x.p99:.3f}s"

    lines = [
        f"requests {r.n_ok}/{r.n_requests} ok ({r.n_errors} errors), concurrency {r.concurrency}, "
        f"max_tokens {r.max_tokens}, steered {100 * r.steered_fraction:.0f}% "
        f"({r.distinct_specs} distinct specs)",
        f"output tokens/s {r.output_tokens_per_s:.1f}   requests/s {r.requests_per_s:.2f}   "
        f"wall {r.wall_s:.2f}s   output tokens {r.output_tokens}",
        f"latency  {lat(r.latency_s)}",
        f"ttft     {lat(r.ttft_s)}",
    ]
    if r.read_fraction:
        lines.append(
            f"readout  {100 * r.read_fraction:.0f}% of requests asked, "
            f"{r.readouts_received} received sae_readout"
        )
    for name, g in (("steered", r.steered), ("unsteered", r.unsteered)):
        if g.n_ok:
            rate = g.decode_tokens_per_s_per_request
            lines.append(
                f"{name:9s} n={g.n_ok}  latency {lat(g.latency_s)}  decode tok/s/request {rate:.1f}"
                if rate is not None
                else f"{name:9s} n={g.n_ok}  latency {lat(g.latency_s)}"
            )
    for e in r.errors:
        lines.append(f"error: {e}")
    return "\n".join(lines)


class BenchConfig(CommandConfig):
    """The options of ``sae-steer bench`` beyond the endpoint."""

    num_requests: int = Field(default=64, ge=1, json_schema_extra={"cli": {"aliases": ["-N"]}})
    """measured requests"""
    concurrency: int = Field(default=8, ge=1, json_schema_extra={"cli": {"aliases": ["-c"]}})
    """requests in flight"""
    max_tokens: int = Field(default=128, ge=1)
    """output tokens per request"""
    ignore_eos: bool = True
    """every request generates exactly --max-tokens (ignore_eos); --no-ignore-eos lets
    requests stop at EOS"""
    steered_fraction: float = Field(default=0.5, ge=0.0, le=1.0)
    """share of steered requests (0..1)"""
    distinct_specs: int = 1
    """how many different specs the steered requests use"""
    sae: str | None = None
    """SAE name for generated specs"""
    features: CommaList[int] = [0]
    """comma list of features for generated specs"""
    strength: float = 2.0
    """x the feature's max activation"""
    mode: Literal["clamp", "add"] = "clamp"
    """intervention of generated specs"""
    specs_file: Path | None = None
    """use these named specs (JSON/JSONL) instead of --sae"""
    prompts_file: Path | None = None
    """JSONL with a 'prompt' (or --prompt-field) string per line"""
    prompt_field: str = "prompt"
    """field of --prompts-file holding the prompt"""
    warmup: int = Field(default=2, ge=0)
    """unmeasured warm-up requests"""
    seed: int = 0
    """shuffle seed of the request mix"""
    json_out: Path | None = None
    """also write the result as JSON"""


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES)
    add_model_options(p, EndpointOptions, group="endpoint")
    add_model_options(p, BenchConfig, group="requests")
    return p


def _distinct_specs(cfg: BenchConfig) -> list[SteeringSpec]:
    """The specs steered requests cycle through (none when nothing is steered)."""
    if cfg.steered_fraction == 0:
        return []
    n = max(1, cfg.distinct_specs)
    if cfg.specs_file:
        from benchmarks.sweep import load_specs_file

        return [s for s in load_specs_file(cfg.specs_file, baseline=False).values() if s][:n]
    if not cfg.sae:
        raise UsageError("steered requests need --sae (or --specs-file), or --steered-fraction 0")
    if not cfg.features:
        raise UsageError("--features is empty")
    return feature_specs(cfg.sae, cfg.features, n, cfg.strength, cfg.mode)


def _prompts(cfg: BenchConfig) -> list[str]:
    if cfg.prompts_file is None:
        return DEFAULT_PROMPTS
    from sae_training import read_jsonl

    prompts = [
        str(r[cfg.prompt_field])
        for r in read_jsonl(cfg.prompts_file)
        if isinstance(r.get(cfg.prompt_field), str)
    ]
    if not prompts:
        raise UsageError(f"{cfg.prompts_file}: no '{cfg.prompt_field}' strings")
    return prompts


def run_bench(endpoint: EndpointOptions, cfg: BenchConfig) -> int:
    """The whole command; returns 0, or 1 when some requests failed."""
    mix = request_mix(cfg.num_requests, cfg.steered_fraction, _distinct_specs(cfg), seed=cfg.seed)
    prompts = _prompts(cfg)
    model = resolve_model(endpoint.url, endpoint.model, api_key=endpoint.key)
    res = asyncio.run(
        measure_throughput(
            endpoint.url,
            model,
            prompts=prompts,
            specs=mix,
            concurrency=cfg.concurrency,
            max_tokens=cfg.max_tokens,
            ignore_eos=cfg.ignore_eos,
            api_key=endpoint.key,
            warmup=cfg.warmup,
        )
    )
    print(_fmt(res))
    if cfg.json_out:
        atomic_write_json(cfg.json_out, res.model_dump())
    return 0 if res.n_errors == 0 else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return run_command(
        PROG,
        lambda: run_bench(
            model_from_args(EndpointOptions, args), model_from_args(BenchConfig, args)
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
