"""``<out>/interpretation.md``: what the demo's interpretation steps found, in one page.

Each section reads the file its step's command wrote (the distill's check, the
explanations, the steering-effects table, the model diff) and says what the numbers show;
a step that was off or wrote nothing is said to be absent, never filled in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from benchmarks.demo.interpret_steps import InterpretOutputs
from benchmarks.interpret.explain_report import Distribution, distribution, scores_of
from sae_steer_vllm.constants import EXPLAIN_SCORES_PLOT, INTERPRETATION_REPORT
from sae_steer_vllm.files import atomic_write
from sae_training.features.explanations import (
    ExplanationScore,
    ExplanationsFile,
    read_explanations,
)


def _fmt_dist(d: Distribution | None) -> str:
    if d is None:
        return "–"
    ci = f" [{d.ci_low:.2f}, {d.ci_high:.2f}]" if d.n > 1 else ""
    return f"{d.mean:.2f}{ci} (n={d.n})"


def distill_section(check: dict[str, Any] | None, model: Path) -> list[str]:
    """Before/after the distill: share of completions closing ``</think>``, word rate, loss."""
    lines = ["## The reasoning model (`sae-steer distill`)", ""]
    if not check:
        return [*lines, f"The study ran on `{model}` (no distill check was found).", ""]
    before, after = dict(check.get("before") or {}), dict(check.get("after") or {})
    if before.get("held_out_loss") is None:
        before["held_out_loss"] = check.get("held_out_loss_before")
    rows = [
        ("completions closing `</think>`", "closed_think_share", "{:.0%}"),
        ("reasoning words per 100 tokens", "reasoning_word_rate", "{:.2f}"),
        ("held-out trace loss (nats/token)", "held_out_loss", "{:.3f}"),
    ]
    lines += [f"Model: `{model}`.", "", "| measure | base | distilled |", "|---|---|---|"]
    for label, key, fmt in rows:
        b, a = before.get(key), after.get(key)
        lines.append(
            f"| {label} | {fmt.format(b) if b is not None else '–'} | "
            f"{fmt.format(a) if a is not None else '–'} |"
        )
    n = after.get("n_problems") or before.get("n_problems")
    if n:
        lines += ["", f"Greedy completions of {n} held-out GSM8K problems."]
    return [*lines, ""]


def explain_section(data: ExplanationsFile | None, top: list[int], rand: list[int]) -> list[str]:
    """Top vs random features' explanation scores, and each feature's explanation."""
    lines = ["## Explanations (`sae-steer explain`)", ""]
    if data is None:
        return [*lines, "Not run.", ""]
    by = data.by_feature()
    how = (
        "its answers constrained to the form that is read (vLLM structured outputs), so every "
        "answer is readable"
        if data.meta.get("constrained")
        else "its answers free text (an unreadable judge answer counts as wrong)"
    )
    lines += [
        "Balanced accuracy on held-out contexts (0.5 = chance), mean over features with a 95% "
        "interval; the explainer and judge is the served model itself, a smoke-scale judge, "
        f"{how}.",
        "",
        "| features | detection | fuzzing |",
        "|---|---|---|",
    ]
    for name, group in (("top ReasonScore", top), ("random", rand)):
        done = [by[f] for f in group if f in by]
        lines.append(
            f"| {name} | {_fmt_dist(distribution(scores_of(done, 'detection')))} | "
            f"{_fmt_dist(distribution(scores_of(done, 'fuzzing')))} |"
        )
    lines += [
        "",
        "| feature | group | explanation | detection | fuzzing |",
        "|---|---|---|---|---|",
    ]
    for f in [*top, *rand]:
        e = by.get(f)
        if e is None:
            continue
        det, fuz = _score_cell(e.detection), _score_cell(e.fuzzing)
        text = e.explanation.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {f} | {'top' if f in top else 'random'} | {text} | {det} | {fuz} |")
    return [*lines, ""]


def _score_cell(s: ExplanationScore | None) -> str:
    """``0.62 [0.41, 0.80]``, saying how many judge answers could not be read."""
    if s is None:
        return "–"
    cell = f"{s.balanced_accuracy:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"
    if s.n_unclear:
        cell += f" ({s.n_unclear} unreadable answer{'s' if s.n_unclear > 1 else ''})"
    return cell


def _link(path: Path, root: Path) -> str:
    """``path`` as a Markdown link from a page in ``root`` (relative, so it works wherever
    the run folder is viewed or copied)."""
    return Path(os.path.relpath(path.resolve(), root.resolve())).as_posix()


def _included(title: str, path: Path | None) -> list[str]:
    lines = [f"## {title}", ""]
    if path is None or not path.is_file():
        return [*lines, "Not run.", ""]
    body = path.read_text().strip().splitlines()
    body = [("#" + ln) if ln.startswith("#") else ln for ln in body]  # nest its headings
    return [*lines, f"From `{path}`:", "", *body, ""]


def write_interpretation_report(
    root: Path,
    outs: InterpretOutputs,
    model: Path,
    distill_check: dict[str, Any] | None,
    sae_dir: Path,
    top: list[int],
    rand: list[int],
) -> Path | None:
    """Write ``<root>/interpretation.md`` when any interpretation step ran; its path or None."""
    if all(v is None for v in outs.__dict__.values()) and distill_check is None:
        return None
    lines = ["# Interpretation at CPU scale", ""]
    lines += distill_section(distill_check, model)
    explained = read_explanations(outs.explanations) if outs.explanations else None
    lines += explain_section(explained, top, rand)
    if outs.explain_summary is not None:
        hist = outs.explain_summary.parent / EXPLAIN_SCORES_PLOT
        if hist.is_file():
            lines += [f"![explanation scores]({_link(hist, root)})", ""]
    lines += _included("What steering does (`sae-steer explain --steering`)", outs.steering_table)
    lines += _included("Model diffing (`sae-steer diff`)", outs.diff_report)
    if outs.diff_plot is not None and outs.diff_plot.is_file():
        lines += [f"![model diff]({_link(outs.diff_plot, root)})", ""]
    lines += [f"SAE: `{sae_dir}`.", ""]
    return atomic_write(root / INTERPRETATION_REPORT, "\n".join(lines))
