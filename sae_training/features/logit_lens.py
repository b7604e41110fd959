"""Logit lens of an SAE feature: which tokens its decoder direction promotes and suppresses.

Top and bottom tokens of ``(W_dec[i] * g) @ W_U^T`` where ``g`` is the final RMSNorm
weight. We apply ``g`` because a residual direction reaches the unembedding only through
that norm: ``g`` rescales each dimension and can change which tokens win. The norm's
division by the RMS is a positive per-token scalar and changes no ranking, so it is left
out. (Llama-style norms; models whose norm is ``1 + g`` would need that form.)
The unembedding is read straight from the model's safetensors, without building the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from sae_steer_vllm.sae import SAEFormatError

N_LENS = 10


def load_unembedding(model_path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W_U ``[vocab, d]``, final norm weight ``[d]`` or None) read straight from safetensors,
    without building the model: ``lm_head.weight``, or the embeddings when they are tied."""
    folder = Path(model_path)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        single = folder / "model.safetensors"
        if not single.is_file():
            raise SAEFormatError(f"{folder}: no model.safetensors (needed for the logit lens)")
        with safe_open(str(single), framework="pt") as f:
            weight_map = {k: single.name for k in f.keys()}  # noqa: SIM118

    def get(name: str) -> torch.Tensor:
        with safe_open(str(folder / weight_map[name]), framework="pt") as f:
            return f.get_tensor(name).float()

    for name in ("lm_head.weight", "model.embed_tokens.weight", "transformer.wte.weight"):
        if name in weight_map:
            W_U = get(name)
            break
    else:
        raise SAEFormatError(f"{folder}: no lm_head or embedding weights found")
    norm = None
    for name in ("model.norm.weight", "transformer.ln_f.weight"):
        if name in weight_map:
            norm = get(name)
            break
    return W_U, norm


def logit_lens(
    direction: torch.Tensor, W_U: torch.Tensor, norm_weight: torch.Tensor | None, n: int = N_LENS
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Top and bottom ``n`` (token id, logit) of a residual direction."""
    d = direction.float() * (norm_weight if norm_weight is not None else 1.0)
    logits = W_U @ d
    top = logits.topk(n)
    bot = (-logits).topk(n)
    return (
        list(zip(top.indices.tolist(), top.values.tolist(), strict=True)),
        list(zip(bot.indices.tolist(), (-bot.values).tolist(), strict=True)),
    )
