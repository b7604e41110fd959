"""Scoring an explanation on held-out contexts, as delphi does: detection and fuzzing.

* detection: the held-out activating contexts (should fit) shuffled with as many
  non-activating ones as there are (should not), shown as plain text; the judge says
  for each whether the explanation fits it.
* fuzzing: each held-out activating context twice, once with its truly firing tokens
  marked (should fit) and once with the same number of non-firing tokens marked (should
  not; skipped when the context has too few non-firing tokens); the judge says whether
  the marks fit the explanation.

A score is the balanced accuracy (mean of the two classes' hit rates, 0.5 = chance) with a
95% interval: the Agresti-Caffo adjusted Wald interval for a mean of two proportions (one
success and one failure added to each class, normal approximation; honest at the 5-20
contexts per class a feature has), widened if needed to contain the point estimate and
clipped to [0, 1]. An answer of the judge that cannot be read counts as wrong for every
context it covered (never guessed); ``n_unclear`` counts such answers (prompts, not contexts).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.interpret.explain_prompts import Decode, firing_positions, render
from sae_training.features.contexts import FeatureContexts
from sae_training.features.explanations import ExplanationScore

Z95 = 1.959963984540054


@dataclass(frozen=True)
class JudgeItem:
    """One context as the judge sees it, and the verdict a perfect judge gives."""

    text: str
    fits: bool
    source: str
    """where it came from (``held_out 3``, ``non_activating 0``, ``held_out 3 decoy``)"""


def _rng(seed: int, kind: str, feature: int) -> random.Random:
    # a string seed is hashed with sha512: the same on every run and machine
    return random.Random(f"{seed}:{kind}:{feature}")


def detection_items(fc: FeatureContexts, decode: Decode, seed: int) -> list[JudgeItem]:
    """Held-out activating and non-activating contexts, plain text, in a seeded shuffle."""
    items = [JudgeItem(render(c, decode), True, f"held_out {i}") for i, c in enumerate(fc.held_out)]
    items += [
        JudgeItem(render(c, decode), False, f"non_activating {i}")
        for i, c in enumerate(fc.non_activating)
    ]
    _rng(seed, "detection", fc.feature).shuffle(items)
    return items


def fuzzing_items(fc: FeatureContexts, decode: Decode, seed: int) -> list[JudgeItem]:
    """Each held-out context with its firing tokens marked, and a decoy with as many
    seeded non-firing tokens marked, in a seeded shuffle."""
    rng = _rng(seed, "fuzzing", fc.feature)
    items = []
    for i, c in enumerate(fc.held_out):
        firing = firing_positions(c)
        if not firing:
            continue
        items.append(JudgeItem(render(c, decode, firing), True, f"held_out {i}"))
        silent = sorted(set(range(len(c.token_ids))) - set(firing))
        if len(silent) >= len(firing):
            decoy = rng.sample(silent, len(firing))
            items.append(JudgeItem(render(c, decode, decoy), False, f"held_out {i} decoy"))
    rng.shuffle(items)
    return items


def batches(items: Sequence[JudgeItem], size: int) -> list[list[JudgeItem]]:
    """Consecutive groups of ``size`` items (the last may be shorter): one prompt each."""
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


def balanced_accuracy_ci(
    hits_pos: int, n_pos: int, hits_neg: int, n_neg: int
) -> tuple[float, float, float]:
    """Balanced accuracy and its 95% interval (see the module docstring); both classes
    must be non-empty."""
    if n_pos <= 0 or n_neg <= 0:
        raise ValueError("balanced accuracy needs contexts of both classes")
    ba = (hits_pos / n_pos + hits_neg / n_neg) / 2
    p = (hits_pos + 1) / (n_pos + 2)
    q = (hits_neg + 1) / (n_neg + 2)
    centre = (p + q) / 2
    half = Z95 * 0.5 * math.sqrt(p * (1 - p) / (n_pos + 2) + q * (1 - q) / (n_neg + 2))
    lo = max(0.0, min(centre - half, ba))
    hi = min(1.0, max(centre + half, ba))
    return ba, lo, hi


def score_verdicts(
    batches_: Sequence[Sequence[JudgeItem]], verdicts: Sequence[list[int] | None]
) -> ExplanationScore | None:
    """Score the judge's verdicts (one list per batch, None = unreadable answer);
    None when a class has no contexts (nothing to balance)."""
    hits = {True: 0, False: 0}
    total = {True: 0, False: 0}
    unclear = 0
    for batch, answer in zip(batches_, verdicts, strict=True):
        if answer is None:
            unclear += 1
        for k, item in enumerate(batch):
            total[item.fits] += 1
            if answer is not None and bool(answer[k]) == item.fits:
                hits[item.fits] += 1
    if total[True] == 0 or total[False] == 0:
        return None
    ba, lo, hi = balanced_accuracy_ci(hits[True], total[True], hits[False], total[False])
    return ExplanationScore(
        balanced_accuracy=ba,
        ci_low=lo,
        ci_high=hi,
        n_positive=total[True],
        n_negative=total[False],
        n_unclear=unclear,
    )
