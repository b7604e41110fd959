"""From a validated request spec to per-layer tensors: the step between the wire and the model.

Two halves, split by cost:

* :func:`check_spec` needs only SAE *metadata* (sizes, layer, architecture,
  max activations). The API server runs it on every request and answers a bad
  spec with HTTP 400 before the engine ever sees it.
* :func:`plan_spec` reads the encoder/decoder rows of the named features
  (a few KB each, sliced from the safetensors file) and produces what a worker
  writes into its slot tables.

The math (reasonscore.md, "Steering interventions"): with target ``c``,

* ``add``:   ``h' = h + c * W_dec[i]``
* ``clamp``: ``h' = h + (c - f_i(h)) * W_dec[i]`` (= decode with ``f_i := c`` plus
  the SAE error), where ``f_i(h) = pre_i * [pre_i > thr_i]`` and
  ``pre_i = h . W_enc[:, i] + b_enc[i] - b_dec . W_enc[:, i]``.

Several clamps on one layer are evaluated on the same ``h`` and summed, which
for a per-feature SAE (ReLU/JumpReLU) is exactly decoding with all targets set.
TopK SAEs cannot be clamped this way (a feature's value depends on all others),
so they accept ``add`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import torch

from .constants import STATS_FILE
from .plugin_config import PluginConfig, PluginConfigError
from .sae import SAEConfig, SAEFormatError, SAERows, load_max_activation, read_config
from .spec import (
    FeatureIntervention,
    Positions,
    SteeringSpec,
    SteeringSpecError,
    VectorIntervention,
)


class PositionMode(IntEnum):
    """Which tokens of a request are steered: the spec's ``positions``, as the int the
    slot tables store per slot (:func:`~sae_steer_vllm.slot_tables.position_gate`)."""

    ALL = 0
    PROMPT = 1
    GENERATED = 2

    @classmethod
    def of(cls, positions: Positions) -> PositionMode:
        return cls[positions.upper()]


@dataclass(frozen=True)
class SAEInfo:
    name: str
    path: Path
    cfg: SAEConfig
    max_activation: torch.Tensor | None


@dataclass
class SAECatalog:
    """The SAEs a server was started with, plus the model shape they must fit."""

    saes: dict[str, SAEInfo]
    num_layers: int
    d_model: int
    limits: PluginConfig
    vector_layers: set[int]
    _rows: dict[str, SAERows] = field(default_factory=dict)

    @classmethod
    def load(cls, config: PluginConfig, num_layers: int, d_model: int) -> SAECatalog:
        """Read every registered SAE's metadata; raise on anything that cannot serve."""
        saes: dict[str, SAEInfo] = {}
        for name, path in config.saes.items():
            try:
                cfg, _, _ = read_config(path)
                max_act = load_max_activation(path)
            except SAEFormatError as e:
                raise PluginConfigError(f"SAE {name!r}: {e}") from None
            if cfg.d_in != d_model:
                raise PluginConfigError(
                    f"SAE {name!r} ({path}) has d_in={cfg.d_in} but the model's hidden size is {d_model}"
                )
            if not 0 <= cfg.hook_layer < num_layers:
                raise PluginConfigError(
                    f"SAE {name!r} ({path}) hooks layer {cfg.hook_layer}; the model has {num_layers} layers"
                )
            if max_act is not None and max_act.shape != (cfg.d_sae,):
                raise PluginConfigError(
                    f"SAE {name!r}: feature_stats max_activation has shape {tuple(max_act.shape)}, "
                    f"expected ({cfg.d_sae},)"
                )
            saes[name] = SAEInfo(name, Path(path), cfg, max_act)
        return cls(
            saes=saes,
            num_layers=num_layers,
            d_model=d_model,
            limits=config,
            vector_layers=config.vector_layer_set(num_layers),
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> SAECatalog:
        """What a vLLM process serves: SAEs and limits from ``additional_config``, the model's
        shape from its HF config. Duck-typed, so this module never imports vLLM."""
        hf = vllm_config.model_config.hf_config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        config = PluginConfig.from_additional_config(vllm_config.additional_config)
        return cls.load(config, int(text.num_hidden_layers), int(text.hidden_size))

    @property
    def clamp_layers(self) -> set[int]:
        """Layers that need clamp tables: those of SAEs whose features can be clamped."""
        return {s.cfg.hook_layer for s in self.saes.values() if s.cfg.architecture != "topk"}

    @property
    def steerable_layers(self) -> set[int]:
        return self.vector_layers | {s.cfg.hook_layer for s in self.saes.values()}

    def rows(self, name: str) -> SAERows:
        if name not in self._rows:
            self._rows[name] = SAERows(self.saes[name].path)
        return self._rows[name]


def _target(iv: FeatureIntervention, info: SAEInfo) -> float:
    if iv.value is not None:
        return iv.value
    assert iv.strength is not None
    if info.max_activation is None:
        raise SteeringSpecError(
            f"steering: SAE {iv.sae!r} has no feature statistics ({STATS_FILE}), "
            f"so 'strength' cannot be turned into a value; give 'value' instead "
            f"(or run `sae-steer score` for this SAE)"
        )
    return iv.strength * float(info.max_activation[iv.feature])


def check_spec(spec: SteeringSpec, cat: SAECatalog) -> None:
    """Reject anything the model cannot do exactly; messages name the problem."""
    n = len(spec.interventions)
    if n > cat.limits.max_interventions:
        raise SteeringSpecError(
            f"steering: {n} interventions exceed this server's limit of "
            f"{cat.limits.max_interventions} (max_interventions)"
        )
    clamps_per_layer: dict[int, int] = {}
    seen_clamps: set[tuple[str, int]] = set()
    for k, iv in enumerate(spec.interventions):
        where = f"steering: interventions.{k}"
        if isinstance(iv, VectorIntervention):
            if iv.layer >= cat.num_layers:
                raise SteeringSpecError(
                    f"{where}.layer: layer {iv.layer} out of range; the model has "
                    f"{cat.num_layers} layers (0..{cat.num_layers - 1})"
                )
            if iv.layer not in cat.vector_layers:
                raise SteeringSpecError(
                    f"{where}.layer: layer {iv.layer} does not accept vectors on this server "
                    f"(vector_layers={cat.limits.vector_layers})"
                )
            if len(iv.vector) != cat.d_model:
                raise SteeringSpecError(
                    f"{where}.vector: has {len(iv.vector)} dimensions; the model's hidden size is {cat.d_model}"
                )
            continue
        info = cat.saes.get(iv.sae)
        if info is None:
            known = ", ".join(sorted(cat.saes)) or "none"
            raise SteeringSpecError(f"{where}.sae: unknown SAE {iv.sae!r} (registered: {known})")
        if iv.feature >= info.cfg.d_sae:
            raise SteeringSpecError(
                f"{where}.feature: feature {iv.feature} out of range for SAE {iv.sae!r} "
                f"with {info.cfg.d_sae} features"
            )
        target = _target(iv, info)
        if not abs(target) < float("inf"):
            raise SteeringSpecError(f"{where}: target value is not finite")
        layer = info.cfg.hook_layer
        if iv.mode == "clamp":
            if info.cfg.architecture == "topk":
                raise SteeringSpecError(
                    f"{where}.mode: SAE {iv.sae!r} is TopK, whose feature values depend on all "
                    "features; 'clamp' cannot be applied exactly, use mode 'add'"
                )
            key = (iv.sae, iv.feature)
            if key in seen_clamps:
                raise SteeringSpecError(
                    f"{where}: feature {iv.feature} of SAE {iv.sae!r} is clamped twice"
                )
            seen_clamps.add(key)
            clamps_per_layer[layer] = clamps_per_layer.get(layer, 0) + 1
            if clamps_per_layer[layer] > cat.limits.max_clamp_per_layer:
                raise SteeringSpecError(
                    f"{where}: more than {cat.limits.max_clamp_per_layer} clamped features on "
                    f"layer {layer} (max_clamp_per_layer)"
                )
        elif layer not in cat.vector_layers:
            raise SteeringSpecError(
                f"{where}.mode: 'add' on layer {layer} is disabled on this server "
                f"(vector_layers={cat.limits.vector_layers})"
            )


@dataclass
class ClampRow:
    enc: torch.Tensor  # [d] float32
    bias: float
    threshold: float
    dec: torch.Tensor  # [d] float32
    target: float


@dataclass
class LayerPlan:
    add: torch.Tensor | None = None  # [d] float32, summed add-mode and vector contributions
    clamps: list[ClampRow] = field(default_factory=list)


@dataclass
class SteeringPlan:
    layers: dict[int, LayerPlan]
    position_mode: PositionMode


def plan_spec(spec: SteeringSpec, cat: SAECatalog) -> SteeringPlan:
    """Checked spec -> per-layer add vector and clamp rows (float32)."""
    check_spec(spec, cat)
    layers: dict[int, LayerPlan] = {}

    def add_to(layer: int, v: torch.Tensor) -> None:
        lp = layers.setdefault(layer, LayerPlan())
        lp.add = v.clone() if lp.add is None else lp.add + v

    for iv in spec.interventions:
        if isinstance(iv, VectorIntervention):
            add_to(iv.layer, torch.tensor(iv.vector, dtype=torch.float32) * iv.scale)
            continue
        info = cat.saes[iv.sae]
        target = _target(iv, info)
        enc, bias, thr, dec = cat.rows(iv.sae).feature(iv.feature)
        layer = info.cfg.hook_layer
        if iv.mode == "add":
            add_to(layer, dec * target)
        else:
            layers.setdefault(layer, LayerPlan()).clamps.append(
                ClampRow(enc=enc, bias=bias, threshold=thr, dec=dec, target=target)
            )
    return SteeringPlan(layers=layers, position_mode=PositionMode.of(spec.positions))
