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


class ModelShape(_Wire):
    num_layers: int = Field(ge=1)
    d_model: int = Field(ge=1)


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
    seen_clamps: set[tuple[str, int]] = set()
    clamp_sites: dict[int, tuple[int, str]] = {}
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
        _check_feature(iv, saes, where, limits, clamps_per_layer, seen_clamps)
        if iv.mode == "clamp":
            layer = saes[iv.sae].layer
            first, site = clamp_sites.setdefault(layer, (k, iv.site))
            if site != iv.site:
                raise SteeringSpecError(
                    f"steering: interventions.{k}: its clamp on layer {layer} reads site "
                    f"{iv.site!r} but interventions.{first} clamps that layer at {site!r}; "
                    "one request's clamps on one layer must share a site (send two requests)"
                )


def _check_feature(
    iv: FeatureIntervention,
    saes: dict[str, SAEEntry],
    where: str,
    limits: ServerLimits,
    clamps_per_layer: dict[int, int],
    seen_clamps: set[tuple[str, int]],
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
    if iv.mode == "clamp":
        if "clamp" not in info.modes:
            raise SteeringSpecError(
                f"{where}.mode: SAE {iv.sae!r} is TopK, whose feature values depend on all "
                "features; 'clamp' cannot be applied exactly, use mode 'add'"
                if info.architecture == "topk"
                else f"{where}.mode: SAE {iv.sae!r} does not accept 'clamp' on this server"
            )
        key = (iv.sae, iv.feature)
        if key in seen_clamps:
            raise SteeringSpecError(
                f"{where}: feature {iv.feature} of SAE {iv.sae!r} is clamped twice"
            )
        seen_clamps.add(key)
        clamps_per_layer[info.layer] = clamps_per_layer.get(info.layer, 0) + 1
        if clamps_per_layer[info.layer] > limits.max_clamp_per_layer:
            raise SteeringSpecError(
                f"{where}: more than {limits.max_clamp_per_layer} clamped features on "
                f"layer {info.layer} (max_clamp_per_layer)"
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
