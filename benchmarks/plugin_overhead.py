"""Engine-level cost of steering: vLLM's offline ``LLM`` with and without the plugin.

Why this exists beside ``plugin_speed`` (the HTTP benchmark): on a 2-core machine the API
server's streaming and detokenization share the cores with the model, so the *text* a
request produces changes measured throughput, and steered requests produce different
text. Here there is no API server and no detokenization (``detokenize=False``), every
request generates exactly ``--tokens`` tokens (``ignore_eos``), so the only difference
between cells is the model's work. Each configuration runs in its own process (vLLM keeps
process-global state); stock first, then the plugin, then stock again, so drift shows.

    .venv/bin/python -m benchmarks.plugin_overhead --out results/plugin_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_serving import DEFAULT_PROMPTS
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.serve import small_cpu_env

CELLS = ("none", "all", "half", "distinct")


def _specs(cell: str, n: int, d_sae: int) -> list[Any]:
    from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

    def four(j: int) -> SteeringSpec:
        return SteeringSpec(
            interventions=[
                FeatureIntervention(
                    sae="b", feature=(7 * j + i) % d_sae, value=2.0 + 0.1 * j, mode="clamp"
                )
                for i in range(4)
            ]
        )

    if cell == "none":
        return [None] * n
    if cell == "all":
        return [four(0)] * n
    if cell == "half":
        return [four(0) if i % 2 == 0 else None for i in range(n)]
    return [four(j) for j in range(n)]


def child(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TextPrompt

    from sae_steer_vllm.sae import read_config

    kw: dict[str, Any] = {}
    plugin = args.kind == "plugin"
    if plugin:
        from transformers import AutoConfig

        arch = AutoConfig.from_pretrained(args.model).architectures[0]
        kw = {
            "hf_overrides": {"architectures": ["Steered" + arch]},
            "logits_processors": ["sae_steer_vllm.batch_tracker:SteeringBatchTracker"],
            "additional_config": {"sae_steer": {"saes": {"b": str(args.sae)}}},
        }
    llm = LLM(
        args.model,
        dtype="float32",
        max_model_len=1024,
        max_num_seqs=64,
        seed=0,
        enforce_eager=args.eager,
        **kw,
    )
    d_sae = read_config(args.sae)[0].d_sae
    out: dict[str, list[float]] = {}

    def run(cell: str, n: int, tokens: int) -> float:
        specs = _specs(cell, n, d_sae)
        prompts: list[TextPrompt] = []
        params = []
        for i, spec in enumerate(specs):
            p = TextPrompt(prompt=DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)])
            if spec is not None:
                p["cache_salt"] = spec.cache_salt()
            prompts.append(p)
            params.append(
                SamplingParams(
                    temperature=0,
                    max_tokens=tokens,
                    ignore_eos=True,
                    detokenize=False,
                    extra_args={"steering": spec.to_json()} if spec is not None else None,
                )
            )
        t0 = time.perf_counter()
        res = llm.generate(prompts, params, use_tqdm=False)
        secs = time.perf_counter() - t0
        return sum(len(r.outputs[0].token_ids) for r in res) / secs

    run("none", 16, 8)  # warm-up
    for _ in range(args.reps):
        for n in (16, 64):
            for cell in CELLS if plugin else ("none",):
                if cell == "distinct" and n != 64:
                    continue
                out.setdefault(f"{cell}/{n}", []).append(run(cell, n, args.tokens))
    print("RESULT " + json.dumps(out), flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument("--sae", type=Path, default=None, help="SAE folder (default: random 16x)")
    ap.add_argument("--tokens", type=int, default=128, help="generated tokens per request")
    ap.add_argument("--reps", type=int, default=3, help="repetitions per cell (median reported)")
    ap.add_argument("--eager", action="store_true", help="--enforce-eager for both")
    ap.add_argument("--out", type=Path, default=Path("results/plugin_overhead.json"))
    ap.add_argument("--kind", choices=["stock", "plugin"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.kind:
        child(args)
        return 0

    from benchmarks.plugin_speed import random_speed_sae
    from sae_steer_vllm.default_model import prepare_default_model

    args.model = args.model or str(prepare_default_model())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.sae is None:
        args.sae = random_speed_sae(args.out.parent / "random-sae-l18")
    env = small_cpu_env({**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    runs: list[tuple[str, dict[str, list[float]]]] = []
    for kind in ("stock", "plugin", "stock"):
        cmd = [sys.executable, "-m", "benchmarks.plugin_overhead", "--kind", kind]
        cmd += ["--model", args.model, "--sae", str(args.sae), "--tokens", str(args.tokens)]
        cmd += ["--reps", str(args.reps)] + (["--eager"] if args.eager else [])
        print(f"[overhead] {kind} engine ...", file=sys.stderr, flush=True)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            print(r.stderr[-3000:], file=sys.stderr)
            return 1
        runs.append((kind, json.loads(lines[-1][len("RESULT ") :])))
        print(f"[overhead] {kind}: {lines[-1]}", file=sys.stderr, flush=True)
    stock = {
        k: statistics.median(runs[0][1][k] + runs[2][1][k]) for k in runs[0][1]
    }  # both stock runs pooled
    plugin = {k: statistics.median(v) for k, v in runs[1][1].items()}
    rows = [
        "| setting | 16 requests tok/s | ratio | 64 requests tok/s | ratio |",
        "|---|---|---|---|---|",
        f"| stock vLLM | {stock['none/16']:.1f} | 1.000 | {stock['none/64']:.1f} | 1.000 |",
    ]
    labels = {
        "none": "plugin, no steering",
        "all": "every request steered (1 layer, 4 clamp)",
        "half": "half steered",
        "distinct": "64 distinct specs",
    }
    for cell in CELLS:
        c16 = plugin.get(f"{cell}/16")
        c64 = plugin[f"{cell}/64"]
        a = f"{c16:.1f} | {c16 / stock['none/16']:.3f}" if c16 else "– | –"
        rows.append(f"| {labels[cell]} | {a} | {c64:.1f} | {c64 / stock['none/64']:.3f} |")
    table = "\n".join(rows)
    result = {
        "tokens_per_request": args.tokens,
        "reps": args.reps,
        "eager": args.eager,
        "runs": runs,
        "stock": stock,
        "plugin": plugin,
        "table_md": table,
    }
    atomic_write_json(args.out, result, indent=1)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
