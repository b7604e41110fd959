"""Reasoning length as the paper counts it: completion tokens before the first ``</think>``.

The count comes from the completion's own token ids: vLLM returns them when a chat request
sets ``return_token_ids`` (``choices[i].token_ids``, vLLM >= 0.10; checked in vLLM 0.32's
``entrypoints/openai/chat_completion``). The id of ``</think>`` comes from the served model
itself, through vLLM's ``POST /tokenize`` at the server root (``{"prompt": "</think>",
"add_special_tokens": false}``): the same tokenizer that produced the ids, so no local
tokenizer can disagree with it. It must be exactly one token (it is an added special token
in every R1 distill); otherwise the run falls back to the estimate, and says so.
``--think-end-id N`` gives the id by hand for servers without ``/tokenize``.

Counting: the index of the first ``</think>`` id in the completion. A template that opens
``<think>`` in the generation prompt (newer R1 templates) leaves no opening tag in the
completion, so counting from the completion's start is right in both cases. No ``</think>``
at all (the budget ran out, or the model does not think): every completion token counts, and
the sample is marked ``has_think_end = false`` (truncated).

Endpoints that return no ids get the character estimate
(:func:`benchmarks.metrics.estimate_reasoning_tokens`), recorded per sample as
``reasoning_source = "chars"`` and flagged in the report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

import httpx
from pydantic import BaseModel, ValidationError

from benchmarks.metrics import THINK_END, estimate_reasoning_tokens, split_reasoning

log = logging.getLogger(__name__)

ReasoningSource = Literal["token_ids", "chars"]


class _TokenizeResponse(BaseModel):
    tokens: list[int]


def server_root(base_url: str) -> str:
    """``http://host:8000/v1`` -> ``http://host:8000`` (vLLM's ``/tokenize`` is not under /v1)."""
    u = base_url.rstrip("/")
    return u[: -len("/v1")] if u.endswith("/v1") else u


async def resolve_think_end_id(
    base_url: str, model: str, *, api_key: str = "EMPTY", marker: str = THINK_END
) -> tuple[int | None, str]:
    """(the one token id of ``marker`` on the served model, or None; a line saying why)."""
    url = f"{server_root(base_url)}/tokenize"
    headers = {"Authorization": f"Bearer {api_key}"}
    body = {"model": model, "prompt": marker, "add_special_tokens": False}
    try:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(url, json=body, headers=headers)
    except httpx.HTTPError as e:
        return None, f"{url}: {type(e).__name__}"
    if r.status_code != 200:
        return None, f"{url}: HTTP {r.status_code} (not a vLLM server?)"
    try:
        toks = _TokenizeResponse.model_validate(r.json()).tokens
    except (ValueError, ValidationError):
        return None, f"{url}: not a tokenize response"
    if len(toks) != 1:
        return None, f"{marker!r} is {len(toks)} tokens on {model}, not one special token"
    return toks[0], f"{marker!r} is token {toks[0]} on {model} ({url})"


def reasoning_from_ids(token_ids: Sequence[int], think_end_id: int) -> tuple[int, bool]:
    """(tokens before the first ``think_end_id``, whether it occurs); all tokens if not."""
    for i, t in enumerate(token_ids):
        if t == think_end_id:
            return i, True
    return len(token_ids), False


def measure_reasoning(
    text: str,
    completion_tokens: int,
    token_ids: Sequence[int] | None,
    think_end_id: int | None,
) -> tuple[int, bool, ReasoningSource]:
    """(reasoning tokens, whether ``</think>`` was generated, how it was counted)."""
    if token_ids is not None and think_end_id is not None:
        n, found = reasoning_from_ids(token_ids, think_end_id)
        return n, found, "token_ids"
    _, found = split_reasoning(text)
    return estimate_reasoning_tokens(text, completion_tokens), found, "chars"
