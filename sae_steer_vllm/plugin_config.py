"""Server-side settings of the plugin, read from vLLM's ``additional_config``.

Why ``additional_config``: vLLM hands it to every process (API server,
EngineCore, workers) and folds it into the compile-cache hash, so changing the
registered SAEs or limits can never load a stale compiled graph. ``sae-steer
serve`` fills it from its flags; a hand-launched server passes
``--additional-config '{"sae_steer": {...}}'``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import UsageError
from .sae_api import check_sae_name
from .spec import MAX_SPEC_BYTES

CONFIG_KEY = "sae_steer"

MAX_BODY_BYTES = 32 * 1024 * 1024
"""Default cap on a request body: room for a few base64 images or a long prompt as token ids."""


class PluginConfigError(UsageError):
    """The server's SAE registry or limits cannot serve (a ValueError)."""


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    saes: dict[str, str] = Field(
        default_factory=dict,
        description="SAE name -> folder (any layout in sae_steer_vllm.sae.LAYOUTS) or Hub "
        "address hf:owner/repo[/subfolder][@revision] (resolved to its local cache folder). "
        "Requests name SAEs, never paths.",
    )
    max_interventions: int = Field(
        default=16, ge=1, le=4096, description="Interventions one request may carry."
    )
    max_clamp_per_layer: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Clamped features one request may place on one layer (sizes the clamp tables).",
    )
    vector_layers: str = Field(
        default="all",
        description="Layers that accept raw-vector / add-mode steering: 'all' or '3,10,19'.",
    )
    think_start_marker: str = Field(
        default="<think>",
        max_length=200,
        description="The token that opens a reasoning span ('thinking' / 'answer' steering); "
        "'' : the reasoning starts with the first generated token. Must be one token.",
    )
    think_end_marker: str = Field(
        default="</think>",
        max_length=200,
        description="The token that closes the reasoning; '' : no phases (the positions "
        "'thinking' and 'answer' are refused). Must be one token of the model's tokenizer, "
        "else the phases are off (logged, and shown in GET /v1/saes).",
    )
    # ------------------------------------------------ admission limits (middleware.py)
    max_spec_bytes: int = Field(
        default=MAX_SPEC_BYTES,
        ge=1024,
        le=1 << 30,
        description="Largest steering spec (JSON bytes) a request may carry; larger is HTTP 400.",
    )
    max_body_bytes: int = Field(
        default=MAX_BODY_BYTES,
        ge=4096,
        le=1 << 34,
        description="Largest request body the API server reads, on every route; larger is "
        "HTTP 413 before the rest is read.",
    )
    # ------------------------------------------------ runtime SAE registration (/v1/saes)
    allow_runtime_sae_updates: bool = Field(
        default=False,
        description="Allow POST /v1/saes and DELETE /v1/saes/{name} (off by default, like "
        "vLLM's runtime LoRA updating). Guarded by --api-key when the server has one.",
    )
    sae_root: str | None = Field(
        default=None,
        description="Folder under which POST /v1/saes resolves a 'path'; paths outside it "
        "(absolute, or escaping it with '..' or symlinks) are refused.",
    )
    steerable_layers: str | None = Field(
        default=None,
        description="Layers that get clamp tables at start-up so an SAE registered at runtime "
        "can hook them: 'all' or '10,14,18' (default: only the layers of clampable start-up "
        "SAEs). Each such layer costs one small matmul per token.",
    )

    # ------------------------------------------------ per-token readout (readout_*.py)
    readout: bool = Field(
        default=False,
        description="Accept readout requests (SteeringSpec.readout): resid_post is captured at "
        "every SAE layer each step, and rank 0 keeps each SAE's full encoder in float32.",
    )
    readout_max_top_k: int = Field(
        default=64, ge=1, le=4096, description="Largest 'top_k' a readout may ask for."
    )
    readout_max_watch: int = Field(
        default=64, ge=0, le=256, description="Most watched features per SAE in one readout."
    )
    readout_max_pending_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=1 << 20,
        le=1 << 36,
        description="API-server memory for readout values of running requests; values "
        "beyond it are dropped and reported as missing_positions.",
    )
    readout_wait_s: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="How long a finished response waits for its last readout values "
        "before reporting the rest as missing_positions.",
    )

    @field_validator("saes")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            check_sae_name(name)
        if not v:
            return v
        from .sae.hub import resolve_sae_location  # the one resolver of SAE locations

        return {k: str(resolve_sae_location(p)) for k, p in v.items()}

    @field_validator("sae_root")
    @classmethod
    def _root(cls, v: str | None) -> str | None:
        return None if v is None else str(Path(v).expanduser().resolve())

    def vector_layer_set(self, num_layers: int) -> set[int]:
        return _layer_set(self.vector_layers, num_layers, "vector_layers")

    def steerable_layer_set(self, num_layers: int) -> set[int]:
        return _layer_set(self.steerable_layers or "", num_layers, "steerable_layers")

    @classmethod
    def from_additional_config(cls, additional: Any) -> PluginConfig:
        raw = additional.get(CONFIG_KEY, {}) if isinstance(additional, dict) else {}
        try:
            return cls.model_validate(raw or {})
        except ValidationError as e:
            raise PluginConfigError(f"additional_config[{CONFIG_KEY!r}]: {e}") from None


def _layer_set(text: str, num_layers: int, option: str) -> set[int]:
    """``'all'`` or comma-separated layer indices (``''``: none) -> the set, range-checked."""
    if text.strip() == "all":
        return set(range(num_layers))
    try:
        layers = {int(x) for x in text.split(",") if x.strip()}
    except ValueError:
        raise PluginConfigError(
            f"{option} must be 'all' or comma-separated ints, got {text!r}"
        ) from None
    bad = sorted(x for x in layers if not 0 <= x < num_layers)
    if bad:
        raise PluginConfigError(f"{option} {bad} out of range [0, {num_layers})")
    return layers
