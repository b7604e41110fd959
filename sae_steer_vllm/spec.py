"""The steering spec: the single definition of what a request may ask for.

The server validates against it, the Python client builds it, and the
benchmarks sweep over it, so there is exactly one wire format. It travels as a
JSON string in ``vllm_xargs["steering"]`` because vLLM's OpenAI protocol only
admits scalars and lists of scalars there; a string keeps the stock ``openai``
client working through ``extra_body``.

This module imports neither torch nor vLLM: clients and benchmarks use it.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import UsageError
from .files import json_digest

XARGS_KEY = "steering"
"""Key under ``vllm_xargs`` / ``SamplingParams.extra_args``."""

Mode = Literal["clamp", "add"]
Positions = Literal["all", "prompt", "generated"]


class SteeringSpecError(UsageError):
    """A spec that must be rejected; the message names the offending field (a ValueError)."""


def _finite(v: float, name: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


class FeatureIntervention(BaseModel):
    """Steer one SAE feature: ``clamp`` sets it (keeping the SAE error), ``add`` adds its decoder row.

    The target is ``value`` if given, else ``strength x max_activation`` of the
    feature, taken from the statistics file beside the SAE.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae: str = Field(min_length=1, max_length=200)
    feature: int = Field(ge=0)
    strength: float | None = None
    value: float | None = None
    mode: Mode = "clamp"

    @field_validator("strength", "value")
    @classmethod
    def _check_finite(cls, v: float | None, info: Any) -> float | None:
        return None if v is None else _finite(v, info.field_name)

    @model_validator(mode="after")
    def _one_target(self) -> FeatureIntervention:
        if (self.strength is None) == (self.value is None):
            raise ValueError("give exactly one of 'strength' (x max_activation) or 'value'")
        return self


class VectorIntervention(BaseModel):
    """Add ``scale x vector`` to the residual stream after ``layer``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: int = Field(ge=0)
    vector: list[float] = Field(min_length=1)
    scale: float = 1.0

    @field_validator("scale")
    @classmethod
    def _check_scale(cls, v: float) -> float:
        return _finite(v, "scale")

    @field_validator("vector")
    @classmethod
    def _check_vector(cls, v: list[float]) -> list[float]:
        if not all(math.isfinite(x) for x in v):
            raise ValueError("vector must contain only finite numbers")
        return v


Intervention = Annotated[
    FeatureIntervention | VectorIntervention,
    Field(union_mode="left_to_right"),
]


class SteeringSpec(BaseModel):
    """All interventions of one request; applied together at their layers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interventions: list[Intervention] = Field(default_factory=list)
    positions: Positions = "all"

    # ------------------------------------------------------------ wire format
    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str) -> SteeringSpec:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SteeringSpecError(f"steering: invalid JSON ({e})") from None
        return cls.from_obj(raw)

    @classmethod
    def from_obj(cls, raw: Any) -> SteeringSpec:
        if not isinstance(raw, dict):
            raise SteeringSpecError("steering: expected a JSON object with 'interventions'")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise SteeringSpecError("steering: " + _describe(e)) from None

    @property
    def is_noop(self) -> bool:
        return not self.interventions

    def cache_salt(self) -> str:
        """Deterministic prefix-cache salt: identical specs share KV, others never do."""
        return "steer-" + json_digest(self.model_dump(exclude_none=True), length=40)

    def extra_body(self) -> dict[str, Any]:
        """``extra_body`` for the stock ``openai`` client (chat or completions)."""
        return {"vllm_xargs": {XARGS_KEY: self.to_json()}}


def spec_from_extra_args(extra_args: dict[str, Any] | None) -> SteeringSpec | None:
    """Read the spec from ``SamplingParams.extra_args``; None when the request is unsteered.

    Accepts the JSON string (HTTP) and, for the offline ``LLM`` API, a dict or
    a ``SteeringSpec`` instance.
    """
    if not extra_args or XARGS_KEY not in extra_args:
        return None
    raw = extra_args[XARGS_KEY]
    if isinstance(raw, SteeringSpec):
        spec = raw
    elif isinstance(raw, str):
        spec = SteeringSpec.from_json(raw)
    elif isinstance(raw, dict):
        spec = SteeringSpec.from_obj(raw)
    else:
        raise SteeringSpecError(f"steering: expected a JSON string, got {type(raw).__name__}")
    return None if spec.is_noop else spec


def steering_extra_body(spec: SteeringSpec | dict[str, Any] | None) -> dict[str, Any]:
    """Helper for ``client.chat.completions.create(..., extra_body=...)``."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        spec = SteeringSpec.from_obj(spec)
    return spec.extra_body()


def _describe(e: ValidationError) -> str:
    parts = []
    for err in e.errors()[:5]:
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith("function-"))
        # union errors repeat per member: keep the message, drop the member name
        loc = loc.replace("FeatureIntervention.", "").replace("VectorIntervention.", "")
        parts.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)
