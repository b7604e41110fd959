"""``steps.json``: which demo steps are done, keyed on a fingerprint of their inputs.

Why "keyed on config": every step records a fingerprint of its inputs; a step whose
fingerprint still matches and whose outputs exist is skipped, and one whose inputs
changed is redone from scratch (a retrained SAE would make old study samples of
"feature 123" meaningless). The file is rewritten atomically after every change, so a
Ctrl-C never leaves it half written and the next run continues where this one stopped.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sae_steer_vllm.constants import DEMO_STATE_FILE
from sae_steer_vllm.files import atomic_write_json, sha256_file

STEPS = ("model", "sae", "score", "server", "study", "report")
"""The default demo's steps, in order."""
ALL_STEPS: tuple[str, ...] = ("model", "distill", "sae", "score", "server", "study", "report")
ALL_STEPS += ("explain", "steering effects", "diff")
"""Every step in run order, with the optional interpretation ones (``--distill``, ...)."""
TITLES = {
    "model": "Prepare the model",
    "distill": "Distill a reasoning model (sae-steer distill)",
    "explain": "Explain the top and random features (sae-steer explain)",
    "steering effects": "What steering does, in words (sae-steer explain --steering)",
    "diff": "Model diffing against the base model (sae-steer diff)",
    "sae": "Collect activations and train the SAE",
    "score": "ReasonScore, feature statistics and dashboards",
    "server": "Start the steering server",
    "study": "Run the steering study",
    "report": "Write the report",
}


def file_digest(path: Path) -> str:
    """Short content fingerprint of an input file (SAE weights, statistics)."""
    return sha256_file(path)[:16]


def say(msg: str = "") -> None:
    """The demo's terminal output (flushed: progress bars interleave with it)."""
    print(msg, flush=True)


class State:
    """Per step: the fingerprint of its inputs, whether it finished, the seconds it took."""

    def __init__(self, root: Path) -> None:
        self.path = root / DEMO_STATE_FILE
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def done(self, step: str, key: str) -> bool:
        ent = self.data.get(step) or {}
        return bool(ent.get("key") == key and ent.get("done"))

    def key(self, step: str) -> str | None:
        return (self.data.get(step) or {}).get("key")

    def mark(self, step: str, key: str, done: bool, **extra: Any) -> None:
        prev = dict(self.data.get(step) or {})
        if not done:
            prev.pop("seconds", None)  # being (re)computed: its old timing no longer applies
        self.data[step] = {**prev, "key": key, "done": done, **extra}
        atomic_write_json(self.path, self.data)

    def record_seconds(self, step: str, seconds: float) -> None:
        """Keep how long a step took when it was computed (a reused step keeps its time)."""
        ent = self.data.get(step)
        if ent and ent.get("done") and "seconds" not in ent:
            self.mark(step, str(ent["key"]), True, seconds=round(seconds, 1))

    def seconds(self) -> dict[str, float]:
        return {s: float(self.data[s].get("seconds", 0.0)) for s in STEPS if s in self.data}


@contextmanager
def step_header(
    step: str, timing: dict[str, float], steps: tuple[str, ...] = STEPS
) -> Iterator[None]:
    """Print the step's ``━━ [n/N] title ━━`` header (n of the ``steps`` this run takes) and
    time the block into ``timing``."""
    say(f"\n━━ [{steps.index(step) + 1}/{len(steps)}] {TITLES[step]} ━━")
    t0 = time.perf_counter()
    yield
    timing[step] = time.perf_counter() - t0
