"""TopK SAE (Gao et al. 2024): keep the k largest pre-activations per token.

L0 is exactly k, so there is no penalty to tune. The decoder and every gradient
run on the k active features only (:mod:`sparse_ops`), which is where the speed
over a dense SAE comes from. Decoder rows are kept at unit norm, as in sparsify.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from sae_steer_vllm.sae import Architecture
from sae_training.architectures.base import ForwardOutput, TrainableSAE, mse_per_token
from sae_training.architectures.sparse_ops import Active, features_fired, sparse_decode, topk_encode


class TopKSAE(TrainableSAE):
    name: ClassVar[str] = "topk"
    saved_as: ClassVar[Architecture] = "topk"
    hparams: ClassVar[tuple[str, ...]] = ("k",)
    unit_norm_decoder: ClassVar[bool] = True

    def __init__(self, d_in: int, d_sae: int, *, k: int = 64, **kw: Any) -> None:
        super().__init__(d_in, d_sae, **kw)
        if not 0 < k <= d_sae:
            raise ValueError(f"k must be in [1, d_sae={d_sae}], got {k}")
        self.k = k

    def sparse_encode(self, x: torch.Tensor) -> Active:
        """The active features of each token (the k largest)."""
        return topk_encode(x, self.encoder_offset(), self.W_enc, self.b_enc, self.k)

    def extra_terms(self, vals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Architecture state updated from a batch's selected values, logged with the loss."""
        return {}

    def reconstruction_loss(
        self, a: Active, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """``(recon, loss, logged terms)`` for the active features ``a`` of batch ``x``
        (the seam where Matryoshka adds its nested losses)."""
        recon = sparse_decode(a, self.W_dec) + self.b_dec
        mse = mse_per_token(recon, x)
        return recon, mse, {"mse": mse.detach()}

    def training_forward(self, x: torch.Tensor, progress: float) -> ForwardOutput:
        a = self.sparse_encode(x)
        recon, loss, terms = self.reconstruction_loss(a, x)
        alive = a.vals > 0
        fired = features_fired(a.cols[alive], self.d_sae)
        return ForwardOutput(
            recon=recon,
            loss=loss,
            l0=alive.sum().float() / x.shape[0],
            fired=fired,
            terms={**terms, **self.extra_terms(a.vals)},
        )

    def inference_kwargs(self) -> dict[str, Any]:
        return {"k": self.k}
