"""Text corpora: reading JSONL safely and rendering records through a chat template.

One place defines how a reasoning trace becomes model input (problem as the
user turn; ``<think>reasoning</think>`` then the answer as the assistant turn),
so activations for training and for ReasonScore are taken on identical text.
:class:`TextMix` picks the documents SAE training reads (chat + traces, with a
held-out split).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from sae_steer_vllm.constants import CHAT_CORPUS, TRACE_CORPUS
from sae_training.errors import CorpusError

Split = Literal["train", "eval"]
"""A :class:`TextMix`'s document split: held-out documents are ``eval``."""


def shared_data_dir() -> Path:
    """``../shared/data`` beside the checkout, overridable with ``SAE_STEER_DATA``."""
    env = os.environ.get("SAE_STEER_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def data_file(name: str) -> Path:
    p = Path(name)
    if p.is_file() or p.is_absolute() or "/" in name:
        return p
    return shared_data_dir() / name


@dataclass(frozen=True)
class BadLine:
    path: Path
    line_no: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_no}: {self.reason}"


def read_jsonl(
    path: str | Path,
    *,
    strict: bool = False,
    skipped: list[BadLine] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yield JSON objects; blank lines are ignored, malformed ones skipped (or raised if strict).

    Skipped lines are appended to ``skipped`` so callers can report how many
    were dropped instead of losing them silently.
    """
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad = BadLine(path, no, f"malformed JSON ({e.msg})")
                if strict:
                    raise CorpusError(str(bad)) from None
                if skipped is not None:
                    skipped.append(bad)
                continue
            if not isinstance(obj, dict):
                bad = BadLine(path, no, "not a JSON object")
                if strict:
                    raise CorpusError(str(bad))
                if skipped is not None:
                    skipped.append(bad)
                continue
            yield obj


class ChatTokenizer(Protocol):
    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...


def render_trace(tokenizer: ChatTokenizer, rec: dict[str, Any]) -> str | None:
    """A reasoning trace as the model would have produced it; None if fields are missing."""
    problem, reasoning = rec.get("problem"), rec.get("reasoning")
    if not isinstance(problem, str) or not isinstance(reasoning, str) or not reasoning.strip():
        return None
    answer = rec.get("answer") if isinstance(rec.get("answer"), str) else ""
    messages = [
        {"role": "user", "content": problem},
        {"role": "assistant", "content": f"<think>\n{reasoning.strip()}\n</think>\n\n{answer}"},
    ]
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def render_chat(tokenizer: ChatTokenizer, rec: dict[str, Any]) -> str | None:
    """A chat conversation (``messages`` list of role/content); None if malformed."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return None
    clean = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return None
        if m.get("role") not in ("system", "user", "assistant"):
            return None
        clean.append({"role": m["role"], "content": m["content"]})
    return str(tokenizer.apply_chat_template(clean, tokenize=False))


def render_text_column(rec: dict[str, Any], column: str) -> str | None:
    v = rec.get(column)
    return v if isinstance(v, str) and v.strip() else None


def iter_rendered(
    tokenizer: ChatTokenizer,
    path: str | Path,
    kind: str,
    *,
    text_column: str = "text",
    skipped: list[BadLine] | None = None,
) -> Iterator[str]:
    """Render every usable record of a file; ``kind`` is ``trace``, ``chat`` or ``text``."""
    for i, rec in enumerate(read_jsonl(path, skipped=skipped), 1):
        if kind == "trace":
            text = render_trace(tokenizer, rec)
        elif kind == "chat":
            text = render_chat(tokenizer, rec)
        elif kind == "text":
            text = render_text_column(rec, text_column)
        else:
            raise CorpusError(f"unknown corpus kind {kind!r} (trace, chat, text)")
        if text is None:
            if skipped is not None:
                skipped.append(BadLine(Path(path), i, f"record lacks the fields a {kind} needs"))
            continue
        yield text


def mixed_texts(
    tokenizer: ChatTokenizer,
    sources: list[tuple[str | Path, str, float]],
    *,
    seed: int = 0,
    skipped: list[BadLine] | None = None,
) -> Iterator[str]:
    """Interleave several corpora by weight, e.g. ``[(chat, "chat", .5), (traces, "trace", .5)]``.

    Each step picks a source with probability proportional to its weight; a
    source that runs out is dropped and the rest continue, so the stream ends
    only when all are exhausted. Weights are mixing ratios by document.
    """
    rng = random.Random(seed)
    iters = [
        (iter_rendered(tokenizer, p, kind, skipped=skipped), w) for p, kind, w in sources if w > 0
    ]
    while iters:
        total = sum(w for _, w in iters)
        r = rng.random() * total
        acc = 0.0
        idx = len(iters) - 1
        for j, (_, w) in enumerate(iters):
            acc += w
            if r <= acc:
                idx = j
                break
        try:
            yield next(iters[idx][0])
        except StopIteration:
            iters.pop(idx)


@dataclass(frozen=True)
class TextMix:
    """Which corpora SAE training reads and in which document ratio.

    ``trace_ratio`` is the fraction of documents drawn from the reasoning
    traces (the rest from chat). Every ``holdout_every``-th document of the
    mixed stream is reserved for evaluation and never trained on.
    """

    chat: str = CHAT_CORPUS
    traces: str = TRACE_CORPUS
    trace_ratio: float = 0.5
    seed: int = 0
    holdout_every: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.trace_ratio <= 1.0:
            raise CorpusError(f"trace_ratio must be in [0, 1], got {self.trace_ratio}")
        if self.holdout_every < 2:
            raise CorpusError("holdout_every must be >= 2")

    def sources(self) -> list[tuple[str | Path, str, float]]:
        out: list[tuple[str | Path, str, float]] = []
        if self.trace_ratio < 1.0:
            out.append((data_file(self.chat), "chat", 1.0 - self.trace_ratio))
        if self.trace_ratio > 0.0:
            out.append((data_file(self.traces), "trace", self.trace_ratio))
        return out

    def texts(
        self, tokenizer: Any, split: str, skipped: list[BadLine] | None = None
    ) -> Iterator[str]:
        """Documents of ``split`` ("train" or "eval") in a fixed order."""
        if split not in ("train", "eval"):
            raise CorpusError(f"unknown split {split!r}")
        for src, _, _ in self.sources():
            if not Path(src).is_file():
                raise CorpusError(f"{src}: no such file (set SAE_STEER_DATA or pass a path)")
        for i, text in enumerate(
            mixed_texts(tokenizer, self.sources(), seed=self.seed, skipped=skipped)
        ):
            if (i % self.holdout_every == 0) == (split == "eval"):
                yield text
