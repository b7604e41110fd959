"""ReasonScore from per-feature means, exactly as ``reasonscore.md`` ("Score") defines it.

Inputs are the folded (``f_i * ||W_dec[i]||``) token-weighted means m_ij, mu+_i, mu-_i;
the streaming pass in :mod:`sae_training.features.stats_accumulator` produces them. Kept separate and
pure so the definition is readable in one place and testable without a model.

    p_ij    = m_ij / (sum_j' m_ij' + eps)
    H_i     = - sum_j p_ij ln p_ij          (p_ij = 0 terms contribute 0)
    Hn_i    = H_i / ln |R|                  (Hn_i = 1 if |R| = 1)
    Score_i = mu+_i / (sum_k mu+_k + eps) * Hn_i ** alpha  -  mu-_i / (sum_k mu-_k + eps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_ALPHA = 0.7
DEFAULT_EPS = 1e-12


@dataclass(frozen=True)
class ScoreParts:
    """ReasonScore and the pieces a person needs to judge it (all float64, ``[d_sae]``)."""

    score: torch.Tensor
    pos_term: torch.Tensor  # mu+_i / sum_k mu+_k
    neg_term: torch.Tensor  # mu-_i / sum_k mu-_k
    entropy_norm: torch.Tensor  # Hn_i
    group_share: torch.Tensor  # p_ij, [d_sae, |R|]


def reason_score(
    group_means: torch.Tensor,
    mu_pos: torch.Tensor,
    mu_neg: torch.Tensor,
    alpha: float = DEFAULT_ALPHA,
    eps: float = DEFAULT_EPS,
) -> ScoreParts:
    """Score every feature; ``group_means`` is ``[d_sae, |R|]`` and |R| counts all groups,
    including groups that never occurred in the corpus (their m_ij are 0)."""
    m = group_means.double()
    mu_pos = mu_pos.double()
    mu_neg = mu_neg.double()
    if m.ndim != 2 or m.shape[0] != mu_pos.shape[0] or mu_pos.shape != mu_neg.shape:
        raise ValueError(
            f"shape mismatch: group_means {tuple(m.shape)}, mu+ {tuple(mu_pos.shape)}, "
            f"mu- {tuple(mu_neg.shape)}"
        )
    n_groups = m.shape[1]
    p = m / (m.sum(dim=1, keepdim=True) + eps)
    plogp = torch.where(p > 0, p * torch.log(torch.where(p > 0, p, torch.ones_like(p))), 0.0)
    entropy = -plogp.sum(dim=1)
    if n_groups > 1:
        hn = entropy / math.log(n_groups)
    else:
        hn = torch.ones_like(entropy)
    # p_ij can exceed the simplex by rounding only; clamp keeps ** alpha real
    hn = hn.clamp(min=0.0)
    pos_term = mu_pos / (mu_pos.sum() + eps)
    neg_term = mu_neg / (mu_neg.sum() + eps)
    score = pos_term * hn**alpha - neg_term
    return ScoreParts(
        score=score, pos_term=pos_term, neg_term=neg_term, entropy_norm=hn, group_share=p
    )
