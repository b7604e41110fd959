"""Problem sets: the shipped benchmarks, GPQA from a user's file, any JSONL of problems.

Dataset lines are untrusted: a line without a usable problem or answer is
skipped and counted (never a crash), so a run over a hand-made file says how
much of it was actually evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from benchmarks.grading import GraderKind
from benchmarks.multiple_choice import DEFAULT_CHOICE_SEED, load_choice_file
from benchmarks.prompts import DEFAULT_INSTRUCTION, DEFAULT_PROMPT_TEMPLATE, fill_template
from sae_steer_vllm.errors import EXIT_USAGE
from sae_training import BadLine, CorpusError, data_file, read_jsonl

__all__ = [
    "DEFAULT_INSTRUCTION",
    "DEFAULT_PROMPT_TEMPLATE",
    "PRESETS",
    "LoadedProblems",
    "Problem",
    "ProblemSetError",
    "load_problems",
    "render_prompt",
]


class ProblemSetError(CorpusError):
    """A problem set the user named cannot be read: a usage error (nothing was sent)."""

    exit_code = EXIT_USAGE


class Problem(BaseModel):
    """One benchmark item, validated from a dataset line."""

    model_config = ConfigDict(frozen=True)

    id: str = Field(min_length=1)
    problem: str = Field(min_length=1)
    answer: str = Field(min_length=1)
    kind: GraderKind = "math"
    choice_order: tuple[int, ...] | None = None
    """Multiple choice: the permutation shown (``problem`` is then the whole query)."""


@dataclass(frozen=True)
class DatasetPreset:
    file: str
    problem_field: str
    answer_field: str
    id_field: str | None
    kind: GraderKind


PRESETS: dict[str, DatasetPreset] = {
    "aime24": DatasetPreset("aime24.jsonl", "problem", "answer", "id", "math"),
    "math500": DatasetPreset("math500.jsonl", "problem", "answer", "unique_id", "math"),
    "gsm8k": DatasetPreset("gsm8k_test.jsonl", "question", "final_answer", "id", "numeric"),
    # gated: the user puts the file there (format: benchmarks/multiple_choice.py)
    "gpqa": DatasetPreset("gpqa_diamond.jsonl", "question", "correct", "id", "choice"),
}


@dataclass
class LoadedProblems:
    """Problems plus what was dropped, so callers can warn with counts."""

    name: str
    path: Path
    problems: list[Problem]
    missing_answer: int = 0
    missing_problem: int = 0
    bad_lines: list[BadLine] = field(default_factory=list)
    bad_choice_lines: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return (
            self.missing_answer
            + self.missing_problem
            + len(self.bad_lines)
            + len(self.bad_choice_lines)
        )

    def warnings(self) -> list[str]:
        out = []
        if self.bad_lines:
            out.append(f"{self.path}: skipped {len(self.bad_lines)} malformed line(s)")
        if self.missing_problem:
            out.append(f"{self.path}: skipped {self.missing_problem} line(s) without a problem")
        if self.missing_answer:
            out.append(f"{self.path}: skipped {self.missing_answer} line(s) without an answer")
        if self.bad_choice_lines:
            out.append(
                f"{self.path}: skipped {len(self.bad_choice_lines)} bad multiple-choice line(s):"
            )
            out += [f"  {m}" for m in self.bad_choice_lines[:20]]
        return out


def _as_text(v: Any) -> str | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, str) and v.strip():
        return v.strip()
    return None


def load_problems(
    dataset: str,
    *,
    problem_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    kind: GraderKind | None = None,
    limit: int | None = None,
    choice_seed: int = DEFAULT_CHOICE_SEED,
) -> LoadedProblems:
    """Load a preset (``aime24``, ``math500``, ``gsm8k``, ``gpqa``) or a JSONL path.

    Field names default to the preset's (or ``problem``/``answer``/``id`` for a
    plain file). Without an id field, the 0-based line index is the id. GSM8K
    is graded numerically, GPQA (``kind="choice"``) by letter, everything else with
    math-verify, unless ``kind`` says otherwise. Multiple-choice files have their own
    format (:mod:`benchmarks.multiple_choice`); ``choice_seed`` shuffles their choices.
    """
    preset = PRESETS.get(dataset)
    if preset is not None:
        path, name = data_file(preset.file), dataset
    else:
        path = data_file(dataset)
        name = path.stem
    pf = problem_field or (preset.problem_field if preset else "problem")
    af = answer_field or (preset.answer_field if preset else "answer")
    idf = id_field or (preset.id_field if preset else "id")
    k: GraderKind = kind or (preset.kind if preset else "math")
    if not path.is_file():
        known = ", ".join(PRESETS)
        if k == "choice":
            raise ProblemSetError(
                f"{path}: no such file. GPQA is gated: write it yourself as JSONL, one "
                '{"id": ..., "question": ..., "choices": [right, wrong, wrong, wrong], '
                '"correct": 0} a line (docs/eval.md, "Multiple choice"), into $SAE_STEER_DATA '
                "or pass its path with --dataset PATH --grader choice"
            )
        raise ProblemSetError(
            f"{path}: no such file (dataset is a preset: {known}; or a JSONL path)"
        )
    if k == "choice":
        return _load_choices(name, path, id_field=idf, limit=limit, seed=choice_seed)

    out = LoadedProblems(name=name, path=path, problems=[])
    seen: set[str] = set()
    for i, rec in enumerate(read_jsonl(path, skipped=out.bad_lines)):
        if limit is not None and len(out.problems) >= limit:
            break
        prob, ans = _as_text(rec.get(pf)), _as_text(rec.get(af))
        if prob is None:
            out.missing_problem += 1
            continue
        if ans is None:
            out.missing_answer += 1
            continue
        pid = (_as_text(rec.get(idf)) if idf else None) or str(i)
        if pid in seen:  # ids key the resume log: keep them unique
            pid = f"{pid}#{i}"
        seen.add(pid)
        out.problems.append(Problem(id=pid, problem=prob, answer=ans, kind=k))
    return out


def _load_choices(
    name: str, path: Path, *, id_field: str | None, limit: int | None, seed: int
) -> LoadedProblems:
    loaded = load_choice_file(path, seed=seed, id_field=id_field)
    out = LoadedProblems(name=name, path=path, problems=[], bad_choice_lines=loaded.errors)
    for it in loaded.items[:limit]:
        out.problems.append(
            Problem(
                id=it.id, problem=it.query, answer=it.answer, kind="choice", choice_order=it.order
            )
        )
    return out


def render_prompt(problem: Problem, template: str = DEFAULT_PROMPT_TEMPLATE) -> str:
    """The user message for a problem (``{problem}`` in the template is replaced).

    A multiple-choice problem is already its whole query (simple-evals' text): the template
    does not apply to it.
    """
    if problem.kind == "choice":
        return problem.problem
    return fill_template(template, problem.problem)
