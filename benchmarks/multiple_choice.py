"""Multiple-choice benchmarks (GPQA-Diamond): the file format, the shuffle, the letter.

GPQA is gated, so the project ships the format, not the data. One JSON object a line::

    {"id": "rec1", "question": "...", "choices": ["right", "wrong 1", "wrong 2", "wrong 3"],
     "correct": 0}

``correct`` is the 0-based index of the right choice in ``choices`` as written. GPQA's CSV
converts as ``choices = [Correct Answer, Incorrect Answer 1, 2, 3]``, ``correct = 0``.

The protocol is openai/simple-evals' ``gpqa_eval.py``: one ``random.Random(seed)`` draws a
permutation of the choices for every item in file order (``rng.sample(range(n), n)``), the
query is :data:`~benchmarks.prompts.MULTICHOICE_TEMPLATE`, and the answer is the first match
of ``(?i)Answer[ \\t]*:[ \\t]*\\$?([A-D])\\$?``, compared with the right letter as written
(simple-evals compares case-sensitively, so ``Answer: b`` is wrong). With seed 0 and the
items in GPQA's CSV order, the permutations are simple-evals' own. The seed goes into
``config.json`` and every sample records its item's permutation, so a run can be checked.
Reasoning models write ``Answer:`` inside their thoughts too, so the letter is read from the
text after the first ``</think>`` when there is one (what simple-evals sees from a server that
splits reasoning off); a trace without ``</think>`` is read whole.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from benchmarks.prompts import choice_letters, format_multichoice

THINK_END = "</think>"
DEFAULT_CHOICE_SEED = 0
"""simple-evals' ``random.Random(0)``."""


class ChoiceItem(BaseModel):
    """One line of a multiple-choice JSONL file."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str | int | None = None
    question: str = Field(min_length=1)
    choices: list[str] = Field(min_length=2, max_length=26)
    correct: int = Field(ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> ChoiceItem:
        if any(not c.strip() for c in self.choices):
            raise ValueError("every choice must be non-empty text")
        if len(set(self.choices)) != len(self.choices):
            raise ValueError("choices must be distinct (the right one is found by its text)")
        if self.correct >= len(self.choices):
            raise ValueError(
                f"correct={self.correct} but there are only {len(self.choices)} choices "
                "(0-based index)"
            )
        return self


@dataclass(frozen=True)
class ShuffledItem:
    """An item as shown: the query text, the right letter, and the permutation used."""

    id: str
    query: str
    answer: str
    order: tuple[int, ...]
    """``order[k]`` is the index in the file's ``choices`` of the choice shown as letter k."""


@dataclass
class LoadedChoices:
    items: list[ShuffledItem]
    errors: list[str] = field(default_factory=list)
    """One message per bad line: ``path:line: what is wrong``."""


def shuffle_item(item: ChoiceItem, item_id: str, rng: random.Random) -> ShuffledItem:
    """Draw the item's permutation from ``rng`` (one draw per item, as simple-evals)."""
    n = len(item.choices)
    order = tuple(rng.sample(range(n), n))
    shown = [item.choices[i] for i in order]
    right = shown.index(item.choices[item.correct])
    return ShuffledItem(
        id=item_id,
        query=format_multichoice(item.question, shown),
        answer=choice_letters(n)[right],
        order=order,
    )


def _short(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:3]:
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def load_choice_file(
    path: Path, *, seed: int = DEFAULT_CHOICE_SEED, id_field: str | None = "id"
) -> LoadedChoices:
    """Every valid line of ``path``, shuffled with ``random.Random(seed)`` in file order.

    Bad lines are not fatal: each is reported as ``path:line: reason`` and takes no draw from
    the generator, so the permutations of the good lines do not depend on the bad ones.
    """
    rng = random.Random(seed)
    out = LoadedChoices(items=[])
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                out.errors.append(f"{path}:{no}: invalid JSON ({e.msg})")
                continue
            if not isinstance(raw, dict):
                out.errors.append(f"{path}:{no}: expected a JSON object")
                continue
            if id_field and id_field != "id":
                raw = {**raw, "id": raw.get(id_field)}
            try:
                item = ChoiceItem.model_validate(raw)
            except ValidationError as e:
                out.errors.append(f"{path}:{no}: {_short(e)}")
                continue
            iid = str(item.id) if item.id is not None and str(item.id).strip() else str(no - 1)
            if iid in seen:  # ids key the resume log: keep them unique
                iid = f"{iid}#{no - 1}"
            seen.add(iid)
            out.items.append(shuffle_item(item, iid, rng))
    return out


def letter_pattern(n: int) -> re.Pattern[str]:
    """simple-evals' ``ANSWER_PATTERN_MULTICHOICE`` for ``n`` choices (``[A-D]`` for four)."""
    last = choice_letters(n)[-1]
    return re.compile(rf"(?i)Answer[ \t]*:[ \t]*\$?([A-{last}])\$?")


def extract_letter(text: str, n_choices: int = 4) -> str | None:
    """The first ``Answer: X`` of the response (after the first ``</think>``, if any)."""
    i = text.find(THINK_END)
    response = text[i + len(THINK_END) :] if i >= 0 else text
    m = letter_pattern(n_choices).search(response)
    return m.group(1) if m else None
