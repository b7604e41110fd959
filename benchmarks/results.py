"""The per-sample JSONL log: the one source every table and plot is computed from.

Each sample is appended as one line and flushed at once, so a crash or Ctrl-C
loses at most the line being written. On reopening, a torn last line is cut
off before appending (otherwise the next record would be glued to it), and
lines that do not parse are counted and ignored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, ValidationError, computed_field

from benchmarks.metrics import GradedSample, is_looped, repeated_ngram_share
from sae_steer_vllm.constants import RUN_CONFIG_FILE as CONFIG_FILE
from sae_steer_vllm.constants import SAMPLES_FILE as SAMPLES_FILE  # tests import it from here
from sae_steer_vllm.files import atomic_write
from sae_steer_vllm.readout_api import FeatureSummary

SampleKey = tuple[str, str, str, str, int]
"""(dataset, problem_id, spec_name, spec_json, sample_index)."""


class SampleRecord(BaseModel):
    """One line of ``samples.jsonl``."""

    model_config = ConfigDict(extra="ignore")

    dataset: str
    problem_id: str
    spec_name: str
    spec: str | None  # SteeringSpec JSON as sent; None = unsteered
    sample_index: int
    seed: int | None
    gold_answer: str
    completion: str = ""
    finish_reason: str | None = None
    extracted_answer: str | None = None
    correct: bool = False
    grade_method: str | None = None
    grade_detail: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    reasoning_words: int = 0
    has_think_end: bool = False
    reasoning_source: str = "chars"
    """How ``reasoning_tokens`` was counted: ``token_ids`` (before the first ``</think>`` id in
    the completion's ids, the paper's count) or ``chars`` (estimated: the endpoint sent no ids)."""
    choice_order: list[int] | None = None
    """Multiple choice: the permutation of the file's choices shown as A, B, C, ..."""
    judge_verdict: str | None = None
    """The LLM judge's verdict (yes / no / unclear / error) when it decided this sample."""
    judge_response: str | None = None
    tokens_estimated: bool = False
    latency_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    error_kind: str | None = None
    readout: dict[str, dict[str, FeatureSummary]] | None = None
    """SAE -> watched feature (as a string) -> its summary over the generated tokens (the
    response's ``sae_readout.saes[SAE].summary``; no per-token values). None: the request
    read nothing (every log written before readout existed reads so)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def repeated_ngram_share(self) -> float | None:
        """Degeneration: the share of the completion's word 4-grams that repeat an earlier one
        (:func:`benchmarks.metrics.repeated_ngram_share`). Derived from ``completion`` whenever
        read, so logs written before it existed report it too; written to each line for
        readers of the log. None (n/a) for a failed request or a line without the text."""
        return repeated_ngram_share(self.completion) if self._measurable else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def looped(self) -> bool | None:
        """The completion ends in a loop (:func:`benchmarks.metrics.is_looped`); None as above."""
        return is_looped(self.completion) if self._measurable else None

    @property
    def _measurable(self) -> bool:
        return self.ok and "completion" in self.model_fields_set

    @property
    def key(self) -> SampleKey:
        return (self.dataset, self.problem_id, self.spec_name, self.spec or "", self.sample_index)

    @property
    def ok(self) -> bool:
        return self.error is None

    def graded(self) -> GradedSample:
        return GradedSample(
            problem_id=self.problem_id,
            sample_index=self.sample_index,
            correct=self.correct,
            extracted_answer=self.extracted_answer,
            completion_tokens=self.completion_tokens,
            reasoning_tokens=self.reasoning_tokens,
            reasoning_words=self.reasoning_words,
            reasoning_estimated=self.reasoning_source != "token_ids",
            has_think_end=self.has_think_end,
            repeated_ngram_share=self.repeated_ngram_share,
            looped=self.looped,
        )


@dataclass
class LoadedLog:
    """Latest record per key; successful records always win over errors."""

    records: dict[SampleKey, SampleRecord] = field(default_factory=dict)
    bad_lines: int = 0
    torn_tail: bool = False

    def done(self) -> set[SampleKey]:
        return {k for k, r in self.records.items() if r.ok}


def read_log(path: str | Path) -> LoadedLog:
    p = Path(path)
    out = LoadedLog()
    if not p.is_file():
        return out
    data = p.read_bytes()
    out.torn_tail = bool(data) and not data.endswith(b"\n")
    for line in data.decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = SampleRecord.model_validate(json.loads(line))
        except (json.JSONDecodeError, ValidationError):
            out.bad_lines += 1
            continue
        prev = out.records.get(rec.key)
        if prev is None or rec.ok or not prev.ok:
            out.records[rec.key] = rec
    return out


def _cut_torn_tail(p: Path) -> None:
    """Truncate everything after the last newline (a line half-written by a crash)."""
    with p.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size == 0:
            return
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return
        pos = size
        chunk = 4096
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            i = buf.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


class ResultLog:
    """Append-only writer; one ``write`` = one flushed line."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _cut_torn_tail(self.path)
        self._f: IO[str] = self.path.open("a", encoding="utf-8")

    def write(self, rec: SampleRecord) -> None:
        self._f.write(rec.model_dump_json() + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> ResultLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    atomic_write(out_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")


def read_config(out_dir: Path) -> dict[str, Any] | None:
    p = out_dir / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return raw if isinstance(raw, dict) else None
