"""The contexts a feature is explained and judged on, read from its statistics file.

Three kinds, all collected by the same one streaming pass as the rest of the statistics
(:mod:`~sae_training.features.stats_accumulator`), so explaining needs no model run:

* ``explain``: the top-activating contexts (one per sequence), shown to the explainer;
* ``held_out``: activating contexts sampled uniformly over the feature's firing sequences,
  excluding the sequences shown to the explainer: what an explanation is scored on, so it
  is never judged on what it was written from, and not only on the strongest firings;
* ``non_activating``: corpus windows on which the feature is zero everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_training.errors import FeatureStatsError
from sae_training.features.context_sample import CONTEXT_TENSORS, hash_priority
from sae_training.features.feature_stats import FeatureStats

_NON_ACTIVATING_SALT = 0x27D4EB2F


@dataclass(frozen=True)
class Context:
    """A token window and the feature's raw activation on each token (0 where silent)."""

    token_ids: tuple[int, ...]
    acts: tuple[float, ...]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)


@dataclass(frozen=True)
class FeatureContexts:
    """The three kinds of context for one feature (see the module docstring)."""

    feature: int
    explain: tuple[Context, ...]
    held_out: tuple[Context, ...]
    non_activating: tuple[Context, ...]


def has_held_out_contexts(stats: FeatureStats) -> bool:
    """Whether the statistics file has the held-out and non-activating samples (files
    written before they existed have only the top examples)."""
    return all(name in stats.tensors for name in CONTEXT_TENSORS)


def _trimmed(tokens: list[int], acts: list[float]) -> Context:
    """The window without its -1 padding (outside the sequence) at either end."""
    lo, hi = 0, len(tokens)
    while lo < hi and tokens[lo] < 0:
        lo += 1
    while hi > lo and tokens[hi - 1] < 0:
        hi -= 1
    return Context(tuple(tokens[lo:hi]), tuple(float(a) for a in acts[lo:hi]))


def feature_contexts(
    stats: FeatureStats,
    feature: int,
    *,
    n_explain: int = 10,
    n_held_out: int = 10,
    n_non_activating: int = 10,
    seed: int = 0,
) -> FeatureContexts:
    """The three kinds of context of ``feature`` (module docstring), at most as many as asked
    of each: a rare feature has fewer, and none is ever invented.

    ``explain``: the first ``n_explain`` top examples (strongest first). ``held_out``: the
    sampled activating contexts in sample order, skipping every sequence ``explain`` shows.
    ``non_activating``: shared corpus windows where the feature's max is 0, in an order
    fixed by ``seed`` (and the feature), with all-zero activations.
    """
    if not has_held_out_contexts(stats):
        missing = [n for n in CONTEXT_TENSORS if n not in stats.tensors]
        raise FeatureStatsError(
            "these statistics have no held-out or non-activating contexts (missing "
            f"{', '.join(missing)}; written by an older sae-steer): re-run `sae-steer score`"
        )
    if not 0 <= feature < stats.d_sae:
        raise FeatureStatsError(f"feature {feature} is out of range (the SAE has {stats.d_sae})")
    if min(n_explain, n_held_out, n_non_activating) < 0:
        raise FeatureStatsError("context counts must be >= 0")
    t = stats.tensors
    explain: list[Context] = []
    shown: set[int] = set()
    for s in range(min(n_explain, int(t["top_values"].shape[1]))):
        if float(t["top_values"][feature, s]) <= 0 or int(t["top_seq"][feature, s]) < 0:
            continue
        explain.append(
            _trimmed(
                t["top_ctx_tokens"][feature, s].tolist(), t["top_ctx_acts"][feature, s].tolist()
            )
        )
        shown.add(int(t["top_seq"][feature, s]))
    held_out: list[Context] = []
    for s in range(int(t["sample_seq"].shape[1])):
        if len(held_out) >= n_held_out:
            break
        seq = int(t["sample_seq"][feature, s])
        if seq < 0 or seq in shown or float(t["sample_values"][feature, s]) <= 0:
            continue
        held_out.append(
            _trimmed(
                t["sample_ctx_tokens"][feature, s].tolist(),
                t["sample_ctx_acts"][feature, s].tolist(),
            )
        )
    silent = ((t["random_max"][feature] <= 0) & (t["random_seq"] >= 0)).nonzero().squeeze(1)
    order = hash_priority(
        torch.tensor(seed), torch.tensor(feature), silent, salt=_NON_ACTIVATING_SALT
    ).argsort(stable=True)
    non_activating = []
    for m in silent[order][:n_non_activating].tolist():
        tokens = t["random_ctx_tokens"][m].tolist()
        non_activating.append(Context(tuple(tokens), (0.0,) * len(tokens)))
    return FeatureContexts(feature, tuple(explain), tuple(held_out), tuple(non_activating))
