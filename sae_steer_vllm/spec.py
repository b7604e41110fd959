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
import re
from collections.abc import Mapping
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

MAX_SPEC_BYTES = 4 * 1024 * 1024
"""Default cap on a spec's JSON text (UTF-8 bytes), checked before parsing. 16 raw vectors
of an 8192-wide model, written with full float precision, take about 3 MB; the server's
limit is ``PluginConfig.max_spec_bytes``."""
MAX_SPEC_DEPTH = 16
"""Cap on the nesting of a spec's JSON, checked before parsing. A valid spec nests 4 deep
(spec -> interventions -> intervention -> vector); Python's JSON parser raises
``RecursionError`` on a few thousand ``[`` , so this check keeps hostile text away from it."""

Mode = Literal["clamp", "add", "scale"]
Positions = Literal["all", "prompt", "generated", "thinking", "answer"]
"""Which tokens are steered: ``all``, ``prompt``, ``generated``, or the reasoning phases
``thinking`` (from the opening think marker, in the prompt or generated, up to and including
the first generated closing marker) and ``answer`` (generated tokens after it). The phases
need a server whose model has single-token think markers (``GET /v1/saes``:
``model.think_markers``); docs/conditional_steering.md defines every case."""
ReadoutPositions = Literal["all", "prompt", "generated"]
"""Which tokens a readout reads."""
Unit = Literal["max", "quantile"]
"""What ``strength`` multiplies: the feature's max activation or its quantile unit."""
Site = Literal["resid_post", "mlp_out"]
"""Where a feature is read and edited: ``resid_post`` (the residual stream after the layer, as
the paper describes) or ``mlp_out`` (the layer's MLP output, what the authors' vLLM hook
actually edited; see :mod:`sae_steer_vllm.steered_model`)."""


class SteeringSpecError(UsageError):
    """A spec that must be rejected; the message names the offending field (a ValueError)."""


def _finite(v: float, name: str) -> float:
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v}")
    return v


Window = tuple[int | None, int | None]
"""``[start, stop)`` in generated-token indices (the first generated token is 0); either end
may be null."""


class Condition(BaseModel):
    """Steer only at tokens where a feature of an SAE on the same layer is above / below a level.

    The feature is the SAE's own encode of resid_post at that layer *before* any intervention
    at that layer (what the model computed, not what steering made of it). Both ``above`` and
    ``below``: a band, ``above < f < below``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae: str = Field(min_length=1, max_length=200)
    feature: int = Field(ge=0)
    above: float | None = None
    below: float | None = None

    @field_validator("above", "below")
    @classmethod
    def _check_finite(cls, v: float | None, info: Any) -> float | None:
        return None if v is None else _finite(v, info.field_name)

    @model_validator(mode="after")
    def _some_bound(self) -> Condition:
        if self.above is None and self.below is None:
            raise ValueError("give 'above' or 'below' (or both, for a band)")
        if self.above is not None and self.below is not None and not self.above < self.below:
            raise ValueError(f"empty band: above ({self.above}) must be < below ({self.below})")
        return self


class FeatureIntervention(BaseModel):
    """Steer one SAE feature: ``clamp`` sets it (keeping the SAE error), ``add`` adds its decoder
    row, ``scale`` multiplies it by ``factor`` where it is active.

    The target of ``clamp``/``add`` is ``value`` if given, else ``strength x unit`` of the
    feature, taken from the statistics file beside the SAE: ``unit`` ``"max"`` (default) is its
    max activation, ``"quantile"`` a high quantile of its non-zero activations
    (``quantile_unit``, robust to a few outlier tokens; level in the file's metadata).
    ``scale`` takes ``factor`` ``m`` instead: ``h' = h + (m - 1) f_i(h) W_dec[i]``, zero where
    the feature is off (``m = 0`` ablates it).

    Where it applies: ``positions`` (default: the request's), ``window`` and ``when`` narrow the
    tokens further; all three must admit a token. Each is left out of the JSON when unset, so
    older specs keep their text and cache salt.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae: str = Field(min_length=1, max_length=200)
    feature: int = Field(ge=0)
    strength: float | None = None
    value: float | None = None
    mode: Mode = "clamp"
    unit: Unit = Field(default="max", exclude_if=lambda v: v == "max")
    """``max`` (default) or ``quantile``: what ``strength`` multiplies. Left out of the JSON
    when default, so older specs keep their text and salt (and older servers accept them)."""
    site: Site = Field(default="resid_post", exclude_if=lambda v: v == "resid_post")
    """``resid_post`` (default) or ``mlp_out``: the clamp encodes the feature from, and edits,
    the layer's MLP output. An ``add`` is the same at both sites (the next layer reads only
    their sum). Left out of the JSON when default, so older specs keep their text and salt."""
    factor: float | None = None
    """``scale`` mode only: the factor ``m`` the feature is multiplied by where active."""
    positions: Positions | None = None
    """This intervention's tokens; overrides the request's ``positions``."""
    window: Window | None = None
    """``[start, stop)`` in generated-token indices: only generated tokens in it are steered."""
    when: Condition | None = None
    """Only at tokens where this condition holds."""

    @field_validator("strength", "value", "factor")
    @classmethod
    def _check_finite(cls, v: float | None, info: Any) -> float | None:
        return None if v is None else _finite(v, info.field_name)

    @field_validator("window")
    @classmethod
    def _check_window(cls, v: Window | None) -> Window | None:
        if v is None:
            return v
        start, stop = v
        if start is None and stop is None:
            raise ValueError("window [null, null] restricts nothing; leave 'window' out")
        if (start is not None and start < 0) or (stop is not None and stop < 0):
            raise ValueError(f"window {list(v)}: indices must be >= 0")
        if start is not None and stop is not None and not start < stop:
            raise ValueError(f"window {list(v)}: start must be < stop ([start, stop) is empty)")
        return v

    @model_validator(mode="after")
    def _one_target(self) -> FeatureIntervention:
        if self.mode == "scale":
            if self.factor is None:
                raise ValueError("mode 'scale' needs 'factor' (the multiplier m)")
            if self.strength is not None or self.value is not None or self.unit != "max":
                raise ValueError("mode 'scale' takes 'factor', not 'strength', 'value' or 'unit'")
            return self
        if self.factor is not None:
            raise ValueError(f"'factor' is for mode 'scale', not {self.mode!r}")
        if (self.strength is None) == (self.value is None):
            raise ValueError("give exactly one of 'strength' (x max_activation) or 'value'")
        if self.value is not None and self.unit != "max":
            raise ValueError("'unit' scales 'strength'; it cannot go with 'value'")
        return self

    @property
    def gated(self) -> bool:
        """Has its own positions, window or condition (gated per token, per intervention)."""
        return self.positions is not None or self.window is not None or self.when is not None


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


READOUT_TOP_K = 8
"""Default number of top features reported per token and SAE."""
READOUT_MAX_WATCH = 256
"""Most watched features one SAE readout may list (the server's limit may be lower)."""


class SAEReadout(BaseModel):
    """Read one registered SAE at every read token: its ``top_k`` features and the watch list.

    The values are the SAE's own encode of its input, resid_post at its layer *before* any
    intervention at that layer: a clamped feature reads what the SAE saw, not the target.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    sae: str = Field(min_length=1, max_length=200)
    top_k: int = Field(default=READOUT_TOP_K, ge=0)
    """Features reported per token, largest activation first (only active ones); at most
    the server's ``readout_max_top_k``."""
    features: list[int] = Field(default_factory=list, max_length=READOUT_MAX_WATCH)
    """Watch list: these features' values at every read token, active or not, plus their
    summary over the generated tokens."""

    @field_validator("features")
    @classmethod
    def _features(cls, v: list[int]) -> list[int]:
        if any(f < 0 for f in v):
            raise ValueError("features must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("features lists a feature twice")
        return v

    @model_validator(mode="after")
    def _reads_something(self) -> SAEReadout:
        if self.top_k == 0 and not self.features:
            raise ValueError("top_k is 0 and no features are watched: nothing to read")
        return self


class ReadoutSpec(BaseModel):
    """What a request reads out of the model (``SteeringSpec.readout``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    saes: list[SAEReadout] = Field(min_length=1, max_length=16)
    positions: ReadoutPositions = "all"
    """Read tokens: ``prompt``, ``generated`` or ``all``. Prompt positions are computed for
    this request alone (no prefix-cache reuse), since cached positions were never computed."""

    @field_validator("saes")
    @classmethod
    def _distinct(cls, v: list[SAEReadout]) -> list[SAEReadout]:
        names = [r.sae for r in v]
        if len(set(names)) != len(names):
            raise ValueError("an SAE is read twice; list each SAE once")
        return v

    @property
    def reads_prompt(self) -> bool:
        return self.positions in ("all", "prompt")


class SteeringSpec(BaseModel):
    """All interventions of one request, applied together at their layers, and what it reads."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    interventions: list[Intervention] = Field(default_factory=list)
    positions: Positions = "all"
    readout: ReadoutSpec | None = None
    """Per-token SAE feature readout (``sae_readout`` in the response); None: none."""

    # ------------------------------------------------------------ wire format
    def to_json(self) -> str:
        return self.model_dump_json(exclude_none=True)

    @classmethod
    def from_json(cls, text: str | bytes, max_bytes: int | None = MAX_SPEC_BYTES) -> SteeringSpec:
        """Parse untrusted text: size and nesting are checked before the JSON parser runs,
        and whatever the parser or the validators raise becomes a :class:`SteeringSpecError`
        (the HTTP 400), so no text can make this raise anything else. ``max_bytes=None``:
        no size cap (the caller bounded the text already)."""
        if isinstance(text, bytes | bytearray):
            try:
                text = bytes(text).decode("utf-8")
            except UnicodeDecodeError as e:
                raise SteeringSpecError(f"steering: not UTF-8 text ({e})") from None
        if not isinstance(text, str):
            raise SteeringSpecError(f"steering: expected a JSON string, got {type(text).__name__}")
        check_json_shape(text, max_bytes, MAX_SPEC_DEPTH)
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise SteeringSpecError(f"steering: invalid JSON ({e})") from None
        except (ValueError, RecursionError, MemoryError, TypeError) as e:
            # e.g. an integer with more digits than Python converts, or nesting the
            # shape check missed; never a 500 for text a client chose
            raise SteeringSpecError(f"steering: invalid JSON ({type(e).__name__}: {e})") from None
        return cls.from_obj(raw)

    @classmethod
    def from_obj(cls, raw: Any) -> SteeringSpec:
        if not isinstance(raw, dict):
            raise SteeringSpecError("steering: expected a JSON object with 'interventions'")
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise SteeringSpecError("steering: " + _describe(e)) from None
        except (ValueError, TypeError, RecursionError, MemoryError) as e:
            # an object built in Python (the offline API) can fail outside pydantic's
            # own errors, e.g. a self-referencing list
            raise SteeringSpecError(f"steering: invalid spec ({type(e).__name__}: {e})") from None

    @property
    def is_noop(self) -> bool:
        """Neither steers nor reads: the request runs as if it had no spec."""
        return not self.interventions and self.readout is None

    @property
    def steers(self) -> bool:
        return bool(self.interventions)

    def cache_salt(self) -> str:
        """Deterministic prefix-cache salt: identical steering shares KV, other steering never
        does. The readout is left out: reading changes no value the KV cache holds."""
        return "steer-" + json_digest(
            self.model_dump(exclude_none=True, exclude={"readout"}), length=40
        )

    def extra_body(self) -> dict[str, Any]:
        """``extra_body`` for the stock ``openai`` client (chat or completions)."""
        return {"vllm_xargs": {XARGS_KEY: self.to_json()}}


def spec_from_extra_args(
    extra_args: Mapping[str, Any] | None, max_bytes: int | None = None
) -> SteeringSpec | None:
    """Read the spec from ``SamplingParams.extra_args``; None when the request is unsteered.

    Accepts the JSON string (HTTP) and, for the offline ``LLM`` API, a dict or
    a ``SteeringSpec`` instance. Raises only :class:`SteeringSpecError`. ``max_bytes``:
    the server's ``max_spec_bytes`` (workers pass it); None leaves the size to whoever
    bounded the request (the API server's body limit), while nesting is always capped.
    """
    if not isinstance(extra_args, Mapping) or XARGS_KEY not in extra_args:
        return None
    raw = extra_args[XARGS_KEY]
    if isinstance(raw, SteeringSpec):
        spec = raw
    elif isinstance(raw, str):
        spec = SteeringSpec.from_json(raw, max_bytes)
    elif isinstance(raw, dict):
        spec = SteeringSpec.from_obj(raw)
    else:
        raise SteeringSpecError(f"steering: expected a JSON string, got {type(raw).__name__}")
    return None if spec.is_noop else spec


# A JSON string literal, written unrolled so the regex engine never backtracks.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_INNERMOST_PAIR = re.compile(r"\[\]|\{\}")


def check_json_shape(text: str, max_bytes: int | None, max_depth: int) -> None:
    """Refuse JSON text that is too large or nests deeper than ``max_depth``, without parsing.

    Every step is a C-speed pass over the text (the regex module), at most ``max_depth + 1``
    of them, so hostile text costs linear time: string literals are removed, then all but
    the brackets, then innermost ``[]``/``{}`` pairs are removed once per nesting level.
    In valid JSON that ends with nothing left; brackets that cannot be paired mean invalid
    JSON, refused here too, so the parser only ever sees balanced, shallow text.
    """
    if max_bytes is not None and (
        len(text) > max_bytes or len(text.encode("utf-8", "surrogatepass")) > max_bytes
    ):
        raise SteeringSpecError(
            f"steering: the spec is larger than this server's limit of {max_bytes} bytes "
            "(max_spec_bytes)"
        )
    skeleton = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    for _ in range(max_depth + 1):
        if not skeleton:
            return
        skeleton, n = _INNERMOST_PAIR.subn("", skeleton)
        if n == 0:
            raise SteeringSpecError("steering: invalid JSON (unbalanced brackets)")
    raise SteeringSpecError(f"steering: JSON nested deeper than {max_depth} levels")


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
