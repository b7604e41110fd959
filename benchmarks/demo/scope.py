"""Where to steer: the top feature at one strength at every position, only while thinking,
only in the answer (issue 15, "show that it matters").

Design (why each choice):

* arms: the top-1 ReasonScore feature at one strength (``scope_strength``) with the
  intervention's own ``positions`` set to ``thinking`` and to ``answer``; the ``all`` arm is
  the main study's top-1 arm at that strength when it has one (same spec, same samples),
  else a separate arm. Per-intervention ``positions`` (not the request's) is the issue's new
  per-intervention scope: the request could carry a readout or other features unscoped.
* phases are the server's: ``thinking`` is the generated tokens from the reasoning start up
  to and including the first end marker, ``answer`` the generated tokens after it (the
  prompt is never steered in either). A model without ``<think>``/``</think>`` tokens (the
  demo's SmolLM2) gets a stand-in end marker (docs/demo.md says which, and why).
* measures, paired per problem against no steering and against ``all`` (95% paired
  bootstrap, as in :mod:`benchmarks.demo.study`): length, thinking length (tokens before
  the marker; every token when it never came), reasoning-word rate, repeated word 4-grams
  (degeneration, as in :mod:`benchmarks.demo.study`), accuracy, the share of
  completions in which the marker appeared, and the share with an answer the grader can
  extract (a ``\\boxed{}``, which the prompt asks for, else a final "answer is X" line:
  :func:`benchmarks.grading.extract_answer`), the answer format's intactness. The question:
  does keeping steering out of the answer keep the answer format intact while the reasoning
  still lengthens?
* a check of the gate itself: greedy decoding makes the ``answer`` arm identical to no
  steering up to the marker (nothing before it is steered); the report counts the problems
  where it is.

Everything is computed from the sweep's sample records (``has_think_end`` and
``reasoning_tokens`` are exact when the study counted them from the completions' token ids
with the marker's id), so the section can be rebuilt from ``samples.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from benchmarks.grading import extract_answer
from benchmarks.metrics import CI, Estimate, bootstrap_mean, paired_bootstrap
from benchmarks.results import SampleRecord
from benchmarks.sweep import BASELINE, SpecMap, grid_name
from sae_steer_vllm.spec import FeatureIntervention, Mode, SteeringSpec

SCOPES = ("all", "thinking", "answer")
SCOPE_METRICS = (
    "tokens",
    "thinking_tokens",
    "word_rate",
    "repeat",
    "accuracy",
    "marker",
    "answered",
)
SCOPE_LABELS = {
    "tokens": "length (tokens)",
    "thinking_tokens": "thinking length (tokens before the marker)",
    "word_rate": "reasoning words /100 tok",
    "repeat": "repeated 4-grams %",
    "accuracy": "accuracy %",
    "marker": "marker appeared %",
    "answered": "extractable answer %",
}


# ------------------------------------------------------------------ design
@dataclass(frozen=True)
class ScopeArm:
    """The top feature at the scope strength, steered at ``scope`` positions."""

    name: str
    scope: str
    feature: int
    strength: float


@dataclass
class ScopeDesign:
    """The scope comparison of one study: its arms and the server's phase markers."""

    feature: int
    strength: float
    start_marker: str
    end_marker: str
    arms: list[ScopeArm] = field(default_factory=list)
    subject: str = ""
    """How the report names what is steered (default: the top ReasonScore feature at the
    strength); e.g. the paper's ``value`` clamp when the section is written for an eval run."""

    def arm(self, scope: str) -> ScopeArm:
        return next(a for a in self.arms if a.scope == scope)


def make_scope(
    feature: int,
    strength: float,
    mode: Mode,
    *,
    start_marker: str,
    end_marker: str,
    all_arm: str | None = None,
) -> ScopeDesign:
    """The three scope arms; ``all_arm`` names an existing arm that already steers
    ``feature`` at ``strength`` at every position (then it is reused, not run twice)."""
    d = ScopeDesign(feature, float(strength), start_marker, end_marker)
    for scope in SCOPES:
        name = all_arm if scope == "all" and all_arm else grid_name(feature, strength, mode)
        if not (scope == "all" and all_arm):
            name = f"top1-{scope}.{name}"
        d.arms.append(ScopeArm(name, scope, feature, float(strength)))
    return d


def scope_specs(design: ScopeDesign, sae_name: str, mode: Mode, existing: SpecMap) -> SpecMap:
    """The arms' specs that ``existing`` does not hold yet (the reused ``all`` arm is there)."""
    out: SpecMap = {}
    for a in design.arms:
        if a.name in existing:
            continue
        iv = FeatureIntervention(
            sae=sae_name,
            feature=a.feature,
            strength=a.strength,
            mode=mode,
            positions=None if a.scope == "all" else a.scope,  # type: ignore[arg-type]
        )
        out[a.name] = SteeringSpec(interventions=[iv])
    return out


# ------------------------------------------------------------------ analysis
def has_answer(text: str) -> bool:
    """The grader can extract an answer: a non-empty ``\\boxed{...}`` with balanced braces,
    else a final "answer is X" / "Answer: X" line."""
    return extract_answer(text) is not None


def marker_seen(r: SampleRecord, end_marker: str) -> bool:
    """Whether the completion holds the end marker: from its token ids when the study
    counted them (exact), else from its text."""
    if r.reasoning_source == "token_ids":
        return r.has_think_end
    return bool(end_marker) and end_marker in r.completion


def repeat_pct(recs: Sequence[SampleRecord]) -> float:
    """Mean repeated 4-gram share (%) of the records that have text to measure (the study's
    degeneration measure); NaN (shown as n/a) when none has."""
    vals = [r.repeated_ngram_share for r in recs if r.repeated_ngram_share is not None]
    return 100.0 * float(np.mean(vals)) if vals else float("nan")


def _per_problem(recs: Sequence[SampleRecord], end_marker: str) -> dict[str, dict[str, float]]:
    by: dict[str, list[SampleRecord]] = {}
    for r in recs:
        by.setdefault(r.problem_id, []).append(r)
    out: dict[str, dict[str, float]] = {}
    for pid, rs in by.items():
        toks = sum(r.completion_tokens for r in rs)
        out[pid] = {
            "tokens": float(np.mean([r.completion_tokens for r in rs])),
            "thinking_tokens": float(np.mean([r.reasoning_tokens for r in rs])),
            "word_rate": 100.0 * sum(r.reasoning_words for r in rs) / toks if toks else 0.0,
            "repeat": repeat_pct(rs),
            "accuracy": 100.0 * float(np.mean([r.correct for r in rs])),
            "marker": 100.0 * float(np.mean([marker_seen(r, end_marker) for r in rs])),
            "answered": 100.0 * float(np.mean([has_answer(r.completion) for r in rs])),
        }
    return out


def _paired(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]], seed: int
) -> dict[str, CI | None]:
    return {
        m: paired_bootstrap(
            {k: v[m] for k, v in a.items()}, {k: v[m] for k, v in b.items()}, seed=seed
        )
        for m in SCOPE_METRICS
    }


@dataclass
class ScopeResult:
    """One scope arm (or the baseline, scope ``none``): means and paired differences."""

    scope: str
    arm: str
    n_samples: int
    truncated: float
    values: dict[str, Estimate]
    vs_baseline: dict[str, CI | None]
    vs_all: dict[str, CI | None]


@dataclass
class ScopeAnalysis:
    design: ScopeDesign
    baseline: ScopeResult
    arms: list[ScopeResult]
    same_before_marker: tuple[int, int] | None
    """(problems where the ``answer`` arm equals no steering up to the marker, problems where
    no steering wrote it); None without an end marker."""
    marker_source: str
    """How the marker was found: ``token_ids`` (exact) or ``chars``."""


def _before_marker(text: str, marker: str) -> str | None:
    i = text.find(marker)
    return text[: i + len(marker)] if i >= 0 else None


def analyse_scope(
    design: ScopeDesign, records: Sequence[SampleRecord], seed: int = 0
) -> ScopeAnalysis:
    """Means with CIs per scope arm, paired against no steering and against ``all``."""
    ok = [r for r in records if r.ok]
    by_spec: dict[str, list[SampleRecord]] = {}
    for r in ok:
        by_spec.setdefault(r.spec_name, []).append(r)

    def result(scope: str, name: str) -> tuple[ScopeResult, dict[str, dict[str, float]]]:
        recs = by_spec.get(name, [])
        pp = _per_problem(recs, design.end_marker)
        values = {m: bootstrap_mean([v[m] for v in pp.values()], seed=seed) for m in SCOPE_METRICS}
        trunc = float(np.mean([r.finish_reason == "length" for r in recs])) if recs else np.nan
        return ScopeResult(scope, name, len(recs), float(trunc), values, {}, {}), pp

    baseline, base_pp = result("none", BASELINE)
    all_pp = result("all", design.arm("all").name)[1]
    arms = []
    for a in design.arms:
        res, pp = result(a.scope, a.name)
        res.vs_baseline = _paired(pp, base_pp, seed)
        res.vs_all = _paired(pp, all_pp, seed) if a.scope != "all" else {}
        arms.append(res)
    same = None
    if design.end_marker:
        base = {r.problem_id: r.completion for r in by_spec.get(BASELINE, [])}
        answer = {r.problem_id: r.completion for r in by_spec.get(design.arm("answer").name, [])}
        pairs = [
            (
                _before_marker(base[p], design.end_marker),
                _before_marker(answer[p], design.end_marker),
            )
            for p in base
            if p in answer
        ]
        with_marker = [(b, s) for b, s in pairs if b is not None]
        same = (sum(b == s for b, s in with_marker), len(with_marker))
    sources = {r.reasoning_source for r in ok}
    return ScopeAnalysis(
        design, baseline, arms, same, "token_ids" if sources == {"token_ids"} else "chars"
    )
