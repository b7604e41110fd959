"""What an explain run shows a person: the score distribution, a histogram and summary.md."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.interpret.explainer import ExplainRun
from benchmarks.metrics import bootstrap_mean
from sae_steer_vllm.constants import EXPLAIN_SCORES_PLOT, SUMMARY_FILE
from sae_steer_vllm.files import atomic_write
from sae_training.features.explanations import FeatureExplanation

Method = Literal["detection", "fuzzing"]
METHODS: tuple[Method, ...] = ("detection", "fuzzing")


@dataclass(frozen=True)
class Distribution:
    """One method's balanced accuracies over the scored features."""

    n: int
    mean: float
    ci_low: float
    """95% percentile-bootstrap interval of the mean over features (n >= 2; inside the
    scores' range, so inside [0, 1], however few features there are)"""
    ci_high: float
    median: float
    q25: float
    q75: float

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def distribution(values: Sequence[float]) -> Distribution | None:
    """Mean with its 95% interval, median and quartiles; None without values."""
    if not values:
        return None
    v = sorted(values)
    est = bootstrap_mean(v) if len(v) > 1 else None
    qs = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return Distribution(
        n=len(v),
        mean=statistics.fmean(v),
        ci_low=est.lo if est is not None else math.nan,
        ci_high=est.hi if est is not None else math.nan,
        median=statistics.median(v),
        q25=qs[0],
        q75=qs[2],
    )


def scores_of(done: Sequence[FeatureExplanation], method: Method) -> list[float]:
    return [s.balanced_accuracy for e in done if (s := getattr(e, method)) is not None]


def plot_scores(done: Sequence[FeatureExplanation], path: Path) -> Path | None:
    """Histogram of both methods' balanced accuracies (chance marked); None without scores."""
    # Figure objects, not pyplot: no global backend switch, no figure registry to close
    from matplotlib.figure import Figure

    data = {m: scores_of(done, m) for m in METHODS}
    if not any(data.values()):
        return None
    fig = Figure(figsize=(7, 3.6))
    ax = fig.subplots()
    bins = [i / 20 for i in range(21)]
    for m, colour in zip(METHODS, ("tab:blue", "tab:orange"), strict=True):
        if data[m]:
            ax.hist(data[m], bins=bins, alpha=0.6, color=colour, label=f"{m} (n={len(data[m])})")
    ax.axvline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_xlabel("balanced accuracy on held-out contexts")
    ax.set_ylabel("features")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _interval(d: Distribution) -> str:
    """``[lo, hi]``, or ``(one feature: no interval)`` where the spread is unknown."""
    if d.n < 2:
        return "(one feature: no interval)"
    return f"[{d.ci_low:.3f}, {d.ci_high:.3f}]"


def _fmt(s: Any) -> str:
    if s is None:
        return "–"
    return f"{s.balanced_accuracy:.2f} [{s.ci_low:.2f}, {s.ci_high:.2f}]"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_summary(
    out_dir: Path,
    run: ExplainRun,
    meta: dict[str, Any],
    explanations_file: Path,
) -> Path:
    """``summary.md`` (and the histogram) in ``out_dir``: settings, distribution, features."""
    done = run.done
    plot = plot_scores(done, out_dir / EXPLAIN_SCORES_PLOT)
    lines = ["# Feature explanations", ""]
    lines.append(f"- explanations: `{explanations_file}`")
    keys = ("explainer", "llm_url", "constrained", "stats", "selection", "n_explain", "n_held_out")
    for k in keys:
        if k in meta:
            lines.append(f"- {k}: {meta[k]}")
    lines.append(f"- scoring: {meta.get('scoring', '')}")
    lines.append(
        f"- requests sent: {run.requests_made}; answers re-used from the log: {run.answers_reused}"
    )
    counts = {s: len(run.with_status(s)) for s in ("done", "no_contexts", "no_explanation")}
    counts["remaining"] = len(run.with_status("remaining"))
    counts["failed"] = len(run.with_status("failed"))
    lines.append("- features: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    lines += ["", "## Distribution over features", ""]
    lines.append("| method | n | mean [95% CI] | median | quartiles |")
    lines.append("|---|---:|---|---:|---|")
    for m in METHODS:
        d = distribution(scores_of(done, m))
        if d is None:
            lines.append(f"| {m} | 0 | – | – | – |")
        else:
            lines.append(
                f"| {m} | {d.n} | {d.mean:.3f} {_interval(d)} | "
                f"{d.median:.3f} | {d.q25:.3f} – {d.q75:.3f} |"
            )
    lines.append("")
    lines.append("Balanced accuracy: 0.5 is chance; delphi reports roughly 0.7-0.85 for good SAEs.")
    if plot is not None:
        lines += ["", f"![scores]({plot.name})"]
    lines += ["", "## Features", ""]
    lines.append("| feature | explanation | detection [95% CI] | fuzzing [95% CI] | unclear |")
    lines.append("|---:|---|---|---|---:|")
    for e in done:
        unclear = sum(s.n_unclear for s in (e.detection, e.fuzzing) if s is not None)
        lines.append(
            f"| {e.feature} | {_cell(e.explanation)} | {_fmt(e.detection)} | "
            f"{_fmt(e.fuzzing)} | {unclear} |"
        )
    not_done = [o for o in run.outcomes if o.status != "done"]
    if not_done:
        lines += ["", "## Not explained", ""]
        for o in not_done:
            lines.append(
                f"- feature {o.feature}: {o.status}" + (f" ({o.error})" if o.error else "")
            )
    return atomic_write(out_dir / SUMMARY_FILE, "\n".join(lines) + "\n")
