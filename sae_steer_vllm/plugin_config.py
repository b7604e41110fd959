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

CONFIG_KEY = "sae_steer"


class PluginConfigError(UsageError):
    """The server's SAE registry or limits cannot serve (a ValueError)."""


class PluginConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    saes: dict[str, str] = Field(
        default_factory=dict,
        description="SAE name -> folder (SAELens or sparsify layout). Requests name SAEs, never paths.",
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

    @field_validator("saes")
    @classmethod
    def _names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not name or len(name) > 200 or any(c.isspace() for c in name):
                raise ValueError(f"bad SAE name {name!r}")
        return {k: str(Path(p).expanduser().resolve()) for k, p in v.items()}

    def vector_layer_set(self, num_layers: int) -> set[int]:
        if self.vector_layers.strip() == "all":
            return set(range(num_layers))
        try:
            layers = {int(x) for x in self.vector_layers.split(",") if x.strip()}
        except ValueError:
            raise PluginConfigError(
                f"vector_layers must be 'all' or comma-separated ints, got {self.vector_layers!r}"
            ) from None
        bad = sorted(x for x in layers if not 0 <= x < num_layers)
        if bad:
            raise PluginConfigError(f"vector_layers {bad} out of range [0, {num_layers})")
        return layers

    @classmethod
    def from_additional_config(cls, additional: Any) -> PluginConfig:
        raw = additional.get(CONFIG_KEY, {}) if isinstance(additional, dict) else {}
        try:
            return cls.model_validate(raw or {})
        except ValidationError as e:
            raise PluginConfigError(f"additional_config[{CONFIG_KEY!r}]: {e}") from None
