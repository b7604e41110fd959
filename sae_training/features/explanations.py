"""Explanations of features and how well they predict the feature: the one owner of
``explanations.json`` (beside the SAE, name in :mod:`sae_steer_vllm.constants`).

``sae-steer explain`` (:mod:`benchmarks.interpret`) writes it; the ranked table and the
dashboards read it, so a feature's words and its scores are shown wherever the feature is.
A score is a balanced accuracy (0.5 = chance) over held-out contexts the explainer never
saw, with a 95% interval, as in delphi's detection and fuzzing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_steer_vllm.constants import EXPLANATIONS_FILE
from sae_steer_vllm.files import atomic_write
from sae_training.errors import FeatureStatsError

EXPLANATIONS_FORMAT_VERSION = 1


class ExplanationScore(BaseModel):
    """One scoring method's result for one explanation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    balanced_accuracy: float = Field(ge=0.0, le=1.0)
    ci_low: float = Field(ge=0.0, le=1.0)
    ci_high: float = Field(ge=0.0, le=1.0)
    n_positive: int = Field(ge=0)
    """held-out contexts that should fit (activating, or correctly marked)"""
    n_negative: int = Field(ge=0)
    """contexts that should not fit (non-activating, or wrongly marked)"""
    n_unclear: int = Field(default=0, ge=0)
    """judge answers that could not be read; counted as wrong, never guessed"""


class FeatureExplanation(BaseModel):
    """One feature's explanation and its scores (``None`` = not scored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature: int = Field(ge=0)
    explanation: str
    detection: ExplanationScore | None = None
    fuzzing: ExplanationScore | None = None


class ExplanationsFile(BaseModel):
    """The whole file: run settings (explainer model, sizes, seed) and one entry per feature."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = EXPLANATIONS_FORMAT_VERSION
    meta: dict[str, Any] = Field(default_factory=dict)
    features: list[FeatureExplanation] = Field(default_factory=list)

    def by_feature(self) -> dict[int, FeatureExplanation]:
        return {e.feature: e for e in self.features}


def explanations_path(path: str | Path) -> Path:
    """The file inside an SAE folder, or ``path`` itself when it names a file."""
    p = Path(path)
    return p / EXPLANATIONS_FILE if p.is_dir() else p


def write_explanations(path: str | Path, data: ExplanationsFile) -> Path:
    """Write atomically into an SAE folder (or to a file path); returns the file."""
    return atomic_write(explanations_path(path), data.model_dump_json(indent=2) + "\n")


def read_explanations(path: str | Path) -> ExplanationsFile | None:
    """The explanations beside an SAE (or in a file); ``None`` when there are none yet."""
    p = explanations_path(path)
    if not p.is_file():
        return None
    try:
        data = ExplanationsFile.model_validate_json(p.read_text())
    except ValidationError as e:
        raise FeatureStatsError(f"{p} is not a valid explanations file: {e}") from e
    if data.format_version != EXPLANATIONS_FORMAT_VERSION:
        raise FeatureStatsError(
            f"{p} has format_version {data.format_version}; this sae-steer reads "
            f"{EXPLANATIONS_FORMAT_VERSION} (re-run `sae-steer explain`)"
        )
    return data
