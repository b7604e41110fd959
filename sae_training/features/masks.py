"""Token-level reasoning-vocabulary masks, exactly as ``reasonscore.md`` ("Masks") defines them.

1. every surface string is tokenized without special tokens, strings are grouped by
   ``s.lstrip().lower()``; a group matches where any of its token-id sequences occurs
   exactly, and a match marks every token it covers;
2. each marked position p is widened to ``[p - left, p + right]`` (clipped, merged);
3. ignored positions (special tokens, :func:`sae_training.tokens.special_token_ids`) are
   removed from every mask;
4. ``M+`` is the union of the group masks, ``M-`` every other non-ignored position.

The work is vectorised per sequence (``unfold`` for matching, a max-pool for the window)
so it costs far less than the model forward it accompanies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from sae_training.errors import VocabPatternError

DEFAULT_WINDOW: tuple[int, int] = (1, 2)


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> Any: ...


@dataclass(frozen=True)
class VocabPatterns:
    """Groups of token-id sequences, the tokenized form of a reasoning vocabulary.

    ``groups[j]`` is the group key (``s.lstrip().lower()``), ``strings[j]`` its surface
    strings and ``patterns[j]`` their token ids, in the same order.
    """

    groups: tuple[str, ...]
    strings: tuple[tuple[str, ...], ...]
    patterns: tuple[tuple[tuple[int, ...], ...], ...]

    @property
    def n_groups(self) -> int:
        return len(self.groups)

    def n_strings(self) -> int:
        return sum(len(s) for s in self.strings)


def group_key(surface: str) -> str:
    """The paper's grouping rule: strings that differ only by leading space / case share a group."""
    return surface.lstrip().lower()


def build_patterns(tokenizer: Tokenizer, vocab: dict[str, list[str]]) -> VocabPatterns:
    """Tokenize every surface string (no special tokens) and regroup by :func:`group_key`.

    The JSON group names are not trusted: regrouping by the rule keeps a hand-edited or
    derived vocabulary consistent with the definition. Group order is first appearance.
    """
    grouped: dict[str, list[str]] = {}
    for surfaces_of_group in vocab.values():
        for s in surfaces_of_group:
            key = group_key(s)
            if not key:
                raise VocabPatternError(f"vocabulary string {s!r} is blank")
            bucket = grouped.setdefault(key, [])
            if s not in bucket:
                bucket.append(s)
    if not grouped:
        raise VocabPatternError("the vocabulary is empty")
    groups: list[str] = []
    strings: list[tuple[str, ...]] = []
    patterns: list[tuple[tuple[int, ...], ...]] = []
    for key, surfaces in grouped.items():
        ids_list = []
        for s in surfaces:
            ids = [int(i) for i in tokenizer.encode(s, add_special_tokens=False)]
            if not ids:
                raise VocabPatternError(f"vocabulary string {s!r} tokenizes to nothing")
            ids_list.append(tuple(ids))
        groups.append(key)
        strings.append(tuple(surfaces))
        patterns.append(tuple(ids_list))
    return VocabPatterns(tuple(groups), tuple(strings), tuple(patterns))


def pattern_coverage(ids: torch.Tensor, pattern: tuple[int, ...]) -> torch.Tensor:
    """Bool ``[T]``: positions covered by an exact occurrence of ``pattern`` in ``ids``."""
    T, L = ids.shape[0], len(pattern)
    covered = torch.zeros(T, dtype=torch.bool)
    if L > T or T == 0:
        return covered
    pat = torch.tensor(pattern, dtype=ids.dtype)
    if L == 1:
        return ids == pat[0]
    starts = (ids.unfold(0, L, 1) == pat).all(dim=1)  # [T - L + 1]
    n = starts.shape[0]
    for k in range(L):
        covered[k : k + n] |= starts
    return covered


def group_hits(ids: torch.Tensor, vp: VocabPatterns) -> torch.Tensor:
    """Bool ``[G, T]``: step 1 of the definition (matches, before widening)."""
    ids = ids.reshape(-1).long()
    hits = torch.zeros(vp.n_groups, ids.shape[0], dtype=torch.bool)
    for j, pats in enumerate(vp.patterns):
        for pat in pats:
            hits[j] |= pattern_coverage(ids, pat)
    return hits


def widen(mask: torch.Tensor, window: tuple[int, int] = DEFAULT_WINDOW) -> torch.Tensor:
    """Step 2: every True at p becomes True on ``[p - left, p + right]`` (clipped to the row).

    Works on ``[..., T]``. Position q is covered iff some marked p has q - right <= p <= q + left,
    i.e. a max over that stretch, which a stride-1 max-pool computes for all rows at once.
    """
    left, right = window
    if left < 0 or right < 0:
        raise ValueError(f"window sides must be >= 0, got {window}")
    if left == 0 and right == 0:
        return mask.clone()
    shape = mask.shape
    x = mask.reshape(-1, 1, shape[-1]).float()
    x = F.pad(x, (right, left))
    out = F.max_pool1d(x, kernel_size=left + right + 1, stride=1)
    return out.reshape(shape) > 0


@dataclass(frozen=True)
class SequenceMasks:
    """The masks of one sequence: per-group ``[G, T]``, ``pos`` (M+) and ``neg`` (M-) ``[T]``."""

    groups: torch.Tensor
    pos: torch.Tensor
    neg: torch.Tensor


def sequence_masks(
    ids: torch.Tensor,
    vp: VocabPatterns,
    ignore: torch.Tensor,
    window: tuple[int, int] = DEFAULT_WINDOW,
) -> SequenceMasks:
    """All four steps for one sequence of token ids ``[T]``; ``ignore`` is bool ``[T]``."""
    groups = widen(group_hits(ids, vp), window) & ~ignore
    pos = groups.any(dim=0)
    neg = ~pos & ~ignore
    return SequenceMasks(groups, pos, neg)
