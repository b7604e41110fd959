"""The one tiny causal-LM builder: random weights, the default model's real tokenizer.

The tokenizer (and its chat template) decides how text splits into tokens and which
tokens are special, which the tests exercise; the weights only need to be deterministic
and small enough that a forward pass takes milliseconds and vLLM starts in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import torch

TINY_LAYER = 1
"""The layer the feature-finding tests read (of the 3-layer :func:`make_tiny_model`)."""


def default_tokenizer_dir() -> Path:
    from sae_steer_vllm.default_model import prepare_default_model

    return prepare_default_model()


def tiny_causal_lm(
    folder: Path,
    arch: Literal["llama", "qwen2"] = "llama",
    *,
    layers: int = 3,
    hidden: int = 64,
    max_positions: int = 1024,
    tie_embeddings: bool = True,
    seed: int = 0,
    with_pad_token: bool = False,
    weight_std: float | None = None,
    final_norm_range: tuple[float, float] | None = None,
) -> Path:
    """Save a random ``arch`` model (MLP width 2 x ``hidden``, 4 heads, 2 KV heads) plus the
    default model's tokenizer and chat template as an HF folder; an existing folder is reused.

    ``weight_std``: re-draw every matrix from N(0, std) (larger than the default init, so
    outputs visibly depend on steering). ``final_norm_range``: a non-trivial final norm
    weight, so a logit lens must apply it. ``with_pad_token``: the config names the
    tokenizer's pad id (its embedding row starts at zero).
    """
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[arch]
    cfg = config_cls(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if with_pad_token else None,
    )
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        if weight_std is not None:
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0, weight_std)
        if final_norm_range is not None:
            model.model.norm.weight.uniform_(*final_norm_range)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))
    template = default_tokenizer_dir() / "chat_template.jinja"
    if template.is_file() and not (folder / "chat_template.jinja").is_file():
        shutil.copy(template, folder / "chat_template.jinja")
    return folder


def make_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Feature-finding tests: 3 layers x 64 wide, with a non-trivial final norm."""
    return tiny_causal_lm(folder, seed=seed, with_pad_token=True, final_norm_range=(0.5, 1.5))


def make_tiny_llama(folder: Path, layers: int = 3, hidden: int = 32) -> Path:
    """Collection tests: ``layers`` x ``hidden``, short context."""
    return tiny_causal_lm(folder, layers=layers, hidden=hidden, max_positions=512)


def make_tiny_qwen2(folder: Path, *, seed: int = 0) -> Path:
    """Serving tests: a Qwen2 small enough to start vLLM in seconds, untied head."""
    return tiny_causal_lm(
        folder,
        "qwen2",
        layers=4,
        hidden=128,
        max_positions=2048,
        tie_embeddings=False,
        seed=seed,
        weight_std=0.08,
    )
