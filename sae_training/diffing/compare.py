"""How ReasonScore's top features distribute over the diff classes, next to random features.

Per class: the share of the top-k features in it and the share of ``n`` random features
(drawn with a seeded generator from the non-dead features outside the top-k, so both sets
are features that fire somewhere), each with a Wilson 95% interval, and Fisher's exact
two-sided test of the 2x2 table (top-k vs random x in the class vs not). Small sets give
wide intervals; the report says so rather than reading much into a 2-of-30 difference.
"""

from __future__ import annotations

import math
import random
from typing import Any

from sae_training.diffing.classify import CLASSES

Z95 = 1.959963984540054


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion; ``(0, 1)`` when ``n`` is 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)  # exact at the bounds (rounding)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def fisher_exact(a: int, b: int, c: int, d: int) -> float:
    """Two-sided p-value of Fisher's exact test of ``[[a, b], [c, d]]``: the summed
    probability of every table with the same margins that is no more likely than this one."""
    row1, col1, n = a + b, a + c, a + b + c + d
    lo, hi = max(0, row1 + col1 - n), min(row1, col1)

    def prob(x: int) -> float:
        return math.comb(col1, x) * math.comb(n - col1, row1 - x) / math.comb(n, row1)

    p_obs = prob(a)
    total = sum(p for x in range(lo, hi + 1) if (p := prob(x)) <= p_obs * (1 + 1e-9))
    return min(1.0, total)


def random_features(classes: list[str], exclude: list[int], n: int, seed: int) -> list[int]:
    """``n`` features drawn without replacement from the non-dead ones not in ``exclude``."""
    skip = set(exclude)
    pool = [i for i, c in enumerate(classes) if c != "dead" and i not in skip]
    return sorted(random.Random(seed).sample(pool, min(n, len(pool))))


def compare(classes: list[str], top: list[int], rand: list[int]) -> dict[str, dict[str, Any]]:
    """Per class: counts, shares with Wilson intervals, Fisher's p (top vs random)."""
    out: dict[str, dict[str, Any]] = {}
    alive = [c for c in classes if c != "dead"]
    for key in CLASSES:
        t = sum(1 for i in top if classes[i] == key)
        r = sum(1 for i in rand if classes[i] == key)
        out[key] = {
            "top": t,
            "top_share": t / len(top) if top else 0.0,
            "top_ci": wilson(t, len(top)),
            "random": r,
            "random_share": r / len(rand) if rand else 0.0,
            "random_ci": wilson(r, len(rand)),
            "all_alive_share": (sum(1 for c in alive if c == key) / len(alive)) if alive else 0.0,
            "fisher_p": fisher_exact(t, len(top) - t, r, len(rand) - r),
        }
    return out
