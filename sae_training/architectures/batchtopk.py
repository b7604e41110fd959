"""BatchTopK SAE (Bussmann et al. 2024), saved as a JumpReLU SAE.

Training keeps the ``k * B`` largest activations of the whole batch, so L0
averages k but varies per token. Inference cannot see a batch, so a single
threshold (an exponential moving average of the smallest activation kept)
replaces the batch rule; the saved file is a ``jumprelu`` SAE with that
threshold for every feature (as SAELens does), calibrated once training ends so
that the mean L0 on training activations is exactly k (:meth:`finalize`).

The sparse kernels of :mod:`sparse_ops` train it at TopK's speed: the batch's
selection is kept as a flat CSR list, a varying number of entries per token, unpadded.

Note for data parallelism: the batch rule sees only a rank's local batch, so
multi-process runs are not bitwise the 1-process run (topk and standard are).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from sae_steer_vllm.sae import Architecture
from sae_training.architectures.sparse_ops import Active, batchtopk_encode
from sae_training.architectures.topk import TopKSAE


class BatchTopKSAE(TopKSAE):
    """TopK with the batch's rule: the encoder and training step are TopK's but for
    :meth:`sparse_encode`; a running threshold is kept for inference."""

    name: ClassVar[str] = "batchtopk"
    saved_as: ClassVar[Architecture] = "jumprelu"

    def __init__(
        self, d_in: int, d_sae: int, *, k: int = 64, threshold_momentum: float = 0.99, **kw: Any
    ) -> None:
        super().__init__(d_in, d_sae, k=k, **kw)
        self.momentum = threshold_momentum
        self.threshold: torch.Tensor
        self.register_buffer("threshold", torch.tensor(-1.0))

    def sparse_encode(self, x: torch.Tensor) -> Active:
        return batchtopk_encode(x, self.encoder_offset(), self.W_enc, self.b_enc, self.k)

    def extra_terms(self, vals: torch.Tensor) -> dict[str, torch.Tensor]:
        """Move the running threshold towards the smallest activation the batch kept."""
        alive = vals > 0
        with torch.no_grad():
            if alive.any():
                smallest = vals[alive].min()
                t = self.threshold
                t.copy_(smallest if t < 0 else self.momentum * t + (1 - self.momentum) * smallest)
        return {"threshold": self.threshold.detach().clone()}

    @torch.no_grad()
    def finalize(self, sample: torch.Tensor, chunk: int = 1024) -> dict[str, float]:
        """Calibrate the inference threshold so that mean L0 on ``sample`` is exactly k.

        The threshold is the ``k * N``-th largest activation over the N sample tokens,
        i.e. the batch rule applied to one large batch. The running average of per-batch
        minima that training keeps lags behind the moving weights and averages over
        batches instead of pooling them: on the default recipe it gave L0 47 (not 64)
        on held-out text and EV 0.694. Found as :func:`batch_topk` finds its selection:
        each token's ``4k`` largest are candidates (memory ``4k * N`` floats), and a token
        whose smallest candidate reaches the threshold joins with its whole row.
        """
        n, keep = sample.shape[0], self.k * sample.shape[0]
        k1 = min(self.d_sae, 4 * self.k)
        cands = torch.cat(
            [
                torch.relu(self.pre_acts(sample[i : i + chunk])).topk(k1, dim=-1).values
                for i in range(0, n, chunk)
            ]
        )
        values = cands.reshape(-1)
        threshold = _kth_largest(values, keep)
        full = cands[:, -1] >= threshold  # topk is sorted: the last is each row's smallest
        if k1 < self.d_sae and bool(full.any()):
            rows = torch.relu(self.pre_acts(sample[full])).reshape(-1)
            threshold = _kth_largest(torch.cat([cands[~full].reshape(-1), rows]), keep)
        ema = float(self.threshold)
        self.threshold.fill_(threshold)
        return {"threshold_running": ema, "threshold_calibrated": float(self.threshold)}

    def inference_kwargs(self) -> dict[str, Any]:
        thr = float(self.threshold.clamp_min(0.0))
        return {"threshold": torch.full((self.d_sae,), thr)}


def _kth_largest(values: torch.Tensor, k: int) -> float:
    """The ``k``-th largest of ``values`` (their smallest when there are fewer)."""
    k = min(k, values.numel())
    return float(torch.kthvalue(values, values.numel() - k + 1).values)
