"""The demo's steering study: which arms to run, and what they measured.

Design (why each choice):

* arms: no steering; each of the top-K ReasonScore features alone at strengths 1, 2, 4 in
  ``clamp`` mode (the paper's intervention, strength x the feature's max activation); and K
  random *live* features (max activation > 0, not among the top-K) at the same strengths as
  a control. A dead random feature would make ``strength x 0`` a no-op and flatter the top
  features, so dead ones are excluded.
* statistics: every arm is paired with the baseline on the same problems (same prompt,
  same seed), so differences are taken per problem and their 95% confidence intervals come
  from a paired bootstrap over problems (``benchmarks.metrics.paired_bootstrap``). The K
  features of one group at one strength are pooled per problem (mean over features), and
  "top minus random" is paired the same way.
* the measures: response length (completion tokens from the server), reasoning-word
  rate (the ReasonScore vocabulary per 100 completion tokens, as the eval harness counts
  it), degeneration beside it (the share of repeated word 4-grams, as the eval harness
  measures it, and the share of looped completions: a word rate raised by a loop is not more
  reasoning) and accuracy (the harness's grader).
* where to steer: optionally the top-1 feature at one strength also steered only while
  thinking and only in the answer (:mod:`benchmarks.demo.scope`, its own analysis).

Everything here is computed from the sweep's sample records, so the report can be rebuilt
from ``samples.jsonl`` without re-running generation.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.demo.scope import (
    ScopeAnalysis,
    ScopeDesign,
    analyse_scope,
    make_scope,
    repeat_pct,
    scope_specs,
)
from benchmarks.metrics import CI, Estimate, bootstrap_mean, paired_bootstrap
from benchmarks.results import SampleRecord
from benchmarks.sweep import BASELINE, SpecMap, grid_name
from sae_steer_vllm.errors import SaeSteerError
from sae_steer_vllm.spec import FeatureIntervention, Mode, SteeringSpec


class StudyError(SaeSteerError, ValueError):
    """The study cannot be designed from this SAE (e.g. too few live features)."""


GROUPS = ("top", "random")


# ------------------------------------------------------------------ design
@dataclass(frozen=True)
class Arm:
    """One steered setting: ``group`` (top / random), the feature's slot in its group (1-based)."""

    name: str
    group: str
    slot: int
    feature: int
    strength: float


@dataclass
class StudyDesign:
    sae_name: str
    top: list[int]
    random: list[int]
    strengths: list[float]
    mode: Mode
    arms: list[Arm] = field(default_factory=list)
    scope: ScopeDesign | None = None
    """The where-to-steer arms (all / thinking / answer), when the study runs them."""

    def specs(self) -> SpecMap:
        """Baseline first, then every arm, then the scope arms (the sweep runs them in
        this order)."""
        out: SpecMap = {BASELINE: None}
        for a in self.arms:
            iv = FeatureIntervention(
                sae=self.sae_name, feature=a.feature, strength=a.strength, mode=self.mode
            )
            out[a.name] = SteeringSpec(interventions=[iv])
        if self.scope is not None:
            out.update(scope_specs(self.scope, self.sae_name, self.mode, out))
        return out


def choose_random_features(
    max_activation: Sequence[float], exclude: Sequence[int], k: int, seed: int
) -> list[int]:
    """``k`` seeded random features that fire somewhere (max activation > 0), not in ``exclude``."""
    excl = set(exclude)
    live = [i for i, m in enumerate(max_activation) if m > 0 and i not in excl]
    if len(live) < k:
        raise StudyError(
            f"only {len(live)} live features outside the top {len(excl)}: cannot pick {k} random ones"
        )
    return sorted(random.Random(seed).sample(live, k))


def make_design(
    sae_name: str,
    top: Sequence[int],
    random_features: Sequence[int],
    strengths: Sequence[float],
    mode: Mode = "clamp",
    *,
    scope_strength: float | None = None,
    think_markers: tuple[str, str] = ("", ""),
) -> StudyDesign:
    """The arms; with ``scope_strength``, also the top-1 feature at that strength steered
    only while thinking and only in the answer (``think_markers`` = the server's start and
    end marker, for the report), reusing the top-1 arm at that strength as ``all``."""
    d = StudyDesign(sae_name, list(top), list(random_features), list(strengths), mode)
    for group, feats in (("top", d.top), ("random", d.random)):
        for slot, f in enumerate(feats, 1):
            for s in d.strengths:
                name = grid_name(f, s, mode, f"{group}{slot}")
                d.arms.append(Arm(name, group, slot, f, float(s)))
    if scope_strength is not None and d.top:
        reuse = next(
            (
                a.name
                for a in d.arms
                if a.group == "top" and a.slot == 1 and a.strength == scope_strength
            ),
            None,
        )
        start, end = think_markers
        d.scope = make_scope(
            d.top[0], scope_strength, mode, start_marker=start, end_marker=end, all_arm=reuse
        )
    return d


# ------------------------------------------------------------------ analysis
METRICS = ("tokens", "word_rate", "repeat", "accuracy")
METRIC_LABELS = {
    "tokens": "response length (completion tokens)",
    "word_rate": "reasoning words per 100 tokens",
    "repeat": "repeated 4-grams (%)",
    "accuracy": "accuracy (%)",
}


@dataclass
class GroupResult:
    """One (group, strength) pooled over its features, or the baseline (group 'baseline')."""

    group: str
    strength: float
    features: list[int]
    n_samples: int
    truncated: float  # fraction that hit max_tokens
    values: dict[str, Estimate]
    vs_baseline: dict[str, CI | None]
    looped: float = float("nan")
    """Share of completions stuck in a loop (:func:`benchmarks.metrics.is_looped`)."""


@dataclass
class StudyAnalysis:
    baseline: GroupResult
    groups: list[GroupResult]
    top_minus_random: dict[float, dict[str, CI | None]]
    per_arm: list[dict[str, Any]]
    n_problems: int
    n_errors: int
    scope: ScopeAnalysis | None = None


def _per_problem(recs: Sequence[SampleRecord]) -> dict[str, dict[str, float]]:
    """Per problem: mean tokens, pooled reasoning-word rate, repeated 4-gram share (%),
    accuracy (%)."""
    by: dict[str, list[SampleRecord]] = {}
    for r in recs:
        by.setdefault(r.problem_id, []).append(r)
    out: dict[str, dict[str, float]] = {}
    for pid, rs in by.items():
        toks = sum(r.completion_tokens for r in rs)
        out[pid] = {
            "tokens": float(np.mean([r.completion_tokens for r in rs])),
            "word_rate": 100.0 * sum(r.reasoning_words for r in rs) / toks if toks else 0.0,
            "repeat": repeat_pct(rs),
            "accuracy": 100.0 * float(np.mean([r.correct for r in rs])),
        }
    return out


def _group_result(
    group: str,
    strength: float,
    features: list[int],
    recs: Sequence[SampleRecord],
    base_pp: dict[str, dict[str, float]] | None,
    seed: int,
) -> tuple[GroupResult, dict[str, dict[str, float]]]:
    pp = _per_problem(recs)
    values = {m: bootstrap_mean([v[m] for v in pp.values()], seed=seed) for m in METRICS}
    vs: dict[str, CI | None] = {}
    if base_pp is not None:
        for m in METRICS:
            vs[m] = paired_bootstrap(
                {k: v[m] for k, v in pp.items()}, {k: v[m] for k, v in base_pp.items()}, seed=seed
            )
    trunc = float(np.mean([r.finish_reason == "length" for r in recs])) if recs else float("nan")
    flags = [r.looped for r in recs if r.looped is not None]
    looped = float(np.mean(flags)) if flags else float("nan")
    return GroupResult(group, strength, features, len(recs), trunc, values, vs, looped), pp


def analyse(design: StudyDesign, records: Sequence[SampleRecord], seed: int = 0) -> StudyAnalysis:
    """Pool, pair and bootstrap the study's records (errors are excluded and counted)."""
    ok = [r for r in records if r.ok]
    by_spec: dict[str, list[SampleRecord]] = {}
    for r in ok:
        by_spec.setdefault(r.spec_name, []).append(r)
    base_recs = by_spec.get(BASELINE, [])
    baseline, base_pp = _group_result("baseline", 0.0, [], base_recs, None, seed)
    groups: list[GroupResult] = []
    pooled_pp: dict[tuple[str, float], dict[str, dict[str, float]]] = {}
    for group in GROUPS:
        for s in design.strengths:
            arms = [a for a in design.arms if a.group == group and a.strength == s]
            # pool per problem: mean over the group's features of each feature's per-problem value
            per_feat = [_per_problem(by_spec.get(a.name, [])) for a in arms]
            pids = set.intersection(*(set(p) for p in per_feat)) if per_feat else set()
            pooled = {
                pid: {m: float(np.mean([p[pid][m] for p in per_feat])) for m in METRICS}
                for pid in pids
            }
            recs = [r for a in arms for r in by_spec.get(a.name, [])]
            gr, _ = _group_result(group, s, [a.feature for a in arms], recs, None, seed)
            gr.values = {
                m: bootstrap_mean([v[m] for v in pooled.values()], seed=seed) for m in METRICS
            }
            gr.vs_baseline = {
                m: paired_bootstrap(
                    {k: v[m] for k, v in pooled.items()},
                    {k: v[m] for k, v in base_pp.items()},
                    seed=seed,
                )
                for m in METRICS
            }
            groups.append(gr)
            pooled_pp[(group, s)] = pooled
    tmr: dict[float, dict[str, CI | None]] = {}
    for s in design.strengths:
        t_pp, r_pp = pooled_pp.get(("top", s), {}), pooled_pp.get(("random", s), {})
        tmr[s] = {
            m: paired_bootstrap(
                {k: v[m] for k, v in t_pp.items()}, {k: v[m] for k, v in r_pp.items()}, seed=seed
            )
            for m in METRICS
        }
    per_arm = []
    for a in design.arms:
        g, _ = _group_result(a.group, a.strength, [a.feature], by_spec.get(a.name, []), None, seed)
        per_arm.append(
            {
                "arm": a.name,
                "group": a.group,
                "feature": a.feature,
                "strength": a.strength,
                "n": g.n_samples,
                "truncated": g.truncated,
                "looped": g.looped,
                **{m: g.values[m].mean for m in METRICS},
            }
        )
    return StudyAnalysis(
        baseline=baseline,
        groups=groups,
        top_minus_random=tmr,
        per_arm=per_arm,
        n_problems=len(base_pp),
        n_errors=sum(1 for r in records if not r.ok),
        scope=analyse_scope(design.scope, records, seed) if design.scope else None,
    )
