"""The brief SAE fine-tune of stage-wise model diffing, on the project's own trainer.

A copy of the SAE is put into the trainer's space (inputs scaled by the SAE's training
normalisation, weights scaled to match, so its features are unchanged), trained for a few
steps on one condition's activations with :class:`~sae_training.trainer.Trainer` (same
loss, sparsity rule, decoder constraint and checkpointing as ``sae-steer train``), and each
feature's decoder row and encoder column are compared before and after (cosine).

Architectures map onto the trainer's: ``standard`` -> standard (L1 without warm-up: the
features exist already), ``topk`` -> topk with the SAE's k, ``jumprelu`` -> batchtopk (how
sae-steer trains the JumpReLU SAEs it saves) with k from the SAE's ``metrics.json`` or, for
a JumpReLU trained elsewhere, its mean L0 on the reference condition. For the unit-norm
architectures (topk, batchtopk) decoder rows are normalised in training space before the
first step, as the trainer keeps them (a no-op for SAEs trained here).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import TRAIN_METRICS_FILE
from sae_steer_vllm.sae import SAE
from sae_training.activation_sources import ActivationSource
from sae_training.architectures import ARCHITECTURES
from sae_training.trainer import RunOptions, TrainConfig, Trainer

TRAINER_ARCH = {"standard": "standard", "topk": "topk", "jumprelu": "batchtopk"}
"""The trainer architecture that fine-tunes each saved SAE architecture."""
FALLBACK_LR = 1e-4
FALLBACK_L1 = 5.0


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything that decides a fine-tune's result besides the weights and the data."""

    architecture: str
    k: int | None
    l1_coeff: float
    lr: float
    steps: int
    batch_size: int
    scale: float
    """training-space input scale (inputs are multiplied by it)"""
    seed: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_record(sae_dir: Path) -> dict[str, Any]:
    """The SAE folder's ``metrics.json`` (written by ``sae-steer train``), or ``{}``."""
    try:
        obj = json.loads((Path(sae_dir) / TRAIN_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def settings_for(
    sae: SAE,
    record: dict[str, Any],
    ref_head: torch.Tensor,
    ref_l0: float,
    *,
    lr: float | None,
    l1_coeff: float | None,
    steps: int,
    batch_size: int,
    seed: int,
) -> FinetuneSettings:
    """The fine-tune settings for ``sae``: options first, then its training record, then
    the reference condition (``ref_head``, its first activations, for the input scale; its
    mean L0 for a JumpReLU trained elsewhere)."""
    arch = TRAINER_ARCH[sae.cfg.architecture]
    trained = record.get("config") if isinstance(record.get("config"), dict) else {}
    assert isinstance(trained, dict)
    k: int | None = None
    if arch == "topk":
        k = sae.cfg.k
    elif arch == "batchtopk":
        batch_rule = ("batchtopk", "matryoshka_batchtopk")
        rec_k = trained.get("k") if trained.get("architecture") in batch_rule else None
        k = int(rec_k) if isinstance(rec_k, int) else max(1, round(ref_l0))
        k = min(k, sae.cfg.d_sae)
    scale = record.get("normalisation_scale")
    if not isinstance(scale, (int, float)) or not scale > 0:
        x = sae.normalize_in(ref_head.to(sae.W_enc.device))
        scale = math.sqrt(sae.cfg.d_in) / float(x.norm(dim=-1).mean().clamp_min(1e-12))
    return FinetuneSettings(
        architecture=arch,
        k=k,
        l1_coeff=float(l1_coeff if l1_coeff is not None else trained.get("l1_coeff", FALLBACK_L1)),
        lr=float(lr if lr is not None else trained.get("lr", FALLBACK_LR)),
        steps=steps,
        batch_size=batch_size,
        scale=float(scale),
        seed=seed,
    )


@torch.no_grad()
def training_space(sae: SAE, s: FinetuneSettings) -> dict[str, torch.Tensor]:
    """The SAE's weights for inputs multiplied by ``s.scale`` (same feature activations),
    decoder rows unit-normalised (norm folded into the encoder) for unit-norm architectures."""
    t = {k: v.detach().float().cpu().clone() for k, v in sae.state_tensors().items()}
    W_enc, b_enc = t["W_enc"] / s.scale, t["b_enc"]
    W_dec, b_dec = t["W_dec"] * s.scale, t["b_dec"] * s.scale
    if ARCHITECTURES[s.architecture].unit_norm_decoder:
        n = W_dec.norm(dim=1).clamp_min(1e-8)
        W_dec = W_dec / n[:, None]
        W_enc = W_enc * n[None, :]
        b_enc = b_enc * n
    return {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec}


def train_config(sae: SAE, s: FinetuneSettings, n_tokens: int) -> TrainConfig:
    """The trainer's config for the fine-tune: constant lr, no warm-ups (the features exist)."""
    batch = min(s.batch_size, n_tokens)
    fields: dict[str, Any] = {
        "architecture": s.architecture,
        "d_sae": sae.cfg.d_sae,
        "k": s.k if s.k is not None else min(64, sae.cfg.d_sae),
        "l1_coeff": s.l1_coeff,
        "l1_warmup": 0.0,
        "lr": s.lr,
        "lr_warmup": 0.0,
        "lr_decay": 0.0,
        "batch_size": batch,
        "train_tokens": s.steps * batch,
        "norm_tokens": min(32768, n_tokens),
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "seed": s.seed,
    }
    return TrainConfig(**fields)


def finetune_cosines(
    sae: SAE, source: ActivationSource, s: FinetuneSettings, work_dir: Path, *, progress: bool
) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of ``sae`` on ``source`` (the SAE's inputs: resid_post, normalised
    as the SAE does); ``cos_dec`` / ``cos_enc`` per feature. A checkpoint in ``work_dir``
    (same settings, same data) is continued."""
    tcfg = train_config(sae, s, source.num_tokens)
    opts = RunOptions(progress=progress, log_every=max(1, s.steps), checkpoint_every=50)
    trainer = Trainer(tcfg, source, work_dir, opts)
    before = training_space(sae, s)
    if not trainer.resume():
        params = dict(trainer.sae.named_parameters())
        with torch.no_grad():
            for name, value in before.items():
                params[name].copy_(value.to(params[name].device))
        trainer.scale = s.scale
    result = trainer.train()
    after = {k: v.detach().float().cpu() for k, v in result.sae.state_dict().items()}
    return {
        "cos_dec": torch.nn.functional.cosine_similarity(before["W_dec"], after["W_dec"], dim=1),
        "cos_enc": torch.nn.functional.cosine_similarity(before["W_enc"], after["W_enc"], dim=0),
    }
