"""Which steering settings to run: a baseline plus a grid, or a file of named specs.

Specs are the server's own :class:`SteeringSpec` (``sae_steer_vllm.spec``), so
a sweep can only ask for what the server understands, and a file is
validated before a single request goes out. ``None`` means unsteered.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.spec import (
    FeatureIntervention,
    Mode,
    Positions,
    SteeringSpec,
    SteeringSpecError,
)

BASELINE = "baseline"

SpecMap = dict[str, SteeringSpec | None]


class SpecFileError(UsageError):
    """A spec file (or spec options) that cannot be used; the message names file and entry."""


class NamedSpec(BaseModel):
    """One entry of a spec file: ``{"name": ..., "spec": {...} | null}``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=120, pattern=r"^[A-Za-z0-9_.+=:@-]+$")
    spec: dict[str, Any] | None = None


def _fmt_num(x: float) -> str:
    return f"{x:g}".replace("-", "m")


def grid_name(feature: int, strength: float, mode: str, sae: str | None = None) -> str:
    base = f"f{feature}_{mode}_s{_fmt_num(strength)}"
    return f"{sae}.{base}" if sae else base


def grid_specs(
    sae: str,
    features: Sequence[int],
    strengths: Sequence[float],
    modes: Sequence[Mode] = ("clamp",),
    *,
    positions: Positions = "all",
    baseline: bool = True,
) -> SpecMap:
    """Baseline plus one single-feature spec per (feature, strength, mode).

    Strength is relative: the server multiplies it by the feature's
    ``max_activation`` from the SAE's statistics (the paper's convention).
    """
    out: SpecMap = {BASELINE: None} if baseline else {}
    for f in features:
        for m in modes:
            for s in strengths:
                spec = SteeringSpec(
                    interventions=[FeatureIntervention(sae=sae, feature=f, strength=s, mode=m)],
                    positions=positions,
                )
                out[grid_name(f, s, m)] = spec
    return out


def _parse_entries(raw: Any, path: Path) -> list[NamedSpec]:
    if isinstance(raw, dict) and "name" not in raw:
        # {"name": spec, ...}
        raw = [{"name": k, "spec": v} for k, v in raw.items()]
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise SpecFileError(f"{path}: expected a list of {{name, spec}} or an object name -> spec")
    out = []
    for i, item in enumerate(raw):
        try:
            out.append(NamedSpec.model_validate(item))
        except ValidationError as e:
            msg = "; ".join(err["msg"] for err in e.errors()[:3])
            raise SpecFileError(f"{path}: entry {i + 1}: {msg}") from None
    return out


def load_specs_file(path: str | Path, *, baseline: bool = True) -> SpecMap:
    """Named specs from JSON (list, or object name -> spec) or JSONL (one {name, spec} a line).

    ``"spec": null`` (or an empty intervention list) is an unsteered entry; a
    ``baseline`` entry is added first unless the file has one.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise SpecFileError(f"{p}: cannot read ({e.strerror})") from None
    try:
        raw: Any = json.loads(text)
    except json.JSONDecodeError:
        raw = []
        for no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise SpecFileError(f"{p}:{no}: invalid JSON ({e.msg})") from None
    entries = _parse_entries(raw, p)
    out: SpecMap = {}
    if baseline and not any(e.name == BASELINE for e in entries):
        out[BASELINE] = None
    seen: set[str] = set()
    for ent in entries:
        if ent.name in seen:
            raise SpecFileError(f"{p}: duplicate spec name {ent.name!r}")
        seen.add(ent.name)
        try:
            spec = None if ent.spec is None else SteeringSpec.from_obj(ent.spec)
        except SteeringSpecError as err:
            raise SpecFileError(f"{p}: spec {ent.name!r}: {err}") from None
        out[ent.name] = None if spec is not None and spec.is_noop else spec
    return out


def describe_single_feature(spec: SteeringSpec | None) -> tuple[str, int, str, float] | None:
    """(sae, feature, mode, strength) when ``spec`` steers exactly one feature by strength.

    Used to lay out plots "accuracy vs strength per feature"; other specs are
    still in the table but not on those axes.
    """
    if spec is None or len(spec.interventions) != 1:
        return None
    iv = spec.interventions[0]
    if not isinstance(iv, FeatureIntervention) or iv.strength is None:
        return None
    return iv.sae, iv.feature, iv.mode, iv.strength
