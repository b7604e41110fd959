"""Where a request's reasoning starts and ends: the state behind ``thinking`` / ``answer`` steering.

The one owner of the phase rules (docs/conditional_steering.md has them with examples). Per
request two positions, ``NO_POSITION`` until seen:

* ``S``, the start of the reasoning: the last opening marker of the prompt (a template that ends
  its generation prompt with ``<think>``, as newer R1 templates do), else the first opening
  marker the model generates; with no opening marker configured, the first generated token.
* ``E``, the first closing marker the model generates, or the prompt's own closing marker when
  the prompt already closed the reasoning it opened.

A token at position ``p`` is *thinking* when ``S <= p <= E`` and *answer* when ``p > E`` and it
is generated. Closing markers elsewhere in the prompt are ignored: an instruction that *mentions*
the marker must not end a reasoning that has not begun.

Two halves keep this exact under continuous batching: :func:`initial_phase` runs on the CPU
when a request gets its slot (prompt and, for a request resumed after preemption, the tokens it
had generated, some of which the prefix cache may never feed through the model again), and
:func:`update_phase` runs on the device before every forward, from the step's input ids, so
a marker sampled in step ``t`` is seen in step ``t + 1`` whatever the scheduler does (chunked
prefill, async scheduling, recomputation). Both only ever lower ``S`` and ``E`` (a minimum),
so seeing a token twice changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .sae_api import ThinkMarkers

NO_POSITION = 1 << 62
"""``S`` / ``E`` of a request whose marker has not appeared (larger than any position)."""


def resolve_think_markers(tokenizer: Any, start: str, end: str) -> tuple[ThinkMarkers | None, str]:
    """The markers' single token ids in ``tokenizer``, or None and the reason there are none.

    ``start`` may be ``""`` (the reasoning starts with the first generated token); ``end`` ``""``
    turns the phases off. A marker must be exactly one token, as ``<think>``/``</think>`` are in
    every R1 distill (added tokens); anything else would have to be matched across token
    boundaries, which BPE merges make unreliable.
    """
    if not end:
        return None, "no end-of-reasoning marker configured (think_end_marker is empty)"
    ids: dict[str, int] = {}
    for marker in filter(None, (start, end)):
        toks = list(tokenizer(marker, add_special_tokens=False)["input_ids"])
        if len(toks) != 1:
            return None, (
                f"{marker!r} is {len(toks)} tokens for this model's tokenizer, not one; "
                "set --think-start-marker / --think-end-marker to single tokens it has"
            )
        ids[marker] = int(toks[0])
    markers = ThinkMarkers(
        start=start or None, start_id=ids.get(start) if start else None, end=end, end_id=ids[end]
    )
    if markers.start_id is not None and markers.start_id == markers.end_id:
        return None, f"the start and end markers are the same token ({markers.end_id})"
    return (
        markers,
        f"{start or '(generation start)'} .. {end} (ids {markers.start_id}, {markers.end_id})",
    )


def initial_phase(
    token_ids: Sequence[int] | np.ndarray, prompt_len: int, markers: ThinkMarkers
) -> tuple[int, int]:
    """``(S, E)`` from the tokens known when a request takes its slot: its prompt, then any
    tokens it generated before (a request resumed after preemption)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    prompt, gen = ids[:prompt_len], ids[prompt_len:]
    s = e = NO_POSITION
    if markers.start_id is None:
        s = prompt_len
    else:
        opens = np.flatnonzero(prompt == markers.start_id)
        if len(opens):
            s = int(opens[-1])
            closes = np.flatnonzero(prompt[s:] == markers.end_id)
            if len(closes):
                e = s + int(closes[0])
        gen_opens = np.flatnonzero(gen == markers.start_id)
        if len(gen_opens):
            s = min(s, prompt_len + int(gen_opens[0]))
    gen_closes = np.flatnonzero(gen == markers.end_id)
    if len(gen_closes):
        e = min(e, prompt_len + int(gen_closes[0]))
    return s, e


def update_phase(
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    idx: torch.Tensor,
    prompt_len: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    start_id: int,
    end_id: int,
) -> None:
    """Lower each slot's ``S`` / ``E`` to the first marker among this step's generated tokens.

    ``idx``: the slot of each token (0 for unsteered and padding tokens; slot 0's state is never
    read). Device ops on persistent buffers with the step's static shapes, no host sync, so it
    may run inside a captured CUDA graph. ``start_id`` < 0: no opening marker.
    """
    big = torch.full_like(positions, NO_POSITION)
    generated = positions >= prompt_len[idx]
    end.scatter_reduce_(
        0, idx, torch.where(generated & (input_ids == end_id), positions, big), "amin"
    )
    if start_id >= 0:
        hit = generated & (input_ids == start_id)
        start.scatter_reduce_(0, idx, torch.where(hit, positions, big), "amin")
