"""Every prompt sent to the explainer / judge LLM and its answer: the audit trail and the
resume state of ``sae-steer explain`` (``explain_log.jsonl``, name in
:mod:`sae_steer_vllm.constants`).

One JSON line per answered request, appended and flushed as soon as the answer arrives, so
a run stopped at any point (budget, Ctrl-C, a dead endpoint) loses no answer. A line is keyed
by ``(kind, feature, item)``: ``kind`` names the question (``explain``, ``detection``,
``fuzzing``; the steering mode adds its own kinds), ``item`` which one of that feature's
requests it is. ``--resume`` re-uses the logged answer of a key whose prompt is unchanged
and asks only for the rest; a changed prompt (other settings) is asked again.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from sae_steer_vllm.errors import UsageError

LogKey = tuple[str, int, str]
"""``(kind, feature, item)``; ``item`` is a string so any kind can name its items freely."""


class LogLine(BaseModel):
    """One line of the log (validated when read back: the file is user-editable)."""

    model_config = ConfigDict(extra="ignore")

    kind: str
    feature: int
    item: str
    prompt: str
    answer: str
    time: float = 0.0


def _key(key: tuple[str, int, str | int]) -> LogKey:
    kind, feature, item = key
    return (str(kind), int(feature), str(item))


class ExplainLog:
    """The log file, read once, then appended to (one writer: the running command)."""

    def __init__(self, path: str | Path, *, resume: bool = True) -> None:
        """``resume=False`` refuses an existing, non-empty log instead of mixing two runs."""
        self.path = Path(path)
        self._lines: dict[LogKey, LogLine] = {}
        self.n_bad_lines = 0
        if self.path.is_file() and self.path.stat().st_size > 0:
            if not resume:
                raise UsageError(
                    f"{self.path} already exists: pass --resume to continue that run, "
                    "or choose another --out"
                )
            self._read()

    def _read(self) -> None:
        for raw in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            if not raw.strip():
                continue
            try:
                line = LogLine.model_validate_json(raw)
            except ValidationError:  # e.g. a line cut short by a crash: asked again
                self.n_bad_lines += 1
                continue
            self._lines[(line.kind, line.feature, line.item)] = line

    def __len__(self) -> int:
        return len(self._lines)

    def get(self, key: tuple[str, int, str | int], prompt: str | None = None) -> str | None:
        """The logged answer for ``key``; None when there is none, or when ``prompt`` is
        given and differs from the logged one (the question changed: ask again)."""
        line = self._lines.get(_key(key))
        if line is None or (prompt is not None and line.prompt != prompt):
            return None
        return line.answer

    def put(self, key: tuple[str, int, str | int], prompt: str, answer: str) -> None:
        """Append one answered request and flush it to disk before returning."""
        kind, feature, item = _key(key)
        line = LogLine(
            kind=kind, feature=feature, item=item, prompt=prompt, answer=answer, time=time.time()
        )
        self._lines[(kind, feature, item)] = line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line.model_dump_json() + "\n")
            f.flush()
            os.fsync(f.fileno())

    def entries(self) -> list[dict[str, Any]]:
        """Every logged line (the latest per key), for audits and tests."""
        return [json.loads(v.model_dump_json()) for v in self._lines.values()]
