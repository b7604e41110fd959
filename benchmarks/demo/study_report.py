"""The demo study's written form: plots and the Markdown report.

Everything here is drawn from the analysis (:mod:`benchmarks.demo.study`) and the
sweep's sample records, so the report can be rebuilt from ``samples.jsonl`` without
re-running generation.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from benchmarks.demo.report_format import fmt_ci as _ci
from benchmarks.demo.report_format import fmt_est as _est
from benchmarks.demo.report_format import fmt_num as _num
from benchmarks.demo.report_format import verdict as _verdict
from benchmarks.demo.scope_report import plot_scope, scope_section
from benchmarks.demo.study import (
    GROUPS,
    METRIC_LABELS,
    METRICS,
    GroupResult,
    StudyAnalysis,
    StudyDesign,
)
from benchmarks.readout import READOUT_NOTE, readout_markdown, readout_table
from benchmarks.results import SampleRecord
from benchmarks.sweep import BASELINE
from sae_steer_vllm.files import atomic_write


# ------------------------------------------------------------------ plots
def plot_study(design: StudyDesign, an: StudyAnalysis, out_dir: Path) -> list[Path]:
    """``study_metrics.png`` (pooled groups with CIs), ``study_per_feature.png`` and, with
    scope arms, ``study_scope.png``."""
    # Figure objects, not pyplot: no global backend switch, no figure registry to close
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    colors = {"top": "tab:red", "random": "tab:blue"}
    xs = design.strengths

    fig = Figure(figsize=(4.7 * len(METRICS), 4.2))
    axes = fig.subplots(1, len(METRICS))
    for ax, m in zip(axes, METRICS, strict=True):
        b = an.baseline.values[m]
        ax.axhspan(b.lo, b.hi, color="gray", alpha=0.2)
        ax.axhline(b.mean, color="gray", ls="--", label="no steering (95% CI band)")
        for group in GROUPS:
            grs = sorted((g for g in an.groups if g.group == group), key=lambda g: g.strength)
            mean = [g.values[m].mean for g in grs]
            err = [
                [g.values[m].mean - g.values[m].lo for g in grs],
                [g.values[m].hi - g.values[m].mean for g in grs],
            ]
            k = len(design.top if group == "top" else design.random)
            label = f"top-{k} ReasonScore" if group == "top" else f"{k} random features"
            dodge = 0.96 if group == "top" else 1.04  # both visible when they coincide
            ax.errorbar(
                [s * dodge for s in xs],
                mean,
                yerr=np.nan_to_num(np.asarray(err, dtype=float)),
                marker="o",
                capsize=4,
                color=colors[group],
                label=label,
            )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{s:g}" for s in xs])
        ax.set(xlabel=f"strength (x max activation, {design.mode})", title=METRIC_LABELS[m])
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="best")
    fig.suptitle(f"Steering study: {an.n_problems} problems, mean over problems with 95% CI")
    fig.tight_layout()
    p = out_dir / "study_metrics.png"
    fig.savefig(p, dpi=110)
    paths.append(p)

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    for ax, m in zip(axes, ("tokens", "word_rate"), strict=True):
        ax.axhline(an.baseline.values[m].mean, color="gray", ls="--", label="no steering")
        for a_group in GROUPS:
            feats = design.top if a_group == "top" else design.random
            for f in feats:
                rows = sorted(
                    (r for r in an.per_arm if r["group"] == a_group and r["feature"] == f),
                    key=lambda r: r["strength"],
                )
                ax.plot(
                    [r["strength"] for r in rows],
                    [r[m] for r in rows],
                    marker="o",
                    ls="-" if a_group == "top" else ":",
                    color=colors[a_group],
                    alpha=0.8,
                    label=f"{a_group} f{f}",
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{s:g}" for s in xs])
        ax.set(xlabel="strength", title=METRIC_LABELS[m] + " per feature")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    p = out_dir / "study_per_feature.png"
    fig.savefig(p, dpi=110)
    paths.append(p)
    if an.scope is not None:
        paths.append(plot_scope(an.scope, out_dir))
    return paths


# ------------------------------------------------------------------ report


def side_by_side(
    design: StudyDesign,
    records: Sequence[SampleRecord],
    strength: float,
    order: Sequence[str] = (),
) -> tuple[str, str, SampleRecord, SampleRecord] | None:
    """(arm name, problem id, unsteered, steered) for the first problem (in ``order``, then
    log order) where the top-1 feature at ``strength`` changed the completion, else the
    first problem; None without data."""
    arm = next(
        (a for a in design.arms if a.group == "top" and a.slot == 1 and a.strength == strength),
        None,
    )
    if arm is None:
        return None
    base = {r.problem_id: r for r in records if r.ok and r.spec_name == BASELINE}
    steered = {r.problem_id: r for r in records if r.ok and r.spec_name == arm.name}
    rank = {p: i for i, p in enumerate(order)}
    pids = sorted((p for p in base if p in steered), key=lambda p: rank.get(p, len(rank)))
    if not pids:
        return None
    pid = next((p for p in pids if base[p].completion != steered[p].completion), pids[0])
    return arm.name, pid, base[pid], steered[pid]


def readout_section(design: StudyDesign, records: Sequence[SampleRecord]) -> list[str]:
    """How each arm moved the watched top features during generation (runs whose server read
    them; nothing otherwise): the table, and per top feature at the middle strength which
    of the *other* watched features moved."""
    rows = readout_table(records)
    if not rows:
        return []
    L = [
        "",
        "### How steering one feature moves the others (readout)",
        "",
        f"Every request also read the top {len({r.feature for r in rows})} ReasonScore "
        "features of the SAE at each generated token. "
        + READOUT_NOTE.format(baseline=BASELINE).replace(f"`{BASELINE}`", "no steering"),
        "",
    ]
    mid = design.strengths[len(design.strengths) // 2]
    for a in design.arms:
        if a.strength != mid:
            continue
        others = [r for r in rows if r.spec_name == a.name and r.feature != a.feature]
        moved = ", ".join(
            f"{r.feature}: {_ci(r.mean_vs_baseline, 3)} ({_verdict(r.mean_vs_baseline)})"
            for r in others
        )
        if moved:
            L.append(
                f"- {a.group} feature {a.feature} at strength {a.strength:g}: mean activation "
                f"of the other watched features vs no steering: {moved}"
            )
    L += ["", readout_markdown(rows, dataset_column=False)]
    return L


def _sample_line(r: SampleRecord) -> str:
    """One completion's measures under its text in the side-by-side table."""
    share = r.repeated_ngram_share
    rep = "–" if share is None else f"{100 * share:.0f}%"
    loop = ", looped" if r.looped else ""
    return (
        f"{r.completion_tokens} tokens, {r.reasoning_words} reasoning words, "
        f"{rep} repeated 4-grams{loop}, {'correct' if r.correct else 'wrong'}"
    )


def _pre(text: str, max_chars: int) -> str:
    t = text if len(text) <= max_chars else text[:max_chars] + " […]"
    return f"<pre>{html.escape(t)}</pre>"


@dataclass
class ReportContext:
    """What the report says about the set-up (filled by the pipeline)."""

    model: str
    sae_path: str
    sae_summary: str
    score_summary: str
    dataset: str
    n_prompts: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    feature_notes: dict[int, str]
    problems: dict[str, str]
    links: dict[str, str]
    elapsed: dict[str, float]
    notes: list[str] = field(default_factory=list)
    distilled: bool = False
    """the model is the default model distilled on R1 traces (``sae-steer distill``)"""


def _model_caveat(ctx: ReportContext) -> str:
    if ctx.distilled:
        return (
            f"`{ctx.model}` is the 135M default model briefly distilled on R1 traces "
            "(`sae-steer distill`): it writes R1-style thinking with the reasoning vocabulary "
            "and sometimes closes it with `</think>`, but it is 60x smaller than the paper's "
            "model and solves almost none of these problems, so accuracy differences are "
            "measured at the floor with wide intervals."
        )
    return (
        f"`{ctx.model}` is a 135M-parameter chat model, not a reasoning model: it does not "
        "write `<think>` traces, rarely uses the reasoning vocabulary, and solves few of these "
        "problems, so accuracy differences are measured near the floor with wide intervals."
    )


def write_study_report(
    path: Path,
    design: StudyDesign,
    an: StudyAnalysis,
    records: Sequence[SampleRecord],
    plots: Sequence[Path],
    ctx: ReportContext,
) -> Path:
    """Write the Markdown report (plots referenced relative to ``path``)."""
    L: list[str] = []
    k = len(design.top)
    L += [
        "# Steering study: top ReasonScore features vs random features",
        "",
        f"Model `{ctx.model}`, SAE `{ctx.sae_path}` ({ctx.sae_summary}). {ctx.score_summary}",
        "",
        f"**Set-up.** {ctx.n_prompts} {ctx.dataset} problems with the eval's `default` prompt "
        '("Please reason step by step, and put your final answer within \\boxed{}.", a newline, '
        "the problem; DeepSeek-R1's usage note, not the paper's harness prompt), "
        f"max_tokens={ctx.max_tokens}, temperature={ctx.temperature:g}, top_p={ctx.top_p:g}, "
        f"subset/control seed={ctx.seed}, one sample per problem and arm. Arms: no steering; each of the top-{k} "
        f"ReasonScore features alone at strengths {', '.join(f'{s:g}' for s in design.strengths)} "
        f"(`{design.mode}`, target = strength x the feature's max activation, applied at every "
        f"position as in the paper); and {len(design.random)} random live features at the same "
        "strengths as a control. "
        f"{len(records)} completions in all ({an.n_errors} failed requests, excluded).",
        "",
        *[f"**Note.** {n}\n" for n in ctx.notes],
        "| group | feature | notes |",
        "|---|---|---|",
    ]
    for group, feats in (("top", design.top), ("random", design.random)):
        for f in feats:
            L.append(f"| {group} | {f} | {ctx.feature_notes.get(f, '')} |")
    L += [
        "",
        "## Results",
        "",
        "Means over problems with 95% bootstrap CIs; Δ = paired difference to no steering "
        "(same problems, same seed), 95% paired-bootstrap CI. Features of one group at one "
        "strength are pooled per problem. *cut* = share of completions that hit max_tokens. "
        "Degeneration beside the word rate: *repeated 4-grams* = share of a completion's "
        "word 4-grams that repeat one seen earlier in it (0 = none, near 100 = a loop); "
        "*looped* = share of completions whose last quarter is at least 90% repeats. A word "
        "rate that rises together with them is a model repeating itself, not reasoning more.",
        "",
        "| arm | strength | samples | cut % | looped % | length (tokens) | Δ length "
        "| reasoning words /100 tok | Δ words | repeated 4-grams % | Δ repeated (pts) "
        "| accuracy % | Δ accuracy (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def row(g: GroupResult, label: str) -> str:
        v, d = g.values, g.vs_baseline
        return (
            f"| {label} | {g.strength:g} | {g.n_samples} | {_num(100 * g.truncated, 0)} "
            f"| {_num(100 * g.looped, 0)} | {_est(v['tokens'], 0)} | {_ci(d.get('tokens'), 0)} "
            f"| {_est(v['word_rate'], 2)} | {_ci(d.get('word_rate'), 2)} "
            f"| {_est(v['repeat'], 1)} | {_ci(d.get('repeat'), 1)} "
            f"| {_est(v['accuracy'], 1)} | {_ci(d.get('accuracy'), 1)} |"
        )

    b = an.baseline
    L.append(
        f"| no steering | – | {b.n_samples} | {_num(100 * b.truncated, 0)} "
        f"| {_num(100 * b.looped, 0)} | {_est(b.values['tokens'], 0)} | "
        f"| {_est(b.values['word_rate'], 2)} | | {_est(b.values['repeat'], 1)} | "
        f"| {_est(b.values['accuracy'], 1)} | |"
    )
    for g in an.groups:
        L.append(row(g, f"top-{k} ReasonScore" if g.group == "top" else f"{k} random"))
    L += [
        "",
        "### Top features minus random features (paired per problem)",
        "",
        "| strength | Δ length | Δ reasoning words /100 tok | Δ repeated 4-grams (pts) "
        "| Δ accuracy (pts) |",
        "|---|---|---|---|---|",
    ]
    for s, d in an.top_minus_random.items():
        L.append(
            f"| {s:g} | {_ci(d.get('tokens'), 0)} | {_ci(d.get('word_rate'), 2)} "
            f"| {_ci(d.get('repeat'), 1)} | {_ci(d.get('accuracy'), 1)} |"
        )
    L += ["", "### What the numbers say", ""]
    for s in design.strengths:
        top = next(g for g in an.groups if g.group == "top" and g.strength == s)
        rnd = next(g for g in an.groups if g.group == "random" and g.strength == s)
        tmr = an.top_minus_random[s]
        L.append(
            f"- strength {s:g}: reasoning-word rate vs no steering — top features "
            f"{_verdict(top.vs_baseline.get('word_rate'))}, random features "
            f"{_verdict(rnd.vs_baseline.get('word_rate'))}; top vs random "
            f"{_verdict(tmr.get('word_rate'))}. Repeated 4-grams (degeneration): top "
            f"{_verdict(top.vs_baseline.get('repeat'))}, random "
            f"{_verdict(rnd.vs_baseline.get('repeat'))}; looped {_num(100 * top.looped, 0)}% "
            f"(top) vs {_num(100 * rnd.looped, 0)}% (random) vs "
            f"{_num(100 * an.baseline.looped, 0)}% unsteered. "
            f"Length: top {_verdict(top.vs_baseline.get('tokens'))}, "
            f"random {_verdict(rnd.vs_baseline.get('tokens'))}. Accuracy: top "
            f"{_verdict(top.vs_baseline.get('accuracy'))}, random "
            f"{_verdict(rnd.vs_baseline.get('accuracy'))}."
        )
    L += readout_section(design, records)
    scope_plot = next((p for p in plots if p.stem == "study_scope"), None)
    if an.scope is not None:
        L += scope_section(an.scope, design.mode, scope_plot, path.parent)
    L += [
        "",
        f"Caveats, stated plainly: {_model_caveat(ctx)} The SAE and the ReasonScore corpus "
        "are small (see above), features are ranked on R1-style traces the model did not "
        "write, and "
        f"each arm has one sample per problem on {an.n_problems} problems. Greedy or low-"
        "temperature decoding of a small model often loops until max_tokens (see *cut* and "
        "*looped*), which caps the length measure and can raise the word rate by repetition "
        "alone (see *repeated 4-grams*). This run demonstrates the pipeline (train → score → "
        "serve → steer → measure); it does not reproduce the paper's effect, whose model is "
        "60x larger and trained to reason at scale (see docs/paper_recipe.md for that recipe).",
        "",
        "## Plots",
        "",
    ]
    for p in plots:
        if p == scope_plot and an.scope is not None:
            continue  # shown in its own section
        rel = p.relative_to(path.parent) if p.is_relative_to(path.parent) else p
        L.append(f"![{p.stem}]({rel.as_posix()})")
        L.append("")
    L += [
        "## Per feature",
        "",
        "| arm | feature | strength | samples | cut % | looped % | length | words /100 tok "
        "| repeated 4-grams % | accuracy % |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in an.per_arm:
        L.append(
            f"| {r['arm']} | {r['feature']} | {r['strength']:g} | {r['n']} "
            f"| {_num(100 * r['truncated'], 0)} | {_num(100 * r['looped'], 0)} "
            f"| {_num(r['tokens'], 0)} | {_num(r['word_rate'], 2)} | {_num(r['repeat'], 1)} "
            f"| {_num(r['accuracy'], 1)} |"
        )
    mid = design.strengths[len(design.strengths) // 2]
    sbs = side_by_side(design, records, mid, list(ctx.problems))
    L += ["", "## One completion, unsteered and steered", ""]
    if sbs is None:
        L.append("(no pair of completions available)")
    else:
        arm_name, pid, base, steer = sbs
        problem = ctx.problems.get(pid, "")
        L += [
            f"Problem `{pid}` (gold answer {base.gold_answer}): {html.escape(problem[:600])}",
            "",
            '<table><tr><th width="50%">no steering</th>'
            f'<th width="50%">{html.escape(arm_name)}</th></tr>',
            f'<tr><td valign="top">{_pre(base.completion, 1500)}</td>'
            f'<td valign="top">{_pre(steer.completion, 1500)}</td></tr>',
            f"<tr><td>{_sample_line(base)}</td><td>{_sample_line(steer)}</td></tr></table>",
        ]
    L += ["", "## Files and timing", ""]
    for name, target in ctx.links.items():
        L.append(f"- {name}: `{target}`")
    if ctx.elapsed:
        L.append(
            "- wall time per step: "
            + ", ".join(f"{k} {v / 60:.1f} min" for k, v in ctx.elapsed.items())
        )
    L.append("")
    atomic_write(path, "\n".join(L))
    return path
