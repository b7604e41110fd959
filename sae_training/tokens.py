"""Text -> tokens: the one special-token rule, packed training rows and scoring windows.

Two ways to cut rendered text into token sequences, for two jobs:

* :func:`pack_rows` (collection and training evaluation): documents concatenated into
  fixed-length rows, each starting with BOS (or, ``prepend_bos=False``, with none, as
  SAELens packs for the paper's release), so no compute is spent on padding;
* :func:`iter_windows` / :func:`iter_batches` (feature statistics): every document cut into
  windows of at most ``ctx`` tokens, numbered in stream order so a dashboard can name
  "sequence 17, position 300" and a re-run finds the same tokens; batches hold windows of
  one length only, so no padding and no attention mask is ever needed. Consecutive windows
  of a document overlap by ``burn_in`` tokens, and a window's first ``burn_in`` positions
  are run for context but never counted (:attr:`TokenWindow.counted_from`): the first token
  of a window has no left context, acts as an attention sink, and used to win the maximum
  and the top contexts of many features. The true start of a document is treated the same
  way (its first ``burn_in`` tokens are context only), as the authors' packed rows skip
  their first positions: one rule, "a counted token has ``burn_in`` tokens before it".

Both exclude the same positions from every statistic: :func:`special_token_ids`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_training.corpus import BadLine, data_file, iter_rendered
from sae_training.errors import ActivationError, CorpusError

CORPUS_KINDS: tuple[str, ...] = ("trace", "chat", "text")
DEFAULT_BURN_IN = 16
"""Left-context tokens every counted scoring position has (see :func:`iter_windows`);
a window shorter than 64 tokens gets a quarter of its length.

Why 16: the sink artefact sits on the first one or two positions of a window; 16 is well
past it, equals the dashboards' context before the peak (so every shown context is whole),
and costs 16 / 1024 = 1.6% extra forward work at the default window size."""


# ---------------------------------------------------------------------- special tokens
def special_token_ids(tokenizer: Any) -> set[int]:
    """The token ids whose positions no SAE statistic ever sees.

    The union of ``all_special_ids`` (BOS/EOS/pad/unk and the declared additional
    special tokens) and every added token the tokenizer flags ``special``. Why the union:
    tokenizers register control tokens (SmolLM2: ``<file_sep>``, ``<jupyter_code>``, ...
    ids 3-16) as special added tokens without listing them in ``all_special_ids``, yet
    they are parsed out of plain text like the chat markers and, like them, sit where the
    residual norm is far larger than ordinary tokens' (attention sinks). They would
    dominate the reconstruction loss and the feature means while never being steered.
    (Collection used to take ``all_special_ids`` alone and kept such positions.)
    """
    ids: set[int] = {
        int(i) for i in getattr(tokenizer, "all_special_ids", []) or [] if i is not None
    }
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    for idx, tok in decoder.items():
        if getattr(tok, "special", False):
            ids.add(int(idx))
    return ids


def ignore_mask(ids: torch.Tensor, ignored_ids: Iterable[int]) -> torch.Tensor:
    """Bool mask of positions holding an ignored (special) token id."""
    ig = torch.tensor(sorted(set(ignored_ids)), dtype=torch.long)
    if ig.numel() == 0:
        return torch.zeros(ids.shape, dtype=torch.bool)
    return torch.isin(ids.long(), ig)


def keep_mask(
    ids: torch.Tensor, specials: Iterable[int], *, prepend_bos: bool = True
) -> torch.Tensor:
    """True where a packed row's activation is kept: not special and, for rows that start
    with BOS (:func:`pack_rows`), not row position 0.

    Rows without BOS (``prepend_bos=False``) keep position 0 unless it is special: SAELens
    trains on it (``exclude_special_tokens`` drops special ids only), so a reproduction
    of an SAE trained that way must too.
    """
    keep = ~ignore_mask(ids, specials)
    if prepend_bos:
        keep[..., 0] = False
    return keep


# ---------------------------------------------------------------------- packed rows
def pack_rows(
    tokenizer: Any, texts: Iterable[str], context_size: int, *, prepend_bos: bool = True
) -> Iterator[torch.Tensor]:
    """Yield ``[context_size]`` int64 rows: BOS + the next ``context_size - 1`` stream tokens.

    A leading BOS on every row (as SAELens does) gives each row the same
    attention-sink position, which is then excluded with the other specials.
    ``prepend_bos=False`` yields the next ``context_size`` stream tokens with nothing
    added, as SAELens packs with ``prepend_bos: false`` (no row BOS, no separator between
    documents; tokens a rendered document carries itself stay).
    """
    if context_size < 2:
        raise ActivationError(f"context_size must be >= 2, got {context_size}")
    if not prepend_bos:
        yield from _pack_plain(tokenizer, texts, context_size)
        return
    bos = tokenizer.bos_token_id
    if bos is None:
        bos = tokenizer.eos_token_id
    if bos is None:
        raise ActivationError("tokenizer has neither a BOS nor an EOS token to start rows with")
    body = context_size - 1
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buf) >= body:
            yield torch.tensor([bos, *buf[:body]], dtype=torch.long)
            del buf[:body]


def _pack_plain(tokenizer: Any, texts: Iterable[str], context_size: int) -> Iterator[torch.Tensor]:
    buf: list[int] = []
    for text in texts:
        buf.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        while len(buf) >= context_size:
            yield torch.tensor(buf[:context_size], dtype=torch.long)
            del buf[:context_size]


# ---------------------------------------------------------------------- scoring windows
@dataclass(frozen=True)
class CorpusSpec:
    """Which text, rendered how, cut how: everything needed to reproduce the stream."""

    path: Path
    kind: str = "trace"
    text_column: str = "text"
    ctx: int = 1024
    max_tokens: int | None = None
    max_docs: int | None = None
    burn_in: int | None = None
    """left-context tokens of every counted position; None: ``min(DEFAULT_BURN_IN, ctx // 4)``"""

    def __post_init__(self) -> None:
        if self.kind not in CORPUS_KINDS:
            raise CorpusError(f"corpus kind must be one of {CORPUS_KINDS}, got {self.kind!r}")
        if self.ctx < 2:
            raise CorpusError(f"ctx must be >= 2, got {self.ctx}")
        if self.burn_in is None:
            object.__setattr__(self, "burn_in", min(DEFAULT_BURN_IN, self.ctx // 4))
        if not 0 <= self.counted_after <= self.ctx // 2:
            raise CorpusError(
                f"burn_in must be in [0, ctx/2] = [0, {self.ctx // 2}] (a window must count "
                f"at least as many tokens as it re-runs for context), got {self.burn_in}"
            )
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise CorpusError(f"max_tokens must be positive, got {self.max_tokens}")

    @property
    def counted_after(self) -> int:
        """The burn-in, resolved (never None after construction)."""
        return int(self.burn_in or 0)

    def to_metadata(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "kind": self.kind,
            "text_column": self.text_column,
            "ctx": self.ctx,
            "max_tokens": self.max_tokens,
            "max_docs": self.max_docs,
            "burn_in": self.counted_after,
        }

    @classmethod
    def from_metadata(cls, d: dict[str, Any]) -> CorpusSpec:
        return cls(
            path=Path(d["path"]),
            kind=str(d.get("kind", "trace")),
            text_column=str(d.get("text_column", "text")),
            ctx=int(d.get("ctx", 1024)),
            max_tokens=None if d.get("max_tokens") is None else int(d["max_tokens"]),
            max_docs=None if d.get("max_docs") is None else int(d["max_docs"]),
            # files written before burn-in existed counted every window position
            burn_in=int(d.get("burn_in", 0)),
        )


@dataclass
class TokenWindow:
    """One window the model runs on; positions ``< counted_from`` are left context only."""

    seq_id: int
    doc_id: int
    ids: list[int]
    counted_from: int = 0
    start: int = 0
    """offset of ``ids[0]`` in its document's tokens"""


def counted_mask(ids: torch.Tensor, counted_from: int, specials: Iterable[int]) -> torch.Tensor:
    """True where a scoring window's position is counted: past the burn-in and not special."""
    keep = ~ignore_mask(ids, specials)
    keep[..., :counted_from] = False
    return keep


@dataclass
class StreamReport:
    """Filled while streaming: what was read and what was skipped."""

    n_docs: int = 0
    n_windows: int = 0
    n_tokens: int = 0
    """tokens run through the model (burn-in overlaps included)"""
    n_burn_in: int = 0
    """of those, positions run for left context only (never counted)"""
    skipped: list[BadLine] = field(default_factory=list)


def tokenize_rendered(tokenizer: Any, text: str, kind: str) -> list[int]:
    """Chat-rendered text already carries its special tokens; plain text gets the tokenizer's."""
    add_special = kind == "text"
    return [int(i) for i in tokenizer(text, add_special_tokens=add_special)["input_ids"]]


def iter_windows(
    tokenizer: Any, spec: CorpusSpec, report: StreamReport | None = None
) -> Iterator[TokenWindow]:
    """Yield windows in a fixed order until the corpus or the token budget runs out.

    A document of ``n`` tokens gives windows starting at ``0, s, 2s, ...`` with stride
    ``s = ctx - burn_in``; each window counts its positions ``>= burn_in``, so every
    document token from position ``burn_in`` on is counted exactly once and always sees at
    least ``burn_in`` tokens of its own document before it. A window (or a budget-cut
    window) with nothing to count is not emitted. ``max_tokens`` bounds the tokens run
    through the model.
    """
    report = report if report is not None else StreamReport()
    burn = spec.counted_after
    stride = spec.ctx - burn
    path = data_file(str(spec.path))
    seq_id = 0
    budget = spec.max_tokens
    for doc_id, text in enumerate(
        iter_rendered(
            tokenizer, path, spec.kind, text_column=spec.text_column, skipped=report.skipped
        )
    ):
        if spec.max_docs is not None and doc_id >= spec.max_docs:
            return
        ids = tokenize_rendered(tokenizer, text, spec.kind)
        if not ids:
            continue
        report.n_docs += 1
        for start in range(0, max(len(ids) - burn, 0), stride):
            chunk = ids[start : start + spec.ctx]
            if budget is not None:
                left = budget - report.n_tokens
                if left <= burn:
                    return
                chunk = chunk[:left]
            report.n_windows += 1
            report.n_tokens += len(chunk)
            report.n_burn_in += burn
            yield TokenWindow(seq_id, doc_id, chunk, counted_from=burn, start=start)
            seq_id += 1


def iter_batches(
    windows: Iterator[TokenWindow], batch_size: int, full_len: int
) -> Iterator[list[TokenWindow]]:
    """Group full windows (``len == full_len``) by ``batch_size``; a shorter window (a
    document's tail) is emitted alone at once. Every window appears exactly once."""
    if batch_size < 1:
        raise CorpusError("batch_size must be >= 1")
    pending: list[TokenWindow] = []
    for w in windows:
        if len(w.ids) != full_len:
            yield [w]
            continue
        pending.append(w)
        if len(pending) == batch_size:
            yield pending
            pending = []
    if pending:
        yield pending
