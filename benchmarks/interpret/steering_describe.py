"""What the describer of a steered feature is shown, and how its answer is read.

One request per feature (:func:`describe_prompt`): per prompt the unsteered output and each
steered one, long outputs cut in the middle; the answer is JSON with one sentence per side
measured (:func:`description_schema` is the form a constrained endpoint must keep;
:func:`read_description` reads it and never guesses).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from benchmarks.interpret.clusters import Side, is_filler, parse_json_object
from benchmarks.problems import Problem
from benchmarks.sweep import BASELINE

__all__ = ["describe_prompt", "description_schema", "read_description"]

MAX_SHOWN_PROMPTS = 6
"""At most this many prompts (with all their outputs) go into one describe prompt."""
PROMPT_CHARS = 400
OUTPUT_HEAD_CHARS = 600
OUTPUT_TAIL_CHARS = 200
"""A long output is shown as its first and last characters: the start says what it does,
the end shows whether it loops or stops."""


def _clip(text: str, head: int, tail: int = 0) -> str:
    text = text.strip()
    if len(text) <= head + tail:
        return text
    cut = f"{text[:head].rstrip()} [... {len(text) - head - tail} characters cut ...]"
    return cut + (f" {text[-tail:].lstrip()}" if tail else "")


_SIDE_ORDER: tuple[Side, ...] = ("weakening", "strengthening")


def _label(side: Side, s: float) -> str:
    return f"{'Strengthened' if side == 'strengthening' else 'Weakened'} (clamped at {s:g})"


def describe_prompt(
    feature: int,
    problems: Sequence[Problem],
    texts: dict[tuple[str, str], str],
    arms: dict[Side, list[tuple[float, str]]],
) -> str:
    """The describe request: per prompt the unsteered output and each steered one
    (``arms``: side -> [(strength, arm name)], only the sides asked about)."""
    sides = [side for side in _SIDE_ORDER if arms.get(side)]
    lines = [
        "A language model answered the same prompts without steering and with one internal "
        f"feature (feature {feature} of a sparse autoencoder) clamped during generation: "
        "at a negative strength (weakened) and/or at a positive strength (strengthened). "
        "Long outputs are cut in the middle.",
    ]
    for i, p in enumerate(problems[:MAX_SHOWN_PROMPTS], 1):
        lines += ["", f"## Prompt {i}", _clip(p.problem, PROMPT_CHARS), "", "### Unsteered"]
        lines.append(_clip(texts[(p.id, BASELINE)], OUTPUT_HEAD_CHARS, OUTPUT_TAIL_CHARS))
        for side in sides:
            for s, name in arms[side]:
                lines += ["", f"### {_label(side, s)}"]
                lines.append(_clip(texts[(p.id, name)], OUTPUT_HEAD_CHARS, OUTPUT_TAIL_CHARS))
    asks = " and ".join(
        f"how the {'strengthened' if side == 'strengthening' else 'weakened'} outputs differ "
        "from the unsteered ones"
        for side in sides
    )
    keys = ", ".join(f'"{side}": "..."' for side in sides)
    lines += [
        "",
        f"Describe in one or two sentences each {asks}: style, length, reasoning, "
        'repetition, language, content. Write "no clear change" when there is none.',
        f"Answer with JSON only: {{{keys}}}",
    ]
    return "\n".join(lines)


class _Described(BaseModel):
    model_config = ConfigDict(extra="ignore")

    strengthening: str | None = Field(default=None, min_length=1)
    weakening: str | None = Field(default=None, min_length=1)


def description_schema(sides: Sequence[Side]) -> dict[str, Any]:
    """The JSON schema of a description answer (:func:`read_description` reads it; sent
    as vLLM structured outputs to a constrained endpoint)."""
    return {
        "type": "object",
        "properties": {
            side: {"type": "string", "minLength": 1, "maxLength": 400} for side in sides
        },
        "required": list(sides),
        "additionalProperties": False,
    }


def read_description(answer: str, sides: Sequence[Side]) -> dict[str, str] | None:
    """The described sides of a describe answer; None when it is not the JSON asked for
    or keeps the form but describes nothing (never guessed)."""
    obj = parse_json_object(answer)
    try:
        got = _Described.model_validate(obj) if obj is not None else None
    except ValidationError:
        return None
    if got is None or any(getattr(got, side) is None for side in sides):
        return None
    if any(is_filler(str(getattr(got, side))) for side in sides):
        return None  # "...", "2": the form was kept, nothing was described
    return {side: " ".join(str(getattr(got, side)).split()) for side in sides}
