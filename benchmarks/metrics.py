"""Per-(dataset, spec) metrics and paired comparisons with the baseline.

Definitions (also in docs/eval.md):

- pass@1: per problem, the fraction of its samples graded correct; averaged
  over problems.
- maj@n: per problem, the most common extracted answer (after light
  normalisation; ties go to the answer seen first) decides; samples without an
  answer do not vote.
- completion tokens: ``usage.completion_tokens`` from the server.
- reasoning tokens: the completion tokens before the first ``</think>``, counted from
  the completion's token ids (:mod:`benchmarks.think_tokens`). For endpoints that return
  no ids, the share is estimated by characters (``len(before)/len(all)``) and the sample
  says so. Without ``</think>`` every token counts as reasoning (a truncated trace).
- reasoning-word rate: occurrences of the ReasonScore vocabulary per 100
  completion tokens.
- repeated 4-grams (degeneration): per completion, the share of its word 4-grams that
  repeat a 4-gram seen earlier in the same completion (:func:`repeated_ngram_share`);
  averaged over samples, then problems. *looped*: the share of completions whose last
  quarter is almost all repeats (:func:`is_looped`). A steered model that loops on
  "Wait, wait" raises the word rate without reasoning more; these say when it does.
- difference to baseline: mean over problems of (spec - baseline), with a
  percentile bootstrap CI that resamples problems (paired) with a fixed seed.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict

from benchmarks.grading import normalize_for_vote

# the one reasoning-word counter (also behind `sae-steer distill`'s check), re-exported here
# as the eval's per-sample measure
from sae_training.features.vocabulary import count_reasoning_words as count_reasoning_words

THINK_END = "</think>"


# -------------------------------------------------------------- text measures
def split_reasoning(text: str) -> tuple[str, bool]:
    """(text before the first ``</think>``, whether there was one); all text if none."""
    i = text.find(THINK_END)
    if i < 0:
        return text, False
    return text[:i], True


def estimate_reasoning_tokens(text: str, completion_tokens: int) -> int:
    """Tokens before the first ``</think>``, estimated from the character share (the fallback
    for endpoints that return no token ids)."""
    before, found = split_reasoning(text)
    if not found or not text:
        return completion_tokens
    return int(round(completion_tokens * len(before) / len(text)))


# ------------------------------------------------------------ degeneration
DEGENERATION_N = 4
"""The n of the repeated n-gram share every report uses (word 4-grams)."""
LOOP_TAIL = 0.25
LOOP_THRESHOLD = 0.9
LOOP_MIN_NGRAMS = 16
"""Completions with fewer n-grams are never called looped (their tail is too short to tell)."""
MAX_WORD_CHARS = 8
"""Longer whitespace-free runs are cut into pieces of this many characters, so that a loop
written without spaces ("IIIII…", "WhatYouWhatYou…", which steered small models do write)
still shows as repeats instead of one long word."""


def words(text: str) -> list[str]:
    """A text's whitespace-separated words (case and punctuation kept), runs longer than
    :data:`MAX_WORD_CHARS` cut into pieces of that length."""
    out: list[str] = []
    for w in text.split():
        out += [w[i : i + MAX_WORD_CHARS] for i in range(0, len(w), MAX_WORD_CHARS)]
    return out


def _units(text_or_tokens: str | Sequence[str | int]) -> Sequence[str | int]:
    """The units n-grams are made of: a text's :func:`words`, or the given tokens.

    Words, not token ids, in every report: they are model-independent (two models with
    different tokenizers compare on one scale), need nothing but the stored completion text
    (old sample logs and endpoints that return no ids work), and are what a reader sees."""
    return words(text_or_tokens) if isinstance(text_or_tokens, str) else text_or_tokens


def repeat_flags(text_or_tokens: str | Sequence[str | int], n: int = DEGENERATION_N) -> list[bool]:
    """Per n-gram of the completion (in order): whether the same n-gram occurred earlier."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    units = _units(text_or_tokens)
    seen: set[tuple[str | int, ...]] = set()
    flags = []
    for i in range(len(units) - n + 1):
        gram = tuple(units[i : i + n])
        flags.append(gram in seen)
        seen.add(gram)
    return flags


def repeated_ngram_share(
    text_or_tokens: str | Sequence[str | int], n: int = DEGENERATION_N
) -> float:
    """The share of a completion's n-grams that repeat an n-gram seen earlier in it: 0 = no
    repetition, approaching 1 for a loop. A text (its :func:`words`) or a token sequence;
    fewer than ``n`` units have no n-gram and nothing repeated: 0."""
    flags = repeat_flags(text_or_tokens, n)
    return sum(flags) / len(flags) if flags else 0.0


def is_looped(text_or_tokens: str | Sequence[str | int], n: int = DEGENERATION_N) -> bool:
    """Stuck in a loop: at least :data:`LOOP_THRESHOLD` of the last :data:`LOOP_TAIL` of the
    completion's n-grams repeat an earlier n-gram. The final n-gram is left out (a completion
    cut at the token limit often ends in a fragment of the looped word); completions with
    fewer than :data:`LOOP_MIN_NGRAMS` n-grams besides it never count."""
    flags = repeat_flags(text_or_tokens, n)[:-1]
    if len(flags) < LOOP_MIN_NGRAMS:
        return False
    tail = flags[-math.ceil(LOOP_TAIL * len(flags)) :]
    return sum(tail) >= LOOP_THRESHOLD * len(tail)


# ------------------------------------------------------------------ samples
class GradedSample(BaseModel):
    """The part of a logged sample the metrics need."""

    problem_id: str
    sample_index: int
    correct: bool
    extracted_answer: str | None
    completion_tokens: int
    reasoning_tokens: int
    reasoning_words: int
    reasoning_estimated: bool = False
    has_think_end: bool = True
    repeated_ngram_share: float | None = None
    """:func:`repeated_ngram_share` of the completion; None: no completion text to measure."""
    looped: bool | None = None


class CI(BaseModel):
    diff: float
    lo: float
    hi: float
    n_problems: int


class Estimate(BaseModel):
    """A mean over problems with its 95% percentile-bootstrap interval."""

    model_config = ConfigDict(frozen=True)

    mean: float
    lo: float
    hi: float
    n: int


class SpecMetrics(BaseModel):
    dataset: str
    spec_name: str
    n_problems: int
    n_samples: int
    n_errors: int
    pass_at_1: float
    maj_at_n: float
    mean_completion_tokens: float
    mean_reasoning_tokens: float
    reasoning_word_rate: float
    no_answer_rate: float
    no_think_end_rate: float = float("nan")
    """Share of samples with no ``</think>`` (truncated: all their tokens count as reasoning)."""
    reasoning_estimated: int = 0
    """Samples whose reasoning tokens are a character estimate (the endpoint sent no ids)."""
    repeated_ngram_share: Estimate | None = None
    """Repeated word 4-grams: mean over samples, then problems, with a 95% bootstrap CI over
    problems (``n`` = 0 and NaN: no sample had text to measure)."""
    looped_rate: float = float("nan")
    """Share of the measured samples stuck in a loop (:func:`is_looped`)."""
    accuracy_vs_baseline: CI | None = None
    tokens_vs_baseline: CI | None = None


def _by_problem(samples: Iterable[GradedSample]) -> dict[str, list[GradedSample]]:
    out: dict[str, list[GradedSample]] = {}
    for s in samples:
        out.setdefault(s.problem_id, []).append(s)
    for v in out.values():
        v.sort(key=lambda s: s.sample_index)
    return out


def majority_correct(samples: Sequence[GradedSample]) -> bool:
    """Whether the majority answer of one problem's samples is correct."""
    votes: Counter[str] = Counter()
    first: dict[str, GradedSample] = {}
    for s in samples:
        if s.extracted_answer is None:
            continue
        key = normalize_for_vote(s.extracted_answer)
        votes[key] += 1
        first.setdefault(key, s)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(k for k in first if votes[k] == top)  # first-seen among the tied
    return first[winner].correct


def per_problem_accuracy(samples: Iterable[GradedSample]) -> dict[str, float]:
    return {
        pid: float(np.mean([s.correct for s in ss])) for pid, ss in _by_problem(samples).items()
    }


def per_problem_tokens(samples: Iterable[GradedSample]) -> dict[str, float]:
    return {
        pid: float(np.mean([s.completion_tokens for s in ss]))
        for pid, ss in _by_problem(samples).items()
    }


def per_problem_repetition(samples: Iterable[GradedSample]) -> dict[str, float]:
    """Per problem: the mean repeated 4-gram share of its measured samples (problems with
    none measured are left out)."""
    out: dict[str, float] = {}
    for pid, ss in _by_problem(samples).items():
        vals = [s.repeated_ngram_share for s in ss if s.repeated_ngram_share is not None]
        if vals:
            out[pid] = float(np.mean(vals))
    return out


def summarize(
    dataset: str,
    spec_name: str,
    samples: Sequence[GradedSample],
    n_errors: int = 0,
    *,
    seed: int = 0,
) -> SpecMetrics:
    """Metrics of one (dataset, spec) from its successfully answered samples."""
    groups = _by_problem(samples)
    looped = [s.looped for s in samples if s.looped is not None]
    nan = float("nan")
    tokens = sum(s.completion_tokens for s in samples)
    return SpecMetrics(
        dataset=dataset,
        spec_name=spec_name,
        n_problems=len(groups),
        n_samples=len(samples),
        n_errors=n_errors,
        pass_at_1=float(np.mean([np.mean([s.correct for s in g]) for g in groups.values()]))
        if groups
        else nan,
        maj_at_n=float(np.mean([majority_correct(g) for g in groups.values()])) if groups else nan,
        mean_completion_tokens=float(np.mean([s.completion_tokens for s in samples]))
        if samples
        else nan,
        mean_reasoning_tokens=float(np.mean([s.reasoning_tokens for s in samples]))
        if samples
        else nan,
        reasoning_word_rate=100.0 * sum(s.reasoning_words for s in samples) / tokens
        if tokens
        else nan,
        no_answer_rate=float(np.mean([s.extracted_answer is None for s in samples]))
        if samples
        else nan,
        no_think_end_rate=float(np.mean([not s.has_think_end for s in samples]))
        if samples
        else nan,
        reasoning_estimated=sum(s.reasoning_estimated for s in samples),
        repeated_ngram_share=bootstrap_mean(
            list(per_problem_repetition(samples).values()), seed=seed
        ),
        looped_rate=float(np.mean(looped)) if looped else nan,
    )


def paired_bootstrap(
    treated: dict[str, float],
    baseline: dict[str, float],
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> CI | None:
    """Mean paired difference (treated - baseline) over shared problems, with a bootstrap CI.

    Resampling problems (not samples) keeps each problem's two arms together,
    which is what makes small steering effects on a 20-problem set readable.
    """
    keys = sorted(set(treated) & set(baseline))
    if not keys:
        return None
    d = np.array([treated[k] - baseline[k] for k in keys], dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(d), size=(n_boot, len(d)))
    means = d[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return CI(diff=float(d.mean()), lo=float(lo), hi=float(hi), n_problems=len(keys))


def bootstrap_mean(values: Sequence[float], *, n_boot: int = 2000, seed: int = 0) -> Estimate:
    """Mean of per-problem values with a 95% percentile bootstrap that resamples problems
    (the unpaired twin of :func:`paired_bootstrap`, same seed convention). The values are
    sorted first, so the interval does not depend on their order: a report rebuilt from the
    log (in file order) equals the one written from the run (in completion order)."""
    x = np.sort(np.asarray(values, dtype=float))
    if x.size == 0:
        nan = float("nan")
        return Estimate(mean=nan, lo=nan, hi=nan, n=0)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [0.025, 0.975])
    return Estimate(mean=float(x.mean()), lo=float(lo), hi=float(hi), n=int(x.size))


def compare_to_baseline(
    metrics: SpecMetrics,
    samples: Sequence[GradedSample],
    baseline_samples: Sequence[GradedSample],
    *,
    seed: int = 0,
) -> SpecMetrics:
    """A copy of ``metrics`` with paired accuracy and length differences filled in."""
    acc = paired_bootstrap(
        per_problem_accuracy(samples), per_problem_accuracy(baseline_samples), seed=seed
    )
    tok = paired_bootstrap(
        per_problem_tokens(samples), per_problem_tokens(baseline_samples), seed=seed
    )
    return metrics.model_copy(update={"accuracy_vs_baseline": acc, "tokens_vs_baseline": tok})


def fmt(x: float, digits: int = 1, pct: bool = False) -> str:
    """Table formatting; NaN shows as a dash."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.{digits}f}" if pct else f"{x:.{digits}f}"
