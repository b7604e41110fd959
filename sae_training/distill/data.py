"""Reasoning traces -> token sequences for distillation, with a held-out split.

A trace is rendered exactly as :func:`sae_training.corpus.render_trace` renders it for SAE
training and ReasonScore (one owner of "how a trace becomes model input"): the problem
through the chat template with the generation prompt, then the reasoning, ``</think>``, the
answer and the end of turn, as the model emits them. The prompt and the completion are
tokenized separately and concatenated, so the model is trained on exactly the token
sequence it sees when it generates (prompt ids, then its own ids); the loss covers only the
completion, as in DeepSeek's SFT of the distills.

Traces longer than ``max_len`` tokens are left out rather than truncated: a truncated trace
never shows ``</think>`` and the answer, and closing the reasoning is what the model must
learn. Every ``holdout_every``-th usable trace (file order) is held out for the loss check.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sae_training.corpus import BadLine, apply_template, read_jsonl, render_trace, trace_format
from sae_training.errors import CorpusError


@dataclass(frozen=True)
class Example:
    """One rendered trace: ``ids`` (prompt then completion), the first ``n_prompt`` of them
    the prompt (no loss there)."""

    trace_id: str
    ids: list[int]
    n_prompt: int


@dataclass
class TraceSplit:
    train: list[Example]
    held_out: list[Example]
    n_records: int
    too_long: int
    skipped: list[BadLine] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "records": self.n_records,
            "train": len(self.train),
            "held_out": len(self.held_out),
            "too_long": self.too_long,
            "skipped": len(self.skipped),
            "train_tokens": sum(len(e.ids) for e in self.train),
        }


def encode_trace(tok: Any, rec: dict[str, Any], fmt: Any = None) -> Example | None:
    """Prompt ids + completion ids of one trace record; None if it lacks the fields."""
    text = render_trace(tok, rec, fmt)
    if text is None:
        return None
    prompt = apply_template(
        tok, [{"role": "user", "content": rec["problem"]}], add_generation_prompt=True
    )
    if not text.startswith(prompt):  # render_trace builds on this very prompt
        raise CorpusError("rendered trace does not start with its prompt (template changed?)")
    p_ids = list(tok(prompt, add_special_tokens=False)["input_ids"])
    c_ids = list(tok(text[len(prompt) :], add_special_tokens=False)["input_ids"])
    return Example(str(rec.get("id", "")), p_ids + c_ids, len(p_ids))


def load_traces(
    tok: Any,
    path: str | Path,
    *,
    max_len: int,
    holdout_every: int,
    max_examples: int | None = None,
    seed: int = 0,
) -> TraceSplit:
    """Usable traces of ``path`` split into train / held out; ``max_examples`` caps the train
    part (a seeded random subset, kept in file order). Raises :class:`CorpusError` when the
    file is missing or no trace fits ``max_len``."""
    if holdout_every < 2:
        raise CorpusError("holdout_every must be >= 2")
    skipped: list[BadLine] = []
    fmt = trace_format(tok)
    train: list[Example] = []
    held: list[Example] = []
    n = too_long = usable = 0
    for i, rec in enumerate(read_jsonl(path, skipped=skipped), 1):
        n += 1
        ex = encode_trace(tok, rec, fmt)
        if ex is None:
            skipped.append(BadLine(Path(path), i, "record lacks problem/reasoning"))
            continue
        usable += 1
        if len(ex.ids) > max_len:
            too_long += 1
            continue
        (held if usable % holdout_every == 0 else train).append(ex)
    if not train:
        raise CorpusError(
            f"{path}: no usable trace fits {max_len} tokens ({n} records, {too_long} too "
            f"long, {len(skipped)} unusable); raise --max-len or check the file"
        )
    if max_examples is not None and len(train) > max_examples:
        keep = sorted(random.Random(seed).sample(range(len(train)), max_examples))
        train = [train[k] for k in keep]
    return TraceSplit(train, held, n, too_long, skipped)


def epoch_order(n: int, epoch: int, seed: int) -> list[int]:
    """The fixed shuffled order of example indices in ``epoch`` (a resumed run replays it)."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


__all__ = ["Example", "TraceSplit", "encode_trace", "epoch_order", "load_traces"]
