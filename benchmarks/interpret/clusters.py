"""Grouping features by what steering them does (the paper's Table 2), and that table.

The descriptions of each feature's steering effects (:mod:`benchmarks.interpret.steering_effects`)
go to the LLM in one request that asks for JSON: named clusters, each with the features it
holds and one sentence on what strengthening and weakening its features does. The answer is
untrusted text, so it is validated with pydantic and nothing is guessed: an answer that does
not parse leaves every feature ``unclustered``; a feature the answer omits, or puts in two
clusters, is ``unclustered``; a feature number that was not asked about is ignored (and noted).
An unclustered feature keeps its own row in the table with its own descriptions.

No maintained clustering library is installed in this project's environment (scikit-learn,
sentence-transformers), and embedding short descriptions would need a second model; the
LLM that wrote the descriptions names the groups too, as in the paper.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "NO_EFFECT",
    "UNCLUSTERED",
    "Clustering",
    "EffectCluster",
    "FeatureDescription",
    "FeatureEffect",
    "cluster_prompt",
    "effects_table",
    "group_rows",
    "parse_json_object",
    "read_clusters",
    "clusters_schema",
    "is_filler",
]

UNCLUSTERED = "unclustered"
"""The row name of a feature no cluster holds (unreadable answer, omitted, or ambiguous)."""
NO_EFFECT = "no visible effect"
"""The cluster of features whose steered outputs equal the unsteered ones on every prompt
(decided by comparing the texts, not by the LLM)."""

MAX_CLUSTERS = 8
DESCRIPTION_CHARS = 300
"""Each description is cut to this many characters in the clustering prompt."""

Side = Literal["strengthening", "weakening"]


class FeatureDescription(BaseModel):
    """What one feature's steering does, in words (``None``: that side was not measured)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature: int = Field(ge=0)
    strengthening: str | None = None
    weakening: str | None = None


Status = Literal["described", "no_change", "unreadable", "failed", "not_generated"]


class FeatureEffect(BaseModel):
    """One feature's steering effects in words (``None``: that side was not measured)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    feature: int = Field(ge=0)
    status: Status
    """``no_change``: every steered output equals the unsteered one; ``unreadable``: the
    answer was not the JSON asked for; ``failed``: the LLM request failed or the budget was
    spent (asked again by ``--resume``); ``not_generated``: no prompt with all outputs."""
    strengthening: str | None = None
    """what clamping at the positive strengths does (or why it is not described)"""
    weakening: str | None = None
    """what clamping at the negative strengths does (or why it is not described)"""
    n_prompts: int = Field(default=0, ge=0)
    """prompts whose unsteered and steered outputs were all generated"""
    reason: str | None = None

    def description(self) -> FeatureDescription:
        """The words only (what the grouping prompt and the table show)."""
        return FeatureDescription(
            feature=self.feature, strengthening=self.strengthening, weakening=self.weakening
        )


class EffectCluster(BaseModel):
    """One row of the table: a named group of features and what steering them does."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    features: list[int]
    strengthening: str
    weakening: str


class Clustering(BaseModel):
    """The clusters read from the LLM's answer and the features it left unclustered."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["clustered", "unreadable", "not_asked"]
    """``unreadable``: the answer was not the JSON asked for (every feature unclustered);
    ``not_asked``: no described feature to group."""
    clusters: list[EffectCluster] = Field(default_factory=list)
    unclustered: list[int] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    """What was dropped from the answer and why (unknown features, double assignments)."""


# ---------------------------------------------------------------- the LLM's answer
class _AnswerCluster(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=120)
    features: list[int] = Field(min_length=1)
    strengthening: str = Field(min_length=1)
    weakening: str = Field(min_length=1)


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")

    clusters: list[_AnswerCluster] = Field(min_length=1)


def clusters_schema(asked: Sequence[int]) -> dict[str, Any]:
    """The JSON schema of the clustering answer :func:`read_clusters` reads (sent as vLLM
    structured outputs to a constrained endpoint; the features are limited to those asked
    about, so a small model cannot invent one - assigning one twice is still caught)."""
    features = sorted(set(asked))
    text = {"type": "string", "minLength": 1, "maxLength": 300}
    cluster = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "minLength": 1, "maxLength": 120},
            "features": {
                "type": "array",
                "items": {"type": "integer", "enum": features},
                "minItems": 1,
                "maxItems": max(1, len(features)),
            },
            "strengthening": text,
            "weakening": text,
        },
        "required": ["name", "features", "strengthening", "weakening"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "clusters": {
                "type": "array",
                "items": cluster,
                "minItems": 1,
                "maxItems": max(1, len(features)),
            }
        },
        "required": ["clusters"],
        "additionalProperties": False,
    }


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def parse_json_object(text: str) -> dict[str, Any] | None:
    """The JSON object in an LLM answer: the whole text, a fenced block, or the span from the
    first ``{`` to the last ``}``; ``None`` when none of those is a JSON object."""
    candidates = [text.strip()]
    candidates += [m.group(1).strip() for m in _FENCE.finditer(text)]
    lo, hi = text.find("{"), text.rfind("}")
    if 0 <= lo < hi:
        candidates.append(text[lo : hi + 1])
    for c in candidates:
        try:
            obj = json.loads(c)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    return None


def _one_line(text: str, limit: int | None = None) -> str:
    s = " ".join(text.split())
    if limit is not None and len(s) > limit:
        s = s[: limit - 1].rstrip() + "…"
    return s


_NAME_PLACEHOLDER, _TEXT_PLACEHOLDER = "short name", "one sentence"
_PLACEHOLDERS = frozenset({_NAME_PLACEHOLDER, _TEXT_PLACEHOLDER})
"""The example's placeholder texts in :func:`cluster_prompt` (a weak model copies them)."""


def is_filler(text: str, *, min_words: int = 2) -> bool:
    """Whether an LLM's text is no description at all: fewer than ``min_words`` words
    (``"..."``, ``"2"``), or a placeholder of the answer's example copied back. Seen from the
    served 135M model once its answers were constrained to the JSON form."""
    words = re.findall(r"[^\W\d_]+", text.lower())
    return len(words) < min_words or " ".join(words) in _PLACEHOLDERS


def cluster_prompt(descriptions: Sequence[FeatureDescription], sides: Sequence[Side]) -> str:
    """The one request that groups ``descriptions`` (``sides``: what was measured)."""
    n_max = max(1, min(MAX_CLUSTERS, math.ceil(len(descriptions) / 2)))
    lines = [
        "Each feature below is an internal feature of a language model (a sparse "
        "autoencoder latent). Steering a feature means clamping it during generation: "
        '"strengthening" clamps it at a positive strength, "weakening" at a negative '
        "strength. For each feature you get a description of how the steered outputs "
        "differed from the unsteered ones.",
        "",
        f"Group the features whose steering has similar effects into at most {n_max} "
        "clusters. Name each cluster in a few words and say in one sentence what "
        "strengthening and what weakening its features does. Every feature belongs to "
        "exactly one cluster.",
        "",
    ]
    for d in descriptions:
        parts = [f"Feature {d.feature}:"]
        for side in sides:
            text = getattr(d, side)
            parts.append(f"{side}: {_one_line(text or 'not measured', DESCRIPTION_CHARS)}")
        lines.append(" ".join(parts[:1]) + " " + "; ".join(parts[1:]))
    example = {
        "clusters": [
            {
                "name": _NAME_PLACEHOLDER,
                "features": [d.feature for d in descriptions[:2]],
                "strengthening": _TEXT_PLACEHOLDER,
                "weakening": _TEXT_PLACEHOLDER,
            }
        ]
    }
    lines += ["", "Answer with JSON only, in this form:", json.dumps(example)]
    return "\n".join(lines)


def read_clusters(
    answer: str | None, asked: Sequence[int], sides: Sequence[Side] = ("strengthening", "weakening")
) -> Clustering:
    """Validate the LLM's clustering answer against the features ``asked`` about.

    Never guesses: unreadable -> all unclustered; omitted or twice-assigned -> unclustered;
    unknown numbers dropped. A side that was not measured reads "not measured" whatever the
    answer says about it.
    """
    asked_set = set(asked)
    if not asked:
        return Clustering(status="not_asked")
    obj = parse_json_object(answer) if answer is not None else None
    try:
        parsed = _Answer.model_validate(obj) if obj is not None else None
    except ValidationError:
        parsed = None
    if parsed is None:
        return Clustering(status="unreadable", unclustered=sorted(asked_set))
    notes: list[str] = []
    seen: dict[int, int] = {}
    kept: list[_AnswerCluster] = []
    in_copied: set[int] = set()
    for c in parsed.clusters:
        if is_filler(c.name, min_words=1) or any(is_filler(getattr(c, side)) for side in sides):
            notes.append(
                f"cluster {c.name!r}: no description (an example's placeholder or not a "
                "sentence); its features left unclustered"
            )
            in_copied.update(c.features)
        else:
            kept.append(c)
    for i, c in enumerate(kept):
        for f in c.features:
            if f not in asked_set:
                notes.append(f"cluster {c.name!r}: feature {f} was not asked about; dropped")
            elif f in seen and seen[f] != i:
                seen[f] = -1  # in two clusters: ambiguous
            else:
                seen.setdefault(f, i)
    twice = sorted(f for f, i in seen.items() if i < 0)
    if twice:
        notes.append(f"features in more than one cluster, left unclustered: {twice}")
    clusters = []
    for i, c in enumerate(kept):
        feats = sorted({f for f in c.features if seen.get(f) == i})
        if not feats:
            continue
        clusters.append(
            EffectCluster(
                name=_one_line(c.name),
                features=feats,
                strengthening=_one_line(c.strengthening)
                if "strengthening" in sides
                else "not measured",
                weakening=_one_line(c.weakening) if "weakening" in sides else "not measured",
            )
        )
    unclustered = sorted(asked_set - {f for f, i in seen.items() if i >= 0})
    missing = sorted(set(unclustered) - set(twice) - in_copied)
    if missing:
        notes.append(f"features the answer left out, unclustered: {missing}")
    return Clustering(status="clustered", clusters=clusters, unclustered=unclustered, notes=notes)


def group_rows(
    effects: Sequence[FeatureEffect], clustering: Clustering, sides: Sequence[Side]
) -> tuple[list[EffectCluster], list[FeatureDescription]]:
    """The table's rows: the LLM's clusters, then the ``no visible effect`` group (decided
    from the texts), and the features left unclustered (not grouped by the answer, or not
    described: unreadable or failed) with their own words."""
    clusters = list(clustering.clusters)
    quiet = [e.feature for e in effects if e.status == "no_change"]
    if quiet:
        same = "outputs identical to unsteered"
        clusters.append(
            EffectCluster(
                name=NO_EFFECT,
                features=quiet,
                strengthening=same if "strengthening" in sides else "not measured",
                weakening=same if "weakening" in sides else "not measured",
            )
        )
    left = set(clustering.unclustered)
    left |= {e.feature for e in effects if e.status in ("unreadable", "failed")}
    by_feature = {e.feature: e for e in effects}
    return clusters, [by_feature[f].description() for f in sorted(left)]


# ---------------------------------------------------------------- the table
def _cell(text: str | None) -> str:
    return _one_line(text or "not measured").replace("|", "\\|")


def effects_table(
    clusters: Sequence[EffectCluster],
    unclustered: Sequence[FeatureDescription],
    *,
    header: Sequence[str] = (),
    not_generated: Mapping[int, str] | None = None,
) -> str:
    """The Markdown table: cluster | features | strengthening does | weakening does.

    Clusters first (in the answer's order), then one ``unclustered`` row per unclustered
    feature with its own descriptions; features that could not be generated are listed
    under the table with the reason.
    """
    lines = list(header)
    if lines:
        lines.append("")
    lines += [
        "| cluster | features | strengthening does | weakening does |",
        "|---|---|---|---|",
    ]
    for c in clusters:
        feats = ", ".join(str(f) for f in c.features)
        lines.append(
            f"| {_cell(c.name)} | {feats} | {_cell(c.strengthening)} | {_cell(c.weakening)} |"
        )
    for d in unclustered:
        lines.append(
            f"| {UNCLUSTERED} | {d.feature} | {_cell(d.strengthening)} | {_cell(d.weakening)} |"
        )
    if not_generated:
        lines += ["", "Not described (no usable generations):", ""]
        lines += [
            f"- feature {f}: {_one_line(why, 300)}" for f, why in sorted(not_generated.items())
        ]
    return "\n".join(lines) + "\n"
