"""Text corpora: reading JSONL safely and rendering records through a chat template.

One place defines how a reasoning trace becomes model input, so activations for training
and for ReasonScore are taken on identical text: the text the model itself processes when
it generates the trace (:func:`render_trace`). :class:`TextMix` picks the documents SAE
training reads (chat + traces, with a held-out split).
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


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
"""The reasoning delimiters of R1-style models (DeepSeek-R1 and its distills, QwQ, ...)."""

TRACE_RENDERING = "generation-v1"
"""The version of :func:`render_trace`'s output: the prompt with the generation prompt, then
the reasoning and the answer as generated (an older cache's mix has no such field)."""

_PROBE_USER = "sae-steer probe question"
_PROBE_ANSWER = "sae-steer probe answer"


def apply_template(tokenizer: ChatTokenizer, messages: list[dict[str, str]], **kw: Any) -> str:
    """``apply_chat_template(..., tokenize=False)``; a tokenizer without a template is a
    :class:`CorpusError` naming the way out, not transformers' generic ``ValueError``."""
    if getattr(tokenizer, "chat_template", "") is None:
        raise CorpusError(
            "the tokenizer has no chat template, and trace and chat records are rendered "
            "through it: use a corpus of kind 'text' (plain documents), or a model whose "
            "tokenizer has one"
        )
    return str(tokenizer.apply_chat_template(messages, tokenize=False, **kw))


@dataclass(frozen=True)
class TraceFormat:
    """How a tokenizer's chat template frames the model's own generation, found by rendering
    probe conversations (:func:`trace_format`), never by model name.

    ``opens_think``: the generation prompt already ends in ``<think>`` (the revised R1-distill
    templates: ``<｜Assistant｜><think>\\n``), so the model's output starts inside its
    reasoning and must not get a second ``<think>`` (for callers that need to know this
    without a record, e.g. to count a completion's reasoning tokens). ``end_of_turn``: what
    the template closes an assistant turn with (``<｜end▁of▁sentence｜>``, ``<|im_end|>``, ...),
    without the whitespace templates put between turns: the token the model generates to
    stop.
    """

    opens_think: bool
    end_of_turn: str


def trace_format(tokenizer: ChatTokenizer) -> TraceFormat:
    """Probe the template: one user turn with the generation prompt, and one finished
    assistant turn (whatever follows its content is the end of turn)."""
    user = {"role": "user", "content": _PROBE_USER}
    prompt = apply_template(tokenizer, [user], add_generation_prompt=True)
    done = apply_template(tokenizer, [user, {"role": "assistant", "content": _PROBE_ANSWER}])
    end = done.rsplit(_PROBE_ANSWER, 1)[1].rstrip() if _PROBE_ANSWER in done else ""
    return TraceFormat(prompt.rstrip().endswith(THINK_OPEN), end)


def render_trace(
    tokenizer: ChatTokenizer, rec: dict[str, Any], fmt: TraceFormat | None = None
) -> str | None:
    """A reasoning trace as the model processes its own generation; None if fields are missing.

    The problem goes through the template as the user turn *with the generation prompt*;
    then the reasoning inside ``<think>...</think>``, the answer, and the template's end of
    turn are appended as plain text, exactly what the model emits. Why not render the trace
    as a finished assistant message: the R1-distill templates keep only what follows
    ``</think>`` in assistant turns (earlier turns' reasoning is not shown to the model),
    so the reasoning, the very text ReasonScore and the SAE are about, would vanish. A
    template that already opens ``<think>`` in its generation prompt gets no second one.
    The end of turn is kept (it is what the model generates to stop, and it separates
    documents in packed rows); special tokens are excluded from every statistic anyway.
    ``fmt`` is :func:`trace_format` of the tokenizer, computed here when not given.
    """
    problem, reasoning = rec.get("problem"), rec.get("reasoning")
    if not isinstance(problem, str) or not isinstance(reasoning, str) or not reasoning.strip():
        return None
    answer = rec.get("answer") if isinstance(rec.get("answer"), str) else ""
    fmt = fmt or trace_format(tokenizer)
    prompt = apply_template(
        tokenizer, [{"role": "user", "content": problem}], add_generation_prompt=True
    )
    if prompt.rstrip().endswith(THINK_OPEN):  # this very prompt, not only the probe's
        opening = "" if prompt.endswith("\n") else "\n"
    else:
        opening = f"{THINK_OPEN}\n"
    return f"{prompt}{opening}{reasoning.strip()}\n{THINK_CLOSE}\n\n{answer}{fmt.end_of_turn}"


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
    return apply_template(tokenizer, clean)


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
    fmt: TraceFormat | None = None
    for i, rec in enumerate(read_jsonl(path, skipped=skipped), 1):
        if kind == "trace":
            fmt = fmt or trace_format(tokenizer)
            text = render_trace(tokenizer, rec, fmt)
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
    trace_rendering: str = TRACE_RENDERING
    """How traces become text (:func:`render_trace`). Part of the mix's identity, so an
    activation cache collected with the earlier rendering (traces as finished assistant
    messages, whose reasoning R1-distill templates drop) never matches a new collection."""

    def __post_init__(self) -> None:
        if self.trace_rendering != TRACE_RENDERING:
            raise CorpusError(
                f"trace_rendering {self.trace_rendering!r} is not this version's "
                f"({TRACE_RENDERING!r}); re-collect the activations"
            )
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
