"""Matryoshka BatchTopK SAE (Bussmann et al. 2025; Nabeshima 2024), saved as JumpReLU.

BatchTopK's selection, but the loss sums the reconstruction error of every nested prefix of
the dictionary: features ``[0, w_1)`` alone must reconstruct the input, then ``[0, w_2)``,
... up to all ``d_sae``. Early features are pushed to be general and later ones to refine
them, which reduces *feature absorption* (a general feature such as "starts with a
reasoning word" going silent exactly where a more specific one, "Wait", fires). For
reasoning features that matters: absorption is what makes a feature look as if it missed
the tokens it should fire on. SAELens's ``MatryoshkaBatchTopKTrainingSAE`` has the same loss
(its outer level being the plain BatchTopK loss); as there, the result is saved as a JumpReLU
SAE, so the server clamps it like any other.

Speed: every active entry belongs to exactly one level, so the levels are decoded in one
sparse pass over (level, token) bags and summed with a ``cumsum``; the nested losses cost
about as much as BatchTopK's single one.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from sae_training.architectures.base import mse_per_token
from sae_training.architectures.batchtopk import BatchTopKSAE
from sae_training.architectures.sparse_ops import Active, crow_of, sparse_decode


def default_widths(d_sae: int) -> list[int]:
    """Four levels, each 4x the previous: ``d_sae/64, d_sae/16, d_sae/4, d_sae``
    (9,216 features: 144, 576, 2,304, 9,216); levels below 1 feature are left out."""
    return [w for w in (d_sae // 64, d_sae // 16, d_sae // 4) if w > 0] + [d_sae]


def check_widths(widths: list[int], d_sae: int) -> list[int]:
    """The levels as given, ending at ``d_sae`` (appended when missing, as SAELens does);
    anything else that is not strictly increasing within ``[1, d_sae]`` is an error."""
    if not widths:
        raise ValueError("matryoshka_widths must not be empty")
    if any(w <= 0 or w > d_sae for w in widths):
        raise ValueError(f"matryoshka_widths must lie in [1, d_sae={d_sae}], got {widths}")
    if any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"matryoshka_widths must be strictly increasing, got {widths}")
    return list(widths) if widths[-1] == d_sae else [*widths, d_sae]


class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    name: ClassVar[str] = "matryoshka_batchtopk"
    hparams: ClassVar[tuple[str, ...]] = ("k", "matryoshka_widths")

    def __init__(
        self, d_in: int, d_sae: int, *, matryoshka_widths: list[int] | None = None, **kw: Any
    ) -> None:
        super().__init__(d_in, d_sae, **kw)
        self.widths = check_widths(
            default_widths(d_sae) if matryoshka_widths is None else matryoshka_widths, d_sae
        )
        self.bounds: torch.Tensor
        self.register_buffer("bounds", torch.tensor(self.widths[:-1]), persistent=False)

    def level_reconstructions(self, a: Active) -> torch.Tensor:
        """``[levels, B, d_in]``: level ``l`` decodes the active features below ``widths[l]``.

        Entries are regrouped into (level, token) bags by a stable sort on the level (they
        stay in CSR order within a bag), decoded in one pass, and the levels' sums are
        accumulated with a ``cumsum``.
        """
        B, L = a.num_rows, len(self.widths)
        level = torch.bucketize(a.cols, self.bounds, right=True)
        order = torch.argsort(level, stable=True)
        bag = level[order] * B + a.rows()[order]
        counts = torch.bincount(bag, minlength=L * B)
        crow = crow_of(counts)
        by_feature = None
        if a.by_feature is not None:  # the same entries by feature, in their new positions
            new_pos = torch.empty_like(order)
            new_pos[order] = torch.arange(order.numel(), device=order.device)
            by_feature = new_pos[a.by_feature]
        parts = sparse_decode(Active(a.vals[order], a.cols[order], crow, by_feature), self.W_dec)
        return parts.view(L, B, -1).cumsum(0) + self.b_dec

    def reconstruction_loss(
        self, a: Active, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        recons = self.level_reconstructions(a)
        mses = [mse_per_token(r, x) for r in recons]
        terms = {f"mse_{w}": m.detach() for w, m in zip(self.widths[:-1], mses, strict=False)}
        return recons[-1], torch.stack(mses).sum(), {"mse": mses[-1].detach(), **terms}
