"""Tables and plots from the sample log.

Everything is recomputed from ``samples.jsonl`` so a report can be rebuilt
after a resumed or merged run (``sae-steer eval --report-only``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.metrics import (
    CI,
    DEGENERATION_N,
    Estimate,
    SpecMetrics,
    compare_to_baseline,
    fmt,
    summarize,
)
from benchmarks.readout import READOUT_NOTE, ReadoutRow, readout_markdown, readout_table
from benchmarks.results import SampleRecord, read_config, read_log
from benchmarks.sweep import BASELINE, describe_single_feature
from sae_steer_vllm.constants import EVAL_METRICS_FILE as METRICS_FILE
from sae_steer_vllm.constants import PLOTS_DIR, SAMPLES_FILE, SUMMARY_FILE
from sae_steer_vllm.files import atomic_write
from sae_steer_vllm.spec import SteeringSpec


@dataclass
class Report:
    metrics: list[SpecMetrics]
    summary_md: Path
    metrics_json: Path
    plots: list[Path] = field(default_factory=list)
    spec_errors: dict[str, str] = field(default_factory=dict)
    readout: list[ReadoutRow] = field(default_factory=list)
    """The watched features per arm (runs with ``--readout``; empty otherwise)."""


def compute_metrics(
    records: Sequence[SampleRecord], *, baseline: str = BASELINE, seed: int = 0
) -> list[SpecMetrics]:
    """Metrics per (dataset, spec) in first-seen order, each compared with ``baseline``."""
    groups: dict[tuple[str, str], list[SampleRecord]] = {}
    for r in records:
        groups.setdefault((r.dataset, r.spec_name), []).append(r)
    ds_order = {ds: i for i, ds in enumerate(dict.fromkeys(ds for ds, _ in groups))}
    specs = _spec_of(records)

    def order(k: tuple[str, str]) -> tuple[Any, ...]:
        d = describe_single_feature(specs.get(k))
        feat = (d[0], d[1], d[2], d[3]) if d else ("~", 0, "", 0.0)  # grid rows together
        return (ds_order[k[0]], k[1] != baseline, feat, k[1])

    out = []
    for ds, name in sorted(groups, key=order):
        recs = groups[(ds, name)]
        ok = [r.graded() for r in recs if r.ok]
        m = summarize(ds, name, ok, n_errors=sum(1 for r in recs if not r.ok), seed=seed)
        base = groups.get((ds, baseline))
        if name != baseline and base is not None and ok:
            m = compare_to_baseline(m, ok, [r.graded() for r in base if r.ok], seed=seed)
        out.append(m)
    return out


def _ci(c: CI | None, pct: bool, digits: int) -> str:
    if c is None:
        return "–"
    sign = "+" if c.diff >= 0 else ""
    return f"{sign}{fmt(c.diff, digits, pct)} [{fmt(c.lo, digits, pct)}, {fmt(c.hi, digits, pct)}]"


def markdown_table(metrics: Sequence[SpecMetrics]) -> str:
    head = (
        "| dataset | spec | problems | samples | pass@1 % | Δ pass@1 (95% CI) | maj@n % "
        "| tokens | Δ tokens (95% CI) | reasoning tokens | no </think> % "
        f"| reasoning words /100 tok | repeated {DEGENERATION_N}-grams % (95% CI) | looped % "
        "| no answer % | errors |"
    )
    sep = "|" + "---|" * head.count("|")
    sep = sep[: -len("---|")]
    rows = [head, sep]
    for m in metrics:
        rows.append(
            f"| {m.dataset} | {m.spec_name} | {m.n_problems} | {m.n_samples} "
            f"| {fmt(m.pass_at_1, 1, True)} | {_ci(m.accuracy_vs_baseline, True, 1)} "
            f"| {fmt(m.maj_at_n, 1, True)} | {fmt(m.mean_completion_tokens, 0)} "
            f"| {_ci(m.tokens_vs_baseline, False, 0)} | {_reasoning_cell(m)} "
            f"| {fmt(m.no_think_end_rate, 1, True)} | {fmt(m.reasoning_word_rate, 2)} "
            f"| {_estimate_pct(m.repeated_ngram_share)} | {fmt(m.looped_rate, 1, True)} "
            f"| {fmt(m.no_answer_rate, 1, True)} | {m.n_errors} |"
        )
    return "\n".join(rows)


def _estimate_pct(e: Estimate | None) -> str:
    """A share with its CI in percent; a dash when nothing was measured."""
    if e is None or e.n == 0:
        return "–"
    return f"{fmt(e.mean, 1, True)} [{fmt(e.lo, 1, True)}, {fmt(e.hi, 1, True)}]"


DEGENERATION_NOTE = (
    f"Degeneration: *repeated {DEGENERATION_N}-grams* = per completion, the share of its "
    f"whitespace-word {DEGENERATION_N}-grams that repeat one seen earlier in the same "
    "completion (0 = none; near 100 = a loop), mean over samples then problems, 95% bootstrap "
    "CI over problems; *looped* = share of completions whose last quarter is at least 90% "
    "repeats. A reasoning-word rate that rises together with these is a model repeating "
    'itself ("Wait, wait, wait"), not reasoning more.'
)


def _reasoning_cell(m: SpecMetrics) -> str:
    """Mean reasoning tokens; ``≈`` marks a mean that includes character estimates."""
    cell = fmt(m.mean_reasoning_tokens, 0)
    return f"≈{cell}" if m.reasoning_estimated and cell != "–" else cell


def reasoning_note(records: Sequence[SampleRecord], think_end_id: Any) -> str:
    """How the reasoning tokens of these samples were counted, in one sentence."""
    ok = [r for r in records if r.ok]
    from_ids = sum(r.reasoning_source == "token_ids" for r in ok)
    est = len(ok) - from_ids
    no_end = sum(not r.has_think_end for r in ok)
    parts = []
    if from_ids:
        parts.append(
            f"{from_ids} sample(s) counted from the completion's token ids (tokens before the "
            f"first `</think>`, id {think_end_id})"
        )
    if est:
        parts.append(
            f"{est} sample(s) **estimated from characters** (≈ in the table: the endpoint "
            "returned no token ids, or no `</think>` id was known)"
        )
    text = "Reasoning tokens: " + ("; ".join(parts) or "no samples") + "."
    if no_end:
        text += (
            f" {no_end} sample(s) have no `</think>` (truncated, or a model that does not "
            "think): all their tokens count."
        )
    return text


def _spec_of(records: Sequence[SampleRecord]) -> dict[tuple[str, str], SteeringSpec | None]:
    out: dict[tuple[str, str], SteeringSpec | None] = {}
    for r in records:
        k = (r.dataset, r.spec_name)
        if k not in out:
            out[k] = SteeringSpec.from_json(r.spec) if r.spec else None
    return out


def plot_strength_curves(
    metrics: Sequence[SpecMetrics],
    specs: dict[tuple[str, str], SteeringSpec | None],
    out_dir: Path,
    *,
    baseline: str = BASELINE,
) -> list[Path]:
    """Per dataset: accuracy vs strength and length vs strength, one line per (feature, mode)."""
    # Figure objects, not pyplot: no global backend switch, no figure registry to close
    from matplotlib.figure import Figure

    paths: list[Path] = []
    datasets = list(dict.fromkeys(m.dataset for m in metrics))
    for ds in datasets:
        lines: dict[str, list[tuple[float, SpecMetrics]]] = {}
        base: SpecMetrics | None = None
        for m in metrics:
            if m.dataset != ds:
                continue
            if m.spec_name == baseline:
                base = m
                continue
            d = describe_single_feature(specs.get((ds, m.spec_name)))
            if d is None or m.n_samples == 0:
                continue
            sae, feat, mode, strength = d
            lines.setdefault(f"{sae}:{feat} ({mode})", []).append((strength, m))
        if not lines:
            continue
        out_dir.mkdir(parents=True, exist_ok=True)
        fig = Figure(figsize=(11, 4.2))
        ax_acc, ax_len = fig.subplots(1, 2)
        for label, pts in sorted(lines.items()):
            pts.sort(key=lambda t: t[0])
            xs = [p[0] for p in pts]
            ax_acc.plot(xs, [100 * p[1].pass_at_1 for p in pts], marker="o", label=label)
            ax_len.plot(xs, [p[1].mean_completion_tokens for p in pts], marker="o", label=label)
        if base is not None:
            ax_acc.axhline(100 * base.pass_at_1, color="gray", ls="--", label="baseline")
            ax_len.axhline(base.mean_completion_tokens, color="gray", ls="--", label="baseline")
        ax_acc.set(
            xlabel="strength (x max activation)", ylabel="pass@1 (%)", title=f"{ds}: accuracy"
        )
        ax_len.set(
            xlabel="strength (x max activation)",
            ylabel="mean completion tokens",
            title=f"{ds}: length",
        )
        for ax in (ax_acc, ax_len):
            ax.grid(alpha=0.3)
        ax_len.legend(fontsize=8, loc="best")
        fig.tight_layout()
        p = out_dir / f"{_safe(ds)}_vs_strength.png"
        fig.savefig(p, dpi=110)
        paths.append(p)
    return paths


def _no_nan(x: Any) -> Any:
    """NaN (an empty group) becomes null: metrics.json stays strict JSON."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_no_nan(v) for v in x]
    return x


def _safe(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def write_report(
    out_dir: str | Path,
    records: Sequence[SampleRecord] | None = None,
    *,
    baseline: str = BASELINE,
    spec_errors: dict[str, str] | None = None,
    seed: int = 0,
    plots: bool = True,
) -> Report:
    """Write ``summary.md``, ``metrics.json`` and ``plots/*.png`` into ``out_dir``.

    ``records`` defaults to every record of ``out_dir/samples.jsonl``.
    """
    out = Path(out_dir)
    if records is None:
        records = list(read_log(out / SAMPLES_FILE).records.values())
    errors = dict(spec_errors or {})
    for r in records:
        if r.error_kind == "spec_rejected" and r.error and not r.error.startswith("not sent"):
            errors.setdefault(r.spec_name, r.error)
    metrics = compute_metrics(records, baseline=baseline, seed=seed)
    readout = readout_table(records, baseline=baseline, seed=seed)
    plot_paths = (
        plot_strength_curves(metrics, _spec_of(records), out / PLOTS_DIR, baseline=baseline)
        if plots
        else []
    )

    cfg = read_config(out) or {}
    lines = ["# Steering sweep", ""]
    if cfg:
        keys = ("model", "prompt", "temperature", "top_p", "max_tokens", "samples", "seed", "stop")
        lines.append(", ".join(f"{k}={cfg.get(k)}" for k in keys if k in cfg))
        if cfg.get("judge"):
            j = cfg["judge"]
            judged = sum(r.judge_verdict is not None for r in records)
            lines.append(
                f"LLM judge `{j.get('model')}` at {j.get('url')} decided {judged} sample(s) "
                "math-verify could not parse (verdicts in samples.jsonl)."
            )
        lines.append("")
    lines += [
        markdown_table(metrics),
        "",
        "pass@1: mean over samples, then problems. Δ: paired over problems against "
        f"`{baseline}`, 95% percentile bootstrap (2000 resamples, seed {seed}). Tokens: "
        "completion tokens from the server's usage. Errors are excluded from all rates.",
        "",
        reasoning_note(records, cfg.get("think_end_id")),
        "",
        DEGENERATION_NOTE,
        "",
    ]
    if readout:
        lines += ["## Watched features (readout)", "", readout_markdown(readout), ""]
        lines += [READOUT_NOTE.format(baseline=baseline), ""]
    if errors:
        lines += ["## Rejected specs", ""]
        lines += [f"- `{n}`: {msg}" for n, msg in errors.items()]
        lines.append("")
    if plot_paths:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({PLOTS_DIR}/{p.name})" for p in plot_paths]
        lines.append("")
    summary = out / SUMMARY_FILE
    atomic_write(summary, "\n".join(lines))
    mjson = out / METRICS_FILE
    payload: dict[str, Any] = {
        "metrics": [m.model_dump() for m in metrics],
        "spec_errors": errors,
    }
    if readout:
        payload["readout"] = [r.model_dump() for r in readout]
    atomic_write(mjson, json.dumps(_no_nan(payload), indent=2) + "\n")
    return Report(metrics, summary, mjson, plot_paths, errors, readout)
