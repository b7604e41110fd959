"""The written form of the where-to-steer comparison (:mod:`benchmarks.demo.scope`): one plot
and the report section "Where to steer: all vs thinking vs answer"."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks.demo.report_format import fmt_ci as _ci
from benchmarks.demo.report_format import fmt_est as _est
from benchmarks.demo.report_format import fmt_num as _num
from benchmarks.demo.report_format import verdict as _verdict
from benchmarks.demo.scope import SCOPE_LABELS, ScopeAnalysis, ScopeResult

PLOT_METRICS = ("tokens", "thinking_tokens", "answered", "marker")
SCOPE_NAMES = {
    "none": "no steering",
    "all": "all positions",
    "thinking": "thinking only",
    "answer": "answer only",
}


def plot_scope(an: ScopeAnalysis, out_dir: Path) -> Path:
    """``study_scope.png``: per measure, no steering and the three scopes with 95% CIs."""
    from matplotlib.figure import Figure

    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [an.baseline, *an.arms]
    colors = {"none": "gray", "all": "tab:red", "thinking": "tab:purple", "answer": "tab:green"}
    fig = Figure(figsize=(15, 4.0))
    axes = fig.subplots(1, len(PLOT_METRICS))
    for ax, m in zip(axes, PLOT_METRICS, strict=True):
        for i, r in enumerate(rows):
            e = r.values[m]
            err = np.nan_to_num(np.asarray([[e.mean - e.lo], [e.hi - e.mean]], dtype=float))
            ax.bar(i, e.mean if e.mean == e.mean else 0.0, color=colors[r.scope], alpha=0.7)
            ax.errorbar(i, e.mean, yerr=err, color="black", capsize=4)
        ax.set_xticks(range(len(rows)), [SCOPE_NAMES[r.scope] for r in rows], rotation=20)
        ax.set_title(SCOPE_LABELS[m], fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    d = an.design
    fig.suptitle(
        f"Where to steer: feature {d.feature} at strength {d.strength:g}; "
        f"mean over problems with 95% CI (marker {d.end_marker!r})"
    )
    fig.tight_layout()
    p = out_dir / "study_scope.png"
    fig.savefig(p, dpi=110)
    return p


# metric, digits, whether the row shows a Δ column
_COLUMNS = (
    ("marker", 0, False),
    ("answered", 0, True),
    ("tokens", 0, True),
    ("thinking_tokens", 0, True),
    ("word_rate", 2, True),
    ("repeat", 1, True),
    ("accuracy", 1, True),
)


def _row(r: ScopeResult) -> str:
    cells = [SCOPE_NAMES[r.scope], f"`{r.arm}`", str(r.n_samples), _num(100 * r.truncated, 0)]
    for m, digits, delta in _COLUMNS:
        cells.append(_est(r.values[m], digits))
        if delta:
            cells.append("" if r.scope == "none" else _ci(r.vs_baseline.get(m), digits))
    return "| " + " | ".join(cells) + " |"


def scope_section(an: ScopeAnalysis, mode: str, plot: Path | None, report_dir: Path) -> list[str]:
    """Markdown lines of the section (table, differences to ``all``, the gate check, what
    it says, and the plot)."""
    d = an.design
    subject = d.subject or f"The top ReasonScore feature {d.feature} at strength {d.strength:g}"
    start = (
        f"the opening `{d.start_marker}` (the prompt's last one when the prompt opened the "
        "reasoning, else the first generated one)"
        if d.start_marker
        else "the first generated token"
    )
    prompt = (
        "the prompt is steered in neither, except in *thinking* from an opening marker it holds"
        if d.start_marker
        else "the prompt is steered in neither"
    )
    source = (
        "from the completions' token ids (exact)"
        if an.marker_source == "token_ids"
        else "from the completion text (the server returned no token ids)"
    )
    L = [
        "",
        "## Where to steer: all vs thinking vs answer",
        "",
        f"{subject} (`{mode}`), steered at every position (`all`, prompt included), "
        'only while thinking (the intervention\'s `"positions": "thinking"`) and only in the '
        f'answer (`"answer"`). *Thinking* = tokens from {start} up to and including the '
        f"first end marker `{d.end_marker}`; *answer* = generated tokens after it; {prompt}. "
        "The phases are the server's (`--think-start-marker "
        f"{d.start_marker!r} --think-end-marker {d.end_marker!r}`); a model without "
        "`<think>` tokens gets a stand-in end marker (docs/demo.md says which and why). "
        f"The marker was found {source}. *marker* = share of completions in which it "
        "appeared; *answer found* = share with an answer the grader can extract (a non-empty "
        '`\\boxed{}`, which the prompt asks for, else a final "answer is X" line: the answer '
        "format is intact); *thinking length* = tokens before the marker (all "
        "tokens when it never came); *repeated 4-grams* = share of a completion's word 4-grams "
        "that repeat an earlier one (degeneration: near 100 = a loop). Means with 95% CIs; "
        "Δ paired against no steering.",
        "",
        "| arm | spec name | samples | cut % | marker % | answer found % | Δ answer found (pts) "
        "| length | Δ length | thinking length | Δ thinking | words /100 tok | Δ words "
        "| repeated 4-grams % | Δ repeated (pts) | accuracy % | Δ accuracy (pts) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        _row(an.baseline),
        *[_row(r) for r in an.arms],
        "",
        "Thinking-only and answer-only minus all positions, paired per problem:",
        "",
        "| arm | Δ answer found (pts) | Δ length | Δ thinking length | Δ words /100 tok "
        "| Δ repeated 4-grams (pts) | Δ accuracy (pts) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in an.arms:
        if r.scope == "all":
            continue
        v = r.vs_all
        L.append(
            f"| {SCOPE_NAMES[r.scope]} | {_ci(v.get('answered'), 0)} | {_ci(v.get('tokens'), 0)} "
            f"| {_ci(v.get('thinking_tokens'), 0)} | {_ci(v.get('word_rate'), 2)} "
            f"| {_ci(v.get('repeat'), 1)} | {_ci(v.get('accuracy'), 1)} |"
        )
    L += ["", "What it says:", ""]
    for arm in an.arms:
        b = arm.vs_baseline
        L.append(
            f"- {SCOPE_NAMES[arm.scope]}: answer found vs no steering "
            f"{_verdict(b.get('answered'))}; thinking length {_verdict(b.get('thinking_tokens'))}; "
            f"length {_verdict(b.get('tokens'))}; reasoning words {_verdict(b.get('word_rate'))}; "
            f"repeated 4-grams {_verdict(b.get('repeat'))}; accuracy {_verdict(b.get('accuracy'))}."
        )
    if an.same_before_marker is not None:
        same, n = an.same_before_marker
        L.append(
            f"- The gate: the answer-only arm equals no steering up to and including the "
            f"marker in {same} of the {n} problems where no steering wrote it (greedy decoding; "
            "nothing before the marker is steered, so a difference means either steering "
            "leaked before the marker or the server's batch numerics flipped a greedy choice)."
        )
    if plot is not None:
        rel = plot.relative_to(report_dir) if plot.is_relative_to(report_dir) else plot
        L += ["", f"![{plot.stem}]({rel.as_posix()})"]
    return L
