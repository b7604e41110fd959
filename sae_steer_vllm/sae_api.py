"""The wire format of ``/v1/saes`` (what a server can steer with), and the admission rules on it.

One definition for both ends: the server answers ``GET /v1/saes`` with an
:class:`SAEList` built from its catalog, the eval harness reads the same model
back, and :func:`check_spec_against` is the rule set the server's admission
check (:func:`sae_steer_vllm.steering_plan.check_spec`) applies. So a sweep
checked against a listing before its first request is refused for exactly the
reasons the server would refuse it (the server additionally checks that a
``strength`` times the feature's max activation is a finite number).

This module imports neither torch nor vLLM: clients and benchmarks use it.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .constants import STATS_FILE
from .spec import (
    Condition,
    FeatureIntervention,
    Mode,
    Positions,
    ReadoutSpec,
    SteeringSpec,
    SteeringSpecError,
    Unit,
    VectorIntervention,
)

SAES_PATH = "/v1/saes"
"""Where a server lists (GET), registers (POST) and removes (DELETE ``/v1/saes/{name}``) SAEs."""

ALL_POSITIONS: list[Positions] = list(get_args(Positions))
PHASES: tuple[Positions, ...] = ("thinking", "answer")
"""Positions that need the model's think markers."""
_DISJOINT: set[frozenset[Positions]] = {
    frozenset(p) for p in (("prompt", "generated"), ("prompt", "answer"), ("thinking", "answer"))
}
"""Scopes no token can be in both of (``thinking`` may include prompt tokens)."""

SAE_NAME_MAX = 200


def check_sae_name(name: str) -> str:
    """The one naming rule for SAEs (start-up registry and runtime registration)."""
    if not name or len(name) > SAE_NAME_MAX or any(c.isspace() for c in name):
        raise ValueError(f"bad SAE name {name!r}: 1-{SAE_NAME_MAX} characters, no whitespace")
    return name


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SAEEntry(_Wire):
    """One registered SAE, as a client needs to know it (never its path on the server)."""

    name: str
    layer: int = Field(ge=0, description="decoder layer whose output (resid_post) it reads")
    d_in: int = Field(ge=1)
    d_sae: int = Field(ge=1, description="features 0 .. d_sae - 1")
    architecture: str
    modes: list[Mode] = Field(
        description="modes its features accept: 'clamp' needs a per-feature encoder "
        "(not TopK); 'add' needs the layer among the server's vector layers"
    )
    positions: list[Positions] = Field(default_factory=lambda: list(ALL_POSITIONS))
    has_statistics: bool = Field(
        description=f"{STATS_FILE} exists beside it, so 'strength' can be used (else 'value')"
    )
    strength_units: list[Unit] = Field(
        default_factory=list,
        description="the units a 'strength' may be given in ('unit'); empty without statistics",
    )
    runtime: bool = Field(default=False, description="registered through POST /v1/saes")


class ThinkMarkers(_Wire):
    """The single tokens that open and close a reasoning span on this server's model
    (``thinking`` / ``answer`` steering; :mod:`sae_steer_vllm.think_phase` has the rules)."""

    start: str | None = Field(
        description="opening marker; null: the reasoning starts with the first generated token"
    )
    start_id: int | None = Field(ge=0)
    end: str
    end_id: int = Field(ge=0)


class ModelShape(_Wire):
    num_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)
    think_markers: ThinkMarkers | None = Field(
        default=None,
        description="null: the model has no single-token think markers, so the positions "
        "'thinking' and 'answer' are refused",
    )


class ServerLimits(_Wire):
    max_interventions: int = Field(ge=1)
    max_clamp_per_layer: int = Field(ge=1)
    vector_layers: list[int] = Field(description="layers that take raw vectors and 'add' mode")
    vector_layers_setting: str = Field(description="the server's vector_layers option, as given")
    max_spec_bytes: int | None = Field(default=None, description="largest spec JSON accepted")
    max_body_bytes: int | None = Field(default=None, description="largest request body read")
    readout: ReadoutLimits = Field(default_factory=lambda: ReadoutLimits(enabled=False))


class ReadoutLimits(_Wire):
    """What a readout request may ask of this server (``SteeringSpec.readout``)."""

    enabled: bool = Field(description="the server was started with readout support")
    max_top_k: int = Field(default=0, ge=0)
    max_watch: int = Field(default=0, ge=0)
    layers: list[int] = Field(
        default_factory=list, description="layers whose resid_post is captured for readout"
    )


class RuntimeUpdates(_Wire):
    enabled: bool = Field(description="POST/DELETE /v1/saes are allowed")
    layers: list[int] = Field(
        description="layers a runtime SAE may hook (those with clamp tables: --steerable-layers "
        "plus the layers of clampable start-up SAEs)"
    )
    sources: list[Literal["path", "hf"]] = Field(default_factory=list)


class SAEList(_Wire):
    """``GET /v1/saes``."""

    object: Literal["list"] = "list"
    data: list[SAEEntry]
    model: ModelShape
    limits: ServerLimits
    runtime_updates: RuntimeUpdates

    def by_name(self) -> dict[str, SAEEntry]:
        return {e.name: e for e in self.data}


class RegisterSAE(_Wire):
    """``POST /v1/saes``: a name and where the SAE folder is, relative to the server's
    ``--sae-root`` (``path``) or on the Hugging Face Hub (``hf``: ``repo_id[/subfolder][@revision]``,
    resolved by :mod:`sae_steer_vllm.sae.hub`)."""

    name: str
    path: str | None = Field(default=None, min_length=1, max_length=4096)
    hf: str | None = Field(default=None, min_length=3, max_length=400)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_sae_name(v)

    @model_validator(mode="after")
    def _one_source(self) -> RegisterSAE:
        if (self.path is None) == (self.hf is None):
            raise ValueError("give exactly one of 'path' (under the server's --sae-root) or 'hf'")
        return self


def check_spec_against(spec: SteeringSpec, listing: SAEList) -> None:
    """Refuse what the listed server cannot do exactly; messages name the field and problem.

    :func:`sae_steer_vllm.steering_plan.check_spec` is this plus the finiteness of each
    feature target (which needs the server's statistics values, not just their presence).
    """
    limits, model = listing.limits, listing.model
    saes = listing.by_name()
    if spec.readout is not None:
        check_readout_against(spec.readout, saes, limits.readout)
    n = len(spec.interventions)
    if n > limits.max_interventions:
        raise SteeringSpecError(
            f"steering: {n} interventions exceed this server's limit of "
            f"{limits.max_interventions} (max_interventions)"
        )
    vector_layers = set(limits.vector_layers)
    clamps_per_layer: dict[int, int] = {}
    seen_clamps: dict[tuple[str, int], tuple[int, FeatureIntervention]] = {}
    clamp_sites: dict[int, tuple[int, str]] = {}
    if spec.positions in PHASES and spec.interventions:
        _check_phases(spec.positions, model, "steering.positions")
    for k, iv in enumerate(spec.interventions):
        where = f"steering: interventions.{k}"
        if isinstance(iv, VectorIntervention):
            if iv.layer >= model.num_layers:
                raise SteeringSpecError(
                    f"{where}.layer: layer {iv.layer} out of range; the model has "
                    f"{model.num_layers} layers (0..{model.num_layers - 1})"
                )
            if iv.layer not in vector_layers:
                raise SteeringSpecError(
                    f"{where}.layer: layer {iv.layer} does not accept vectors on this server "
                    f"(vector_layers={limits.vector_layers_setting})"
                )
            if len(iv.vector) != model.d_model:
                raise SteeringSpecError(
                    f"{where}.vector: has {len(iv.vector)} dimensions; the model's hidden size "
                    f"is {model.d_model}"
                )
            continue
        _check_feature(iv, saes, where, limits)
        _check_gates(spec, k, iv, saes, model)
        if iv.mode == "add" and not iv.gated:
            continue  # summed into the layer's add vector: no per-intervention entry
        layer = saes[iv.sae].layer
        clamps_per_layer[layer] = clamps_per_layer.get(layer, 0) + 1
        if clamps_per_layer[layer] > limits.max_clamp_per_layer:
            raise SteeringSpecError(
                f"{where}: more than {limits.max_clamp_per_layer} clamp, scale or gated (own "
                f"positions, window or when) interventions on layer {layer} "
                "(max_clamp_per_layer)"
            )
        if iv.mode == "add":
            continue
        _check_not_twice(spec, k, iv, seen_clamps)
        first, site = clamp_sites.setdefault(layer, (k, iv.site))
        if site != iv.site:
            raise SteeringSpecError(
                f"steering: interventions.{k}: its {iv.mode} on layer {layer} reads site "
                f"{iv.site!r} but interventions.{first} reads that layer at {site!r}; "
                "one request's clamps and scales on one layer must share a site (send two "
                "requests)"
            )


def _check_phases(positions: str, model: ModelShape, where: str) -> None:
    if model.think_markers is None:
        raise SteeringSpecError(
            f"{where}: {positions!r} needs the model's think markers, and this server's model "
            "has none (its tokenizer has no single-token <think>/</think>; a server can name "
            "other markers with --think-start-marker / --think-end-marker)"
        )


def _scope(spec: SteeringSpec, iv: FeatureIntervention) -> str:
    return iv.positions or spec.positions


def _check_not_twice(
    spec: SteeringSpec,
    k: int,
    iv: FeatureIntervention,
    seen: dict[tuple[str, int], tuple[int, FeatureIntervention]],
) -> None:
    """Two clamps/scales of one feature would both subtract its value: refused unless no token
    can be in both (disjoint scopes, or disjoint windows)."""
    key = (iv.sae, iv.feature)
    prev = seen.get(key)
    seen[key] = (k, iv)
    if prev is None:
        return
    j, other = prev
    scopes = frozenset((_scope(spec, iv), _scope(spec, other)))
    if scopes in _DISJOINT or _windows_disjoint(iv.window, other.window):
        return
    raise SteeringSpecError(
        f"steering: interventions.{k}: feature {iv.feature} of SAE {iv.sae!r} is already "
        f"steered ({other.mode}) by interventions.{j} at tokens this one may also steer "
        "(both would subtract its value); give them "
        "disjoint positions (prompt/generated, thinking/answer) or disjoint windows"
    )


def _windows_disjoint(
    a: tuple[int | None, int | None] | None, b: tuple[int | None, int | None] | None
) -> bool:
    if a is None or b is None:
        return False
    big = 1 << 62
    a0, a1 = a[0] or 0, big if a[1] is None else a[1]
    b0, b1 = b[0] or 0, big if b[1] is None else b[1]
    return a1 <= b0 or b1 <= a0


def _check_gates(
    spec: SteeringSpec,
    k: int,
    iv: FeatureIntervention,
    saes: dict[str, SAEEntry],
    model: ModelShape,
) -> None:
    where = f"steering: interventions.{k}"
    if iv.positions in PHASES:
        _check_phases(iv.positions, model, f"{where}.positions")
    if iv.when is not None:
        _check_condition(iv.when, saes[iv.sae], saes, f"{where}.when")


def _check_condition(
    cond: Condition, target: SAEEntry, saes: dict[str, SAEEntry], where: str
) -> None:
    info = saes.get(cond.sae)
    if info is None:
        known = ", ".join(sorted(saes)) or "none"
        raise SteeringSpecError(f"{where}.sae: unknown SAE {cond.sae!r} (registered: {known})")
    if info.layer != target.layer:
        raise SteeringSpecError(
            f"{where}.sae: SAE {cond.sae!r} reads layer {info.layer}, but the intervention "
            f"steers layer {target.layer}; a condition must read the same layer (its value "
            "is taken before that layer's interventions, which a later layer cannot see)"
        )
    if info.architecture == "topk" or "clamp" not in info.modes:
        raise SteeringSpecError(
            f"{where}.sae: SAE {cond.sae!r} is TopK, whose feature values depend on all "
            "features; a condition needs a per-feature encoder (ReLU / JumpReLU)"
            if info.architecture == "topk"
            else f"{where}.sae: SAE {cond.sae!r} cannot be read per feature on this server"
        )
    if cond.feature >= info.d_sae:
        raise SteeringSpecError(
            f"{where}.feature: feature {cond.feature} out of range for SAE {cond.sae!r} "
            f"with {info.d_sae} features"
        )


def _check_feature(
    iv: FeatureIntervention,
    saes: dict[str, SAEEntry],
    where: str,
    limits: ServerLimits,
) -> None:
    info = saes.get(iv.sae)
    if info is None:
        known = ", ".join(sorted(saes)) or "none"
        raise SteeringSpecError(f"{where}.sae: unknown SAE {iv.sae!r} (registered: {known})")
    if iv.feature >= info.d_sae:
        raise SteeringSpecError(
            f"{where}.feature: feature {iv.feature} out of range for SAE {iv.sae!r} "
            f"with {info.d_sae} features"
        )
    if iv.strength is not None and not info.has_statistics:
        raise SteeringSpecError(
            f"steering: SAE {iv.sae!r} has no feature statistics ({STATS_FILE}), "
            f"so 'strength' cannot be turned into a value; give 'value' instead "
            f"(or run `sae-steer score` for this SAE)"
        )
    if iv.strength is not None and iv.unit not in info.strength_units:
        raise SteeringSpecError(
            f"steering: SAE {iv.sae!r} has no {iv.unit!r} unit in its feature statistics "
            f"({STATS_FILE} predates it); use unit 'max' or 'value', or re-run "
            f"`sae-steer score` for this SAE"
        )
    if iv.mode in ("clamp", "scale"):
        if iv.mode not in info.modes:
            raise SteeringSpecError(
                f"{where}.mode: SAE {iv.sae!r} is TopK, whose feature values depend on all "
                f"features; {iv.mode!r} cannot be applied exactly, use mode 'add'"
                if info.architecture == "topk"
                else f"{where}.mode: SAE {iv.sae!r} does not accept {iv.mode!r} on this server"
            )
    elif "add" not in info.modes:
        raise SteeringSpecError(
            f"{where}.mode: 'add' on layer {info.layer} is disabled on this server "
            f"(vector_layers={limits.vector_layers_setting})"
        )


def check_readout_against(
    readout: ReadoutSpec, saes: dict[str, SAEEntry], limits: ReadoutLimits
) -> None:
    """The readout half of :func:`check_spec_against`."""
    if not limits.enabled:
        raise SteeringSpecError(
            "steering: readout: this server was started without readout support "
            "(sae-steer serve --readout)"
        )
    for k, r in enumerate(readout.saes):
        where = f"steering: readout.saes.{k}"
        info = saes.get(r.sae)
        if info is None:
            known = ", ".join(sorted(saes)) or "none"
            raise SteeringSpecError(f"{where}.sae: unknown SAE {r.sae!r} (registered: {known})")
        if info.layer not in limits.layers:
            raise SteeringSpecError(
                f"{where}.sae: SAE {r.sae!r} reads layer {info.layer}, which this server does "
                f"not capture for readout (layers {limits.layers})"
            )
        if r.top_k > limits.max_top_k:
            raise SteeringSpecError(
                f"{where}.top_k: {r.top_k} exceeds this server's limit of {limits.max_top_k} "
                "(readout_max_top_k)"
            )
        if r.top_k > info.d_sae:
            raise SteeringSpecError(
                f"{where}.top_k: {r.top_k} exceeds SAE {r.sae!r}'s {info.d_sae} features"
            )
        if len(r.features) > limits.max_watch:
            raise SteeringSpecError(
                f"{where}.features: {len(r.features)} watched features exceed this server's "
                f"limit of {limits.max_watch} (readout_max_watch)"
            )
        bad = [f for f in r.features if f >= info.d_sae]
        if bad:
            raise SteeringSpecError(
                f"{where}.features: feature {bad[0]} out of range for SAE {r.sae!r} "
                f"with {info.d_sae} features"
            )
