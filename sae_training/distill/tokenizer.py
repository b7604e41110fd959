"""The R1-distill tokenizer surface on top of any base tokenizer: DeepSeek-R1-Distill's turn
and reasoning tokens, added as single tokens, and its chat template.

Why these exact pieces: DeepSeek built the distills by fine-tuning Llama/Qwen bases on R1
traces with a tokenizer whose ``<think>`` / ``</think>`` are single added tokens (so the
plugin's conditional steering finds its markers, :mod:`sae_steer_vllm.think_phase`) and whose
template renders ``<｜begin▁of▁sentence｜><｜User｜>...<｜Assistant｜><think>\n``. A stand-in
that differs there would exercise different code paths than the real model.

:data:`R1_TEMPLATE_THINK_PROMPT` is the revised R1-distill template (generation prompt opens
``<think>\n``) byte for byte; its source and sha256 are documented in
``tests/helpers/r1_tokenizer.py`` and ``tests/test_distill_tokens.py`` checks the two copies are
identical. Token flags are the distills': BOS/EOS special, the turn and think tokens added
with ``special: false`` (statistics see their positions, as on the real model).

New embedding rows are not random: each starts at the mean embedding of the base tokenizer's
pieces of a string with the same role (:func:`_warm_start`): EOS from the base's end-of-turn,
``<｜Assistant｜>`` from ``<|im_start|>assistant``-like text, ``<think>`` from the pieces of
"<think>". A few hundred fine-tuning steps on CPU then only adjust them, which is what makes
a 20-minute distill learn to close its reasoning.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_training.corpus import THINK_CLOSE, THINK_OPEN

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"

R1_TEMPLATE_JAN_2025 = (
    r"{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    r"{% endif %}"
    r"{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}"
    r"{%- for message in messages %}{%- if message['role'] == 'system' %}"
    r"{% set ns.system_prompt = message['content'] %}{%- endif %}"
    r"{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    r"{%- if message['role'] == 'user' %}"
    r"{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is none %}"
    r"{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}"
    r"{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}"
    r"{%- set ns.is_first = true -%}"
    r"{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}"
    r"{%- endif %}{%- endfor %}{%- endif %}"
    r"{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    r"{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}"
    r"{%- set ns.is_tool = false -%}{%- else %}{% set content = message['content'] %}"
    r"{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}"
    r"{% endif %}{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    r"{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}"
    r"{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- set ns.is_output_first = false %}"
    r"{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}"
    r"{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}"
    r"{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}"
    r"{% endif %}"
)

_JAN_GENERATION_PROMPT = (
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)
_THINK_GENERATION_PROMPT = (
    r"{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\n'}}{% endif %}"
)
R1_TEMPLATE_THINK_PROMPT = (
    R1_TEMPLATE_JAN_2025[: -len(_JAN_GENERATION_PROMPT)] + _THINK_GENERATION_PROMPT
)
"""The revised template: generation prompt ``<｜Assistant｜><think>\\n``, nothing else changed."""


def _warm_start(base_tok: Any) -> dict[str, list[str]]:
    """Per new token, base-tokenizer strings whose pieces' mean embedding starts its row
    (the first one that the base tokenizer can encode is used)."""
    eot = [t for t in (getattr(base_tok, "eos_token", None), "\n\n") if t]
    bos = [t for t in (getattr(base_tok, "bos_token", None), "\n") if t]
    return {
        BOS: bos,
        EOS: eot,
        USER: ["<|im_start|>user\n", "User:", "user"],
        ASSISTANT: ["<|im_start|>assistant\n", "Assistant:", "assistant"],
        THINK_OPEN: [THINK_OPEN, "think"],
        THINK_CLOSE: [THINK_CLOSE, "think"],
    }


def r1_style_tokenizer(base_tok: Any) -> Any:
    """``base_tok`` with R1's BOS/EOS/pad, turn and think tokens and the R1 template.

    Mutates and returns ``base_tok`` (load a fresh copy). Plain text gets BOS prepended as the
    distills' tokenizer does (``add_bos_token``); chat text rendered by the template already
    starts with it, so callers tokenizing rendered text pass ``add_special_tokens=False``.
    """
    from tokenizers import AddedToken
    from tokenizers.processors import TemplateProcessing

    tok = base_tok
    tok.add_special_tokens(
        {
            "bos_token": AddedToken(BOS, special=True, normalized=False),
            "eos_token": AddedToken(EOS, special=True, normalized=False),
            "pad_token": AddedToken(EOS, special=True, normalized=False),
        }
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t in (USER, ASSISTANT, THINK_OPEN, THINK_CLOSE)
        ]
    )
    bos_id = tok.convert_tokens_to_ids(BOS)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    tok.chat_template = R1_TEMPLATE_THINK_PROMPT
    return tok


def new_token_ids(tok: Any) -> dict[str, int]:
    """The ids of the R1 tokens in a tokenizer made by :func:`r1_style_tokenizer`."""
    return {
        t: int(tok.convert_tokens_to_ids(t))
        for t in (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE)
    }


def grow_vocabulary(model: Any, base_tok: Any, tok: Any) -> list[int]:
    """Resize ``model``'s embeddings (and untied head) to ``tok`` and warm-start the new rows
    (the warm-start rule in the module docstring); point the config's and generation config's BOS/EOS/pad at R1's
    tokens. Tied embeddings stay tied (one matrix; checked). Returns the new row ids."""
    old = model.get_input_embeddings().weight.shape[0]
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    if tied and head.data_ptr() != emb.data_ptr():
        raise RuntimeError("tied embeddings came apart while resizing the vocabulary")
    added: list[int] = []
    with torch.no_grad():
        for token, sources in _warm_start(base_tok).items():
            row = int(tok.convert_tokens_to_ids(token))
            if row < old:  # already in the base vocabulary
                continue
            ids = _source_ids(base_tok, sources, old)
            emb[row] = emb[ids].mean(0)
            if not tied:
                head[row] = head[ids].mean(0)
            added.append(row)
    r1 = new_token_ids(tok)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id = r1[BOS]
        cfg.eos_token_id = r1[EOS]
        cfg.pad_token_id = r1[EOS]
    return sorted(added)


def _source_ids(base_tok: Any, sources: list[str], limit: int) -> list[int]:
    for s in sources:
        ids = [i for i in base_tok(s, add_special_tokens=False)["input_ids"] if i < limit]
        if ids:
            return ids
    raise RuntimeError(f"cannot encode any of {sources!r} with the base tokenizer")


__all__ = [
    "ASSISTANT",
    "BOS",
    "EOS",
    "R1_TEMPLATE_THINK_PROMPT",
    "USER",
    "grow_vocabulary",
    "new_token_ids",
    "r1_style_tokenizer",
]
