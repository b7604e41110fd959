"""Shared helpers for the training tests: synthetic activations and a tiny Llama.

Synthetic data is a known sparse code (a few of ``m`` random unit directions
per token), so an SAE that learns anything reaches a high explained variance
within a few hundred steps. The tiny Llama uses the default model's tokenizer
(real chat template, real special tokens) with random 2-layer weights, which
keeps collection tests to seconds.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.default_model import default_model_dir


def synthetic_acts(
    n: int = 8192, d: int = 32, m: int = 96, k: int = 3, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.randint(0, m, (n, k), generator=g)
    coef = torch.rand(n, k, generator=g) * 4 + 1
    x = torch.zeros(n, m).scatter_add_(1, idx, coef) @ dirs
    return x + 0.3 + 0.02 * torch.randn(n, d, generator=g)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core box run far faster without intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def make_tiny_llama(folder: Path, layers: int = 3, hidden: int = 32) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").is_file():
        return folder
    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).eval().save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    src = default_model_dir() / "chat_template.jinja"
    if src.is_file() and not (folder / "chat_template.jinja").is_file():
        shutil.copy(src, folder / "chat_template.jinja")
    return folder


def write_corpus(
    folder: Path, n_chat: int = 60, n_trace: int = 30, bad_lines: bool = False
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    chat, traces = folder / "chat.jsonl", folder / "traces.jsonl"
    with chat.open("w") as f:
        for i in range(n_chat):
            msgs = [
                {
                    "role": "user",
                    "content": f"Question {i}: what is {i} plus {i + 1}? Explain briefly.",
                },
                {
                    "role": "assistant",
                    "content": f"It is {2 * i + 1}, because adding one more to {i} twice gives that.",
                },
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
            if bad_lines and i % 20 == 5:
                f.write("{not json\n\n")
    with traces.open("w") as f:
        for i in range(n_trace):
            rec = {
                "problem": f"Compute {i} squared.",
                "reasoning": f"Hmm, {i} times {i}. Wait, let me check: it is {i * i}.",
                "answer": str(i * i),
            }
            f.write(json.dumps(rec) + "\n")
            if bad_lines and i % 10 == 3:
                f.write(json.dumps({"problem": "no reasoning field"}) + "\n")
    return chat, traces


def write_cache(
    folder: Path,
    layer_acts: dict[int, torch.Tensor],
    *,
    model: str,
    shard_tokens: int = 65536,
    mix: dict[str, Any] | None = None,
) -> Path:
    """Activations already in memory as an activation cache, through the real writer."""
    from sae_training.activation_cache import CacheWriter

    writer = CacheWriter(folder, sorted(layer_acts), shard_tokens=shard_tokens)
    writer.add(layer_acts)
    writer.close(model=model, context_size=0, mix=mix or {})
    return folder
