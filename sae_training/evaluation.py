"""Held-out evaluation of a trained SAE: reconstruction quality and LM loss spliced.

Both run on the raw-space :class:`~sae_steer_vllm.sae.SAE` that is saved, so
the numbers describe the file on disk, not the training-time module.

* Reconstruction: MSE, explained variance ``1 - sum|x - x_hat|^2 / sum|x - mean|^2``
  (1 - FVU), L0 and the fraction of features that never fire on the held-out set; EV
  and L0 also over the typical tokens (norm <= 10x the median).
* LM: next-token cross-entropy of the clean model, with the SAE reconstruction
  spliced into resid_post of the layer, and with that activation zeroed.
  ``ce_recovered = (ce_zero - ce_sae) / (ce_zero - ce_clean)`` and the mean
  KL(clean || spliced) per token. Splicing covers the kept (non-special)
  positions, the ones the SAE was trained on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from sae_steer_vllm.sae import SAE
from sae_training.lm import decoder_layers, model_device


@torch.no_grad()
def reconstruction_metrics(sae: SAE, acts: torch.Tensor, batch: int = 4096) -> dict[str, float]:
    """Reconstruction metrics over all tokens, and over the *typical* ones.

    Why both: a few "massive activation" tokens (norm > 10x the median; ~0.1% of
    layer-18 tokens of the default model) can hold most of the variance, so the plain
    EV mostly measures how well an SAE reconstructs them. ``explained_variance_typical``
    leaves them out (its own mean and variance), and says how the SAE does on the
    tokens steering usually acts on.
    """
    norms = acts.norm(dim=-1)
    typical = norms <= 10 * norms.median()
    mean = acts.mean(0)
    mean_t = acts[typical].mean(0) if typical.any() else mean
    resid = var = l0 = resid_t = var_t = l0_t = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    for i in range(0, acts.shape[0], batch):
        x = acts[i : i + batch]
        t = typical[i : i + batch]
        f = sae.encode(x)
        recon = sae.decode(f, x)
        err = (x - recon).pow(2).sum(-1)
        resid += float(err.sum())
        var += float((x - mean).pow(2).sum())
        resid_t += float(err[t].sum())
        var_t += float((x[t] - mean_t).pow(2).sum())
        active = f > 0
        l0 += float(active.sum())
        l0_t += float(active[t].sum())
        fired |= active.any(0)
    n = acts.shape[0]
    n_t = max(int(typical.sum()), 1)
    return {
        "mse": resid / n,
        "explained_variance": 1.0 - resid / max(var, 1e-12),
        "l0": l0 / n,
        "explained_variance_typical": 1.0 - resid_t / max(var_t, 1e-12),
        "l0_typical": l0_t / n_t,
        "typical_fraction": n_t / n,
        "dead_fraction": float((~fired).float().mean()),
        "eval_tokens": float(n),
    }


def _splice_hook(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    def hook(_m: torch.nn.Module, _i: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (edit(output[0]), *output[1:])
        return edit(output)

    return hook


@torch.no_grad()
def lm_metrics(
    model: torch.nn.Module,
    rows: torch.Tensor,
    keep: torch.Tensor,
    sae: SAE,
    layer: int,
    batch_rows: int = 4,
) -> dict[str, float]:
    """CE clean / spliced / zero-ablated, CE recovered and KL on ``rows [R, T]``."""
    block = decoder_layers(model)[layer]
    sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "kl": 0.0}
    count = 0
    for i in range(0, rows.shape[0], batch_rows):
        dev = model_device(model)
        ids = rows[i : i + batch_rows].to(dev)
        mask = keep[i : i + batch_rows].unsqueeze(-1).to(dev)
        targets = ids[:, 1:].reshape(-1)

        def run(
            edit: Callable[[torch.Tensor], torch.Tensor] | None, ids: torch.Tensor = ids
        ) -> torch.Tensor:
            h = block.register_forward_hook(_splice_hook(edit)) if edit else None
            try:
                logits = model(input_ids=ids, use_cache=False).logits
            finally:
                if h is not None:
                    h.remove()
            return logits[:, :-1].reshape(-1, logits.shape[-1]).float()

        clean = run(None)

        def splice(h: torch.Tensor, m: torch.Tensor = mask) -> torch.Tensor:
            return torch.where(m, sae.to(h.device)(h.float()).to(h.dtype), h)

        def ablate(h: torch.Tensor, m: torch.Tensor = mask) -> torch.Tensor:
            return torch.where(m, torch.zeros_like(h), h)

        spliced = run(splice)
        zero = run(ablate)
        logp_clean = F.log_softmax(clean, -1)
        logp_sae = F.log_softmax(spliced, -1)
        sums["clean"] += float(F.nll_loss(logp_clean, targets, reduction="sum"))
        sums["sae"] += float(F.nll_loss(logp_sae, targets, reduction="sum"))
        sums["zero"] += float(F.cross_entropy(zero, targets, reduction="sum"))
        sums["kl"] += float((logp_clean.exp() * (logp_clean - logp_sae)).sum())
        count += targets.numel()
    ce = {k: v / count for k, v in sums.items()}
    denom = ce["zero"] - ce["clean"]
    return {
        "ce_clean": ce["clean"],
        "ce_sae": ce["sae"],
        "ce_zero_ablation": ce["zero"],
        "ce_recovered": (ce["zero"] - ce["sae"]) / denom if abs(denom) > 1e-9 else float("nan"),
        "kl_to_clean": ce["kl"],
        "lm_eval_tokens": float(count),
    }
