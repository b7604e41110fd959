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

The harness itself (options, server start-up, interleaved cells, memory, the ratio table) is
made of the functions below, which ``benchmarks.readout_speed`` reuses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import psutil

from benchmarks import server_process
from benchmarks.bench_serving import DEFAULT_PROMPTS, measure_throughput, reads
from sae_steer_vllm.default_model import prepare_default_model
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.sae import random_sae, read_config
from sae_steer_vllm.serve import small_cpu_env
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

SAE_NAME = "b"
"""The name the speed benchmarks register their one SAE under."""


def tree_pss_mb(pid: int) -> float:
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


def four_clamps(sae: str = SAE_NAME) -> SteeringSpec:
    """The steering of the "every request steered" cells: 4 features of one SAE (1 layer)
    clamped to 4.0."""
    return SteeringSpec(
        interventions=[
            FeatureIntervention(sae=sae, feature=f, value=4.0, mode="clamp") for f in range(4)
        ]
    )


def every_other(spec: SteeringSpec, n: int) -> list[SteeringSpec | None]:
    """``n`` requests, the even ones carrying ``spec`` (the "half" cells)."""
    return [spec if i % 2 == 0 else None for i in range(n)]


def measure_once(url: str, model: str, specs: list[SteeringSpec | None], tokens: int) -> float:
    """Output tokens/s of one run of ``specs``, all in flight at once (concurrency =
    ``len(specs)``). Raises when a request failed or a readout request got no readout:
    a cell that did less work than it claims must not become a number."""
    r = asyncio.run(
        measure_throughput(
            url,
            model,
            prompts=DEFAULT_PROMPTS,
            specs=specs,
            concurrency=len(specs),
            max_tokens=tokens,
            warmup=0,
        )
    )
    if r.n_errors:
        raise RuntimeError(f"requests failed: {r.errors}")
    asked = sum(1 for s in specs if reads(s))
    if r.readouts_received < asked:
        raise RuntimeError(
            f"{asked - r.readouts_received} of {asked} readout requests got no sae_readout"
        )
    return r.output_tokens_per_s


class Cell(NamedTuple):
    """One measurement cell: its key, the server and the requests it sends at once."""

    key: str
    server: server_process.ServerProcess
    specs: list[SteeringSpec | None]


def run_interleaved(
    cells: Sequence[Cell], model: str, tokens: int, reps: int
) -> dict[str, list[float]]:
    """tok/s samples per cell key, ``reps`` rounds that each run every cell once, in order.
    Both servers run at once and the cells alternate between them, so drift in machine
    load hits stock and plugin alike (only one is ever busy)."""
    samples: dict[str, list[float]] = {c.key: [] for c in cells}
    for rep in range(reps):
        for c in cells:
            samples[c.key].append(measure_once(c.server.base_url, model, c.specs, tokens))
            print(
                f"[bench] rep {rep + 1}/{reps} {c.key}: {samples[c.key][-1]:.1f} tok/s", flush=True
            )
    return samples


def medians(samples: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The number each cell reports: the median of its samples."""
    return {k: float(statistics.median(v)) for k, v in samples.items()}


def warm_up(servers: Sequence[server_process.ServerProcess], model: str) -> None:
    """16 unmeasured short requests per server: compile specializations, allocator."""
    for srv in servers:
        measure_once(srv.base_url, model, [None] * 16, 16)


def add_harness_args(ap: argparse.ArgumentParser, out: Path, tokens: int, reps: int) -> None:
    """The options every serving-speed benchmark shares."""
    ap.add_argument(
        "--sae",
        type=Path,
        default=None,
        help="SAE folder to register (default: a random 16x SAE at layer 18; speed ignores weights)",
    )
    ap.add_argument("--model", default=None, help="model folder (default: the embedded default)")
    ap.add_argument(
        "--tokens", type=int, default=tokens, help="output tokens per request (ignore_eos)"
    )
    ap.add_argument("--reps", type=int, default=reps, help="repetitions per cell (median reported)")
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument(
        "--extra",
        default="",
        help="extra vLLM flags for both servers, e.g. --extra=--enforce-eager",
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        help="model dtype for both servers (default float32: on CPUs without AMX/AVX512-BF16, "
        "vLLM's bfloat16 falls back to slow torch kernels, 5x slower here)",
    )


@dataclass
class Harness:
    """What both servers of a speed benchmark share: model, SAE, flags, environment."""

    model: str
    name: str
    sae: Path
    flags: list[str]
    env: dict[str, str]
    out: Path

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Harness:
        model = args.model or str(prepare_default_model())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        sae = args.sae or random_speed_sae(args.out.parent / "random-sae-l18")
        name = Path(model).name
        flags = ["--host", "127.0.0.1", "--served-model-name", name, "--max-num-seqs", "64"]
        flags += ["--dtype", args.dtype, *args.extra.split()]
        # the same thread binding for both servers (sae-steer serve would pick it anyway)
        env = small_cpu_env(
            {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
        )
        return cls(model=model, name=name, sae=sae, flags=flags, env=env, out=args.out)

    def command(self, plugin_flags: list[str] | None, port: int) -> list[str]:
        """Stock vLLM (``plugin_flags`` None) or ``sae-steer serve`` with the SAE registered
        as :data:`SAE_NAME` plus ``plugin_flags``; every other flag the same."""
        flags = ["--port", str(port), *self.flags]
        if plugin_flags is None:
            head = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
        else:
            head = [sys.executable, "-m", "sae_steer_vllm.cli", "serve"]
            flags += ["--sae", f"{SAE_NAME}={self.sae}", *plugin_flags]
        return [*head, "--model", self.model, *flags]

    def start(self, kind: str, plugin_flags: list[str] | None) -> server_process.ServerProcess:
        """Start :meth:`command` and wait until it serves; the log lands beside the result."""
        port = server_process.free_port()
        print(f"[bench] starting {kind} server ...", flush=True)
        log = self.out.with_suffix(f".{kind}.log")
        cmd = self.command(plugin_flags, port)
        return server_process.launch(cmd, log, port=port, env=self.env, healthy_within=900)

    @contextlib.contextmanager
    def serving(
        self, servers: Mapping[str, list[str] | None]
    ) -> Iterator[dict[str, server_process.ServerProcess]]:
        """Start every server (kind -> plugin flags, see :meth:`start`) one after the other
        and stop all that started, whatever happens."""
        with contextlib.ExitStack() as stack:
            out = {}
            for kind, plugin_flags in servers.items():
                out[kind] = srv = self.start(kind, plugin_flags)
                stack.callback(srv.stop)
            yield out


def ratio_table(
    rows: Sequence[tuple[str, str | None, str]],
    cells: Mapping[str, float],
    goals: Mapping[str, str] | None = None,
) -> list[str]:
    """The README's Markdown table: per row (label, 16-concurrent key or None, 64-concurrent
    key) tok/s and the ratio to ``stock/none/16`` / ``stock/none/64``. With ``goals``
    (label -> text) a last column shows each row's goal."""
    goal_col = goals is not None
    head = "| setting | 16 concurrent tok/s | ratio | 64 concurrent tok/s | ratio |"
    lines = [head + (" goal |" if goal_col else ""), "|---|---|---|---|---|" + ("---|" * goal_col)]
    s16, s64 = cells["stock/none/16"], cells["stock/none/64"]
    stock = f"| stock vLLM | {s16:.1f} | 1.00 | {s64:.1f} | 1.00 |"
    lines.append(stock + (" – |" if goal_col else ""))
    for label, k16, k64 in rows:
        c16 = f"{cells[k16]:.1f} | {cells[k16] / s16:.3f}" if k16 else "– | –"
        c64 = f"{cells[k64]:.1f} | {cells[k64] / s64:.3f}"
        goal = f" {(goals or {}).get(label, '–')} |" if goal_col else ""
        lines.append(f"| {label} | {c16} | {c64} |{goal}")
    return lines


def memory_line(label: str, stock: tuple[float, float], other: tuple[float, float]) -> str:
    """The memory sentence under the table: (at start-up, after the runs) PSS in MB."""
    return (
        f"Memory (PSS) of the server process tree after the runs: stock {stock[1]:.0f} MB, "
        f"{label} {other[1]:.0f} MB (+{other[1] - stock[1]:.0f} MB; at start-up "
        f"{stock[0]:.0f} vs {other[0]:.0f} MB)."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_harness_args(ap, out=Path("results/plugin_speed.json"), tokens=64, reps=3)
    args = ap.parse_args(argv)
    h = Harness.from_args(args)
    cfg, _, _ = read_config(h.sae)
    four = four_clamps()
    distinct = [
        SteeringSpec(
            interventions=[
                FeatureIntervention(
                    sae=SAE_NAME,
                    feature=(7 * j + i) % cfg.d_sae,
                    value=2.0 + 0.1 * j,
                    mode="clamp",
                )
                for i in range(4)
            ]
        )
        for j in range(64)
    ]
    results: dict[str, Any] = {
        "tokens_per_request": args.tokens,
        "reps": args.reps,
        "dtype": args.dtype,
        "extra": args.extra,
    }
    with h.serving({"stock": None, "plugin": []}) as srv:
        stock, plugin = srv["stock"], srv["plugin"]
        results["stock_rss_mb"] = tree_pss_mb(stock.pid)
        results["plugin_rss_mb"] = tree_pss_mb(plugin.pid)
        warm_up((stock, plugin), h.name)
        plan: list[Cell] = []
        for conc in (16, 64):
            plan += [
                Cell(f"stock/none/{conc}", stock, [None] * conc),
                Cell(f"plugin/none/{conc}", plugin, [None] * conc),
                Cell(f"plugin/all/{conc}", plugin, [four] * conc),
                Cell(f"plugin/half/{conc}", plugin, every_other(four, conc)),
            ]
        plan.append(Cell("plugin/distinct64/64", plugin, list(distinct)))
        results["samples"] = run_interleaved(plan, h.name, args.tokens, args.reps)
        results["cells"] = cells = medians(results["samples"])
        results["stock_rss_mb_after"] = tree_pss_mb(stock.pid)
        results["plugin_rss_mb_after"] = tree_pss_mb(plugin.pid)

    table = [
        ("plugin, no steering", "plugin/none/16", "plugin/none/64"),
        ("every request steered (1 layer, 4 clamp)", "plugin/all/16", "plugin/all/64"),
        ("half steered", "plugin/half/16", "plugin/half/64"),
        ("64 distinct specs", None, "plugin/distinct64/64"),
    ]
    lines = ratio_table(table, cells)
    mem = memory_line(
        "plugin",
        (results["stock_rss_mb"], results["stock_rss_mb_after"]),
        (results["plugin_rss_mb"], results["plugin_rss_mb_after"]),
    )
    results["table_md"] = "\n".join([*lines, "", mem])
    atomic_write_json(args.out, results, indent=1)
    print(results["table_md"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
