"""Serving throughput of the steering plugin vs stock vLLM, on this machine.

Starts stock vLLM, then ``sae-steer serve`` with the same settings (and one
SAE), and measures output tokens/s with ``benchmarks.bench_serving`` for:

* 16 and 64 concurrent requests, no steering;
* every request steered (1 layer, 4 features, clamp);
* half the requests steered;
* 64 concurrent requests, each with a different spec.

Reports each as a ratio to stock vLLM at the same concurrency, plus the
resident memory of each server's process tree. Usage:

    .venv/bin/python -m benchmarks.plugin_speed --sae runs/default-sae --out results/plugin_speed.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import psutil

from benchmarks import server_process
from benchmarks.bench_serving import DEFAULT_PROMPTS, measure_throughput
from sae_steer_vllm.default_model import prepare_default_model
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.sae import random_sae, read_config
from sae_steer_vllm.serve import small_cpu_env
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec


def _tree_rss_mb(pid: int) -> float:
    """Proportional set size (PSS) of the server's process tree, in MB.

    PSS, not RSS: RSS counts a shared page once per process (and once per mapping of
    the same file), which overstates a multi-process server and hid a real bug here
    (the plugin once kept one mapping of the SAE file per planned feature).
    """
    p = psutil.Process(pid)
    procs = [p, *p.children(recursive=True)]
    total = 0
    for q in procs:
        with contextlib.suppress(psutil.Error):
            total += q.memory_full_info().pss
    return total / 2**20


RANDOM_SAE_LAYER = 18
RANDOM_SAE_WIDTH = 16


def random_speed_sae(folder: Path, d_in: int = 576) -> Path:
    """A random 16x SAE at layer 18: serving speed does not depend on the weights."""
    random_sae(
        folder,
        d_in=d_in,
        d_sae=RANDOM_SAE_WIDTH * d_in,
        layer=RANDOM_SAE_LAYER,
        with_stats=False,
    )
    return folder


def _measure(
    url: str, model: str, specs: list[SteeringSpec | None], conc: int, tokens: int, reps: int
) -> float:
    vals = []
    for _ in range(reps):
        r = asyncio.run(
            measure_throughput(
                url,
                model,
                prompts=DEFAULT_PROMPTS,
                specs=specs,
                concurrency=conc,
                max_tokens=tokens,
                warmup=0,
            )
        )
        if r.n_errors:
            raise RuntimeError(f"requests failed: {r.errors}")
        vals.append(r.output_tokens_per_s)
    return statistics.median(vals)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sae",
        type=Path,
        default=None,
        help="SAE folder to register (default: a random 16x SAE at layer 18; speed ignores weights)",
    )
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per cell (median reported)")
    ap.add_argument("--out", type=Path, default=Path("results/plugin_speed.json"))
    ap.add_argument(
        "--extra", default="", help="extra vLLM flags for both servers, e.g. '--enforce-eager'"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        help="model dtype for both servers (default float32: on CPUs without AMX/AVX512-BF16, "
        "vLLM's bfloat16 falls back to slow torch kernels, 5x slower here)",
    )
    args = ap.parse_args(argv)

    model = args.model or str(prepare_default_model())
    if args.sae is None:
        args.sae = random_speed_sae(args.out.parent / "random-sae-l18")
    name = Path(model).name
    cfg, _, _ = read_config(args.sae)
    feats = [0, 1, 2, 3]
    four = SteeringSpec(
        interventions=[
            FeatureIntervention(sae="b", feature=f, value=4.0, mode="clamp") for f in feats
        ]
    )
    distinct = [
        SteeringSpec(
            interventions=[
                FeatureIntervention(
                    sae="b", feature=(7 * j + i) % cfg.d_sae, value=2.0 + 0.1 * j, mode="clamp"
                )
                for i in range(4)
            ]
        )
        for j in range(64)
    ]
    common = [
        "--port",
        "{port}",
        "--host",
        "127.0.0.1",
        "--served-model-name",
        name,
        "--max-num-seqs",
        "64",
        "--dtype",
        args.dtype,
        *args.extra.split(),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "tokens_per_request": args.tokens,
        "reps": args.reps,
        "dtype": args.dtype,
        "extra": args.extra,
        "cells": {},
    }

    # the same thread binding for both servers (sae-steer serve would pick it anyway)
    env = small_cpu_env(
        {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    )

    def run_server(kind: str) -> server_process.ServerProcess:
        port = server_process.free_port()
        flags = [c.replace("{port}", str(port)) for c in common]
        if kind == "stock":
            cmd = [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                model,
                *flags,
            ]
        else:
            cmd = [
                sys.executable,
                "-m",
                "sae_steer_vllm.cli",
                "serve",
                "--model",
                model,
                "--sae",
                f"b={args.sae}",
                *flags,
            ]
        print(f"[bench] starting {kind} server ...", flush=True)
        log = args.out.with_suffix(f".{kind}.log")
        return server_process.launch(cmd, log, port=port, env=env, healthy_within=900)

    cells = results["cells"]
    # Both servers run at once and the cells alternate between them, so drift in
    # machine load hits stock and plugin alike (only one is ever busy).
    stock, plugin = run_server("stock"), run_server("plugin")
    try:
        results["stock_rss_mb"] = _tree_rss_mb(stock.pid)
        results["plugin_rss_mb"] = _tree_rss_mb(plugin.pid)
        for srv in (stock, plugin):  # warm-up: compile specializations, allocator
            _measure(srv.base_url, name, [None] * 16, 16, 16, 1)
        plan: list[tuple[str, server_process.ServerProcess, list[SteeringSpec | None], int]] = []
        for conc in (16, 64):
            plan += [
                (f"stock/none/{conc}", stock, [None] * conc, conc),
                (f"plugin/none/{conc}", plugin, [None] * conc, conc),
                (f"plugin/all/{conc}", plugin, [four] * conc, conc),
                (
                    f"plugin/half/{conc}",
                    plugin,
                    [four if i % 2 == 0 else None for i in range(conc)],
                    conc,
                ),
            ]
        plan.append(("plugin/distinct64/64", plugin, list(distinct), 64))
        samples: dict[str, list[float]] = {k: [] for k, *_ in plan}
        for rep in range(args.reps):
            for key, srv, specs, conc in plan:
                samples[key].append(_measure(srv.base_url, name, specs, conc, args.tokens, 1))
                print(
                    f"[bench] rep {rep + 1}/{args.reps} {key}: {samples[key][-1]:.1f} tok/s",
                    flush=True,
                )
        for key, vals in samples.items():
            cells[key] = statistics.median(vals)
        results["samples"] = samples
        results["stock_rss_mb_after"] = _tree_rss_mb(stock.pid)
        results["plugin_rss_mb_after"] = _tree_rss_mb(plugin.pid)
    finally:
        stock.stop()
        plugin.stop()

    table = [
        ("plugin, no steering", "plugin/none/16", "plugin/none/64"),
        ("every request steered (1 layer, 4 clamp)", "plugin/all/16", "plugin/all/64"),
        ("half steered", "plugin/half/16", "plugin/half/64"),
        ("64 distinct specs", None, "plugin/distinct64/64"),
    ]
    lines = [
        "| setting | 16 concurrent tok/s | ratio | 64 concurrent tok/s | ratio |",
        "|---|---|---|---|---|",
        f"| stock vLLM | {cells['stock/none/16']:.1f} | 1.00 | {cells['stock/none/64']:.1f} | 1.00 |",
    ]
    for label, k16, k64 in table:
        c16 = f"{cells[k16]:.1f} | {cells[k16] / cells['stock/none/16']:.3f}" if k16 else "– | –"
        c64 = f"{cells[k64]:.1f} | {cells[k64] / cells['stock/none/64']:.3f}"
        lines.append(f"| {label} | {c16} | {c64} |")
    lines.append(
        f"\nMemory (PSS) of the server process tree after the runs: stock "
        f"{results['stock_rss_mb_after']:.0f} MB, plugin {results['plugin_rss_mb_after']:.0f} MB "
        f"(+{results['plugin_rss_mb_after'] - results['stock_rss_mb_after']:.0f} MB; at start-up "
        f"{results['stock_rss_mb']:.0f} vs {results['plugin_rss_mb']:.0f} MB)."
    )
    results["table_md"] = "\n".join(lines)
    atomic_write_json(args.out, results, indent=1)
    print(results["table_md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
