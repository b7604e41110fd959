"""A local stand-in for the DeepSeek-R1-Distill-Llama-8B tokenizer: its exact chat templates and
its reasoning/turn tokens, on top of the default model's byte-level BPE (no downloads).

What is exact, and where it comes from:

* :data:`R1_TEMPLATE_JAN_2025`, the template the R1 distills shipped with in January 2025.
  Its assistant branch keeps only what follows the last ``</think>``
  (``{% set content = content.split('</think>')[-1] %}``) and its generation prompt is
  ``<｜Assistant｜>``. Copied byte for byte from ``huggingface/huggingface.js``,
  ``packages/ollama-utils/src/chat-template-automap.ts`` (commit fe42e68017ff), entry
  ``library/deepseek-r1:8b`` (Ollama's ``deepseek-r1:8b`` is DeepSeek-R1-Distill-Llama-8B; the
  ``gguf`` field is the chat template its GGUF carries from ``tokenizer_config.json``).
  sha256 ``b6835114b7303ddd78919a82e4d9f7d8c26ed0d7dfc36beeb12d524f6144eab1``.
* :data:`R1_TEMPLATE_THINK_PROMPT`, the later revision: the same text except that the
  generation prompt is ``<｜Assistant｜><think>\\n``, so the model's completion starts inside
  its reasoning. Same file, entry ``library/deepcoder:14b`` (a fine-tune of
  DeepSeek-R1-Distill-Qwen-14B carrying the revised template); the only difference from the
  entry above is that generation prompt (checked by
  ``tests/test_r1_templates.py``), and ``microsoft/onnxruntime-extensions``
  ``shared/api/chat_template.cc`` holds the same text as ``DEEPSEEK_CHAT_TEMPLATE`` for
  ``deepseek-ai/DeepSeek-R1-Distill-Llama-70B``. sha256
  ``56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f``.
* The added tokens and their flags as the distills' ``tokenizer_config.json`` declares them:
  ``<｜begin▁of▁sentence｜>`` (BOS, added to plain text) and ``<｜end▁of▁sentence｜>`` (EOS and
  pad) are special; ``<｜User｜>``, ``<｜Assistant｜>``, ``<think>`` and ``</think>`` are added
  tokens with ``"special": false`` (so statistics *see* their positions, as on the real model;
  flags as in DeepSeek-R1-Distill-Qwen-1.5B's ``tokenizer_config.json`` quoted in public code,
  which the Llama-8B file shares).

The templates' text lives in the product (``sae_training/distill/tokenizer.py``, which gives
``sae-steer distill``'s model the same surface); ``tests/test_r1_templates.py`` pins both by the
sha256 above.

What is not exact: the ordinary-text vocabulary is SmolLM2's (49,152 byte-level BPE pieces,
not Llama 3's 128k), so ids differ from the real model's; every test reads ids from this
tokenizer, never hard-coded. The R1 tokens get ids 49152 and up.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sae_training.corpus import THINK_CLOSE, THINK_OPEN
from sae_training.distill.tokenizer import (  # the product's copy is the one owner
    ASSISTANT,
    BOS,
    EOS,
    R1_TEMPLATE_JAN_2025,
    R1_TEMPLATE_THINK_PROMPT,
    USER,
    r1_style_tokenizer,
)

from .models import default_tokenizer_dir, tiny_causal_lm

# re-exported for the tests that spell the R1 tokens
__all__ = [
    "ASSISTANT",
    "BOS",
    "EOS",
    "R1_TEMPLATE_JAN_2025",
    "R1_TEMPLATE_THINK_PROMPT",
    "THINK_CLOSE",
    "THINK_OPEN",
    "USER",
    "make_r1_tokenizer",
    "make_tiny_r1_llama",
    "make_tiny_r1_qwen2",
    "r1_chat_template",
    "r1_tokenizer",
]

_MARKER = "r1_stand_in.json"
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
)


def r1_chat_template(*, opens_think: bool) -> str:
    """The January-2025 template, or the revision whose generation prompt opens ``<think>``."""
    return R1_TEMPLATE_THINK_PROMPT if opens_think else R1_TEMPLATE_JAN_2025


def r1_tokenizer(*, opens_think: bool) -> Any:
    """The stand-in tokenizer in memory (see :func:`make_r1_tokenizer` for a folder): the
    product's R1 surface (``sae_training.distill.tokenizer.r1_style_tokenizer``: the tokens and
    their flags, BOS prepended to plain text as ``add_bos_token: true`` does) on SmolLM2's
    vocabulary, with either template."""
    from transformers import AutoTokenizer

    tok = r1_style_tokenizer(AutoTokenizer.from_pretrained(str(default_tokenizer_dir())))
    tok.chat_template = r1_chat_template(opens_think=opens_think)
    return tok


def make_r1_tokenizer(folder: Path, *, opens_think: bool, tokenizer: Any = None) -> Path:
    """Write the stand-in tokenizer (``tokenizer`` if given, else :func:`r1_tokenizer`) into
    ``folder``, replacing any tokenizer files there and leaving other files alone."""
    tok = tokenizer if tokenizer is not None else r1_tokenizer(opens_think=opens_think)
    folder.mkdir(parents=True, exist_ok=True)
    for name in _TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    tok.save_pretrained(str(folder))
    return folder


def make_tiny_r1_llama(
    folder: Path,
    *,
    opens_think: bool,
    layers: int = 3,
    hidden: int = 64,
    seed: int = 0,
    weight_std: float | None = None,
) -> Path:
    """A tiny random Llama (:func:`~helpers.models.tiny_causal_lm`) whose vocabulary covers
    the stand-in tokenizer, which it carries; BOS/EOS/pad ids in its config are R1's.

    ``layers`` x ``hidden`` default to 3 x 64 so :func:`helpers.saes.make_sae` (d_in 64,
    layer 1) fits. An existing finished folder is reused (its tokenizer rewritten if it
    carries the other template revision). ``weight_std``: as in ``tiny_causal_lm`` (outputs
    that vary from token to token, for generation tests).
    """
    from transformers import LlamaForCausalLM

    return _with_r1_vocab(
        folder,
        LlamaForCausalLM,
        opens_think=opens_think,
        seed=seed,
        build=lambda: tiny_causal_lm(
            folder, layers=layers, hidden=hidden, seed=seed, weight_std=weight_std
        ),
    )


def make_tiny_r1_qwen2(folder: Path, *, opens_think: bool, seed: int = 0) -> Path:
    """:func:`~helpers.models.make_tiny_qwen2`'s shape (4 x 128, untied head, weights drawn
    with std 0.08) with the stand-in R1 vocabulary and tokenizer, as :func:`make_tiny_r1_llama`."""
    from transformers import Qwen2ForCausalLM

    return _with_r1_vocab(
        folder,
        Qwen2ForCausalLM,
        opens_think=opens_think,
        seed=seed,
        build=lambda: tiny_causal_lm(
            folder,
            "qwen2",
            layers=4,
            hidden=128,
            max_positions=2048,
            tie_embeddings=False,
            seed=seed,
            weight_std=0.08,
        ),
    )


def _with_r1_vocab(
    folder: Path, model_cls: Any, *, opens_think: bool, seed: int, build: Any
) -> Path:
    """Build the model (``build()``), then grow its vocabulary to the stand-in tokenizer's:
    the new embedding rows (and, when untied, head rows) drawn from the old rows' spread."""
    marker = folder / _MARKER
    if marker.is_file():
        if json.loads(marker.read_text())["opens_think"] != opens_think:  # same vocabulary
            make_r1_tokenizer(folder, opens_think=opens_think)
            marker.write_text(json.dumps({"opens_think": opens_think}) + "\n")
        return folder
    build()
    tok = r1_tokenizer(opens_think=opens_think)
    make_r1_tokenizer(folder, opens_think=opens_think, tokenizer=tok)
    model = model_cls.from_pretrained(str(folder), dtype=torch.float32)
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        std = float(emb[:old].std())
        emb[old:] = torch.randn(emb.shape[0] - old, emb.shape[1], generator=g) * std
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():  # untied: its new rows too, deterministically
            std = float(head[:old].std())
            head[old:] = torch.randn(head.shape[0] - old, head.shape[1], generator=g) * std
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    for k, v in ids.items():
        setattr(model.config, k, v)
        setattr(model.generation_config, k, v)
    model.save_pretrained(str(folder), safe_serialization=True)
    marker.write_text(json.dumps({"opens_think": opens_think}) + "\n")
    return folder
