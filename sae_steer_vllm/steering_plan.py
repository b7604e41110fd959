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
* ``scale`` by ``m``: ``h' = h + (m - 1) f_i(h) * W_dec[i]``.

All three are one *entry* ``h' = h + (target + slope * f_i(h)) * W_dec[i]`` (slope -1, 0 and
``m - 1``), gated per token by the entry's positions, window and condition
(:class:`EntryRow`). Plain adds without a gate of their own are summed into one vector per
layer instead, which costs nothing per entry.

Several clamps on one layer are evaluated on the same ``h`` and summed, which
for a per-feature SAE (ReLU/JumpReLU) is exactly decoding with all targets set.
TopK SAEs cannot be clamped this way (a feature's value depends on all others),
so they accept ``add`` only.

``site`` (spec.py): with ``mlp_out`` a clamp reads ``f_i`` from the layer's MLP output ``m``
instead of ``h`` (``h' = h + (c - f_i(m)) * W_dec[i]``), as the authors' vLLM hook did. One
request's clamps on one layer share a site (:func:`check_spec`), so the model reads one
input per slot and layer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal, get_args

import torch

from .constants import STATS_FILE
from .plugin_config import PluginConfig, PluginConfigError
from .sae import SAEConfig, SAEFormatError, SAERows, load_units, read_config
from .sae_api import (
    PHASES,
    ModelShape,
    ReadoutLimits,
    RuntimeUpdates,
    SAEEntry,
    SAEList,
    ServerLimits,
    ThinkMarkers,
    check_spec_against,
)
from .spec import (
    FeatureIntervention,
    Mode,
    Positions,
    ReadoutSpec,
    Site,
    SteeringSpec,
    SteeringSpecError,
    Unit,
    VectorIntervention,
)

logger = logging.getLogger("sae_steer_vllm")


class PositionMode(IntEnum):
    """Which tokens of a request are steered: the spec's ``positions``, as the int the
    slot tables store per slot and entry (:func:`~sae_steer_vllm.slot_tables.position_gate`)."""

    ALL = 0
    PROMPT = 1
    GENERATED = 2
    THINKING = 3
    ANSWER = 4

    @classmethod
    def of(cls, positions: Positions) -> PositionMode:
        return cls[positions.upper()]


@dataclass(frozen=True)
class SAEInfo:
    name: str
    path: Path
    cfg: SAEConfig
    max_activation: torch.Tensor | None
    runtime: bool = False
    units: dict[str, torch.Tensor] = field(default_factory=dict)
    """every ``strength`` unit the statistics file holds (``stats_file.load_units``)"""


def read_sae_info(
    name: str, path: str | Path, num_layers: int, d_model: int, *, runtime: bool = False
) -> SAEInfo:
    """Read and check one SAE folder's metadata: THE check, at start-up (``serve`` and every
    vLLM process) and for runtime registration alike. Raises :class:`PluginConfigError`."""
    try:
        cfg, _, _ = read_config(path)
        units = load_units(path)
        max_act = units.get("max")
    except SAEFormatError as e:
        raise PluginConfigError(f"SAE {name!r}: {e}") from None
    refusal = cfg.serving_refusal()  # e.g. per-token normalisation (SAEConfig says why)
    if refusal is not None:
        raise PluginConfigError(f"SAE {name!r} ({path}): {refusal}")
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
    return SAEInfo(name, Path(path), cfg, max_act, runtime, units)


@dataclass
class SAECatalog:
    """The SAEs a server serves, plus the model shape they must fit.

    Which layers have steering tables is fixed at start-up (the tables are buffers
    inside the compiled model): ``steerable_layers`` have add tables, ``clamp_layers``
    also clamp tables. SAEs registered at runtime (:meth:`add`) must hook a clamp layer.
    """

    saes: dict[str, SAEInfo]
    num_layers: int
    d_model: int
    limits: PluginConfig
    vector_layers: set[int]
    clamp_layers: set[int] = field(default_factory=set)
    steerable_layers: set[int] = field(default_factory=set)
    readout_layers: set[int] = field(default_factory=set)
    """Layers whose resid_post is captured for readout (fixed at start-up, like the tables):
    with ``readout`` on, every start-up SAE's layer and every clamp layer (runtime SAEs)."""
    entry_layers: set[int] = field(default_factory=set)
    """Layers with per-intervention entry tables (clamp, scale, gated add): every clamp layer
    and every start-up SAE's layer (a TopK SAE's gated adds need them too)."""
    think_markers: ThinkMarkers | None = None
    """The model's think markers (:mod:`~sae_steer_vllm.think_phase`); None: no phases."""
    _rows: dict[str, SAERows] = field(default_factory=dict)
    _listing: SAEList | None = None

    @classmethod
    def load(cls, config: PluginConfig, num_layers: int, d_model: int) -> SAECatalog:
        """Read every registered SAE's metadata; raise on anything that cannot serve."""
        saes = {
            name: read_sae_info(name, path, num_layers, d_model)
            for name, path in config.saes.items()
        }
        vector_layers = config.vector_layer_set(num_layers)
        runtime_layers = config.steerable_layer_set(num_layers)
        clamp = {s.cfg.hook_layer for s in saes.values() if s.cfg.architecture != "topk"}
        sae_layers = {s.cfg.hook_layer for s in saes.values()}
        return cls(
            saes=saes,
            num_layers=num_layers,
            d_model=d_model,
            limits=config,
            vector_layers=vector_layers,
            clamp_layers=clamp | runtime_layers,
            steerable_layers=vector_layers | runtime_layers | sae_layers,
            readout_layers=(clamp | runtime_layers | sae_layers) if config.readout else set(),
            entry_layers=clamp | runtime_layers | sae_layers,
        )

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> SAECatalog:
        """What a vLLM process serves: SAEs and limits from ``additional_config``, the model's
        shape from its HF config. Duck-typed, so this module never imports vLLM."""
        hf = vllm_config.model_config.hf_config
        text = hf.get_text_config() if hasattr(hf, "get_text_config") else hf
        config = PluginConfig.from_additional_config(vllm_config.additional_config)
        cat = cls.load(config, int(text.num_hidden_layers), int(text.hidden_size))
        cat.think_markers = _think_markers(vllm_config.model_config, config)
        return cat

    def rows(self, name: str) -> SAERows:
        if name not in self._rows:
            self._rows[name] = SAERows(self.saes[name].path)
        return self._rows[name]

    # ------------------------------------------------------------ what it can do
    def modes(self, info: SAEInfo) -> list[Mode]:
        """Modes an SAE's features accept here: clamp needs a per-feature encoder (not TopK)
        and clamp tables on its layer; add needs its layer among the vector layers."""
        clamps = info.cfg.architecture != "topk" and info.cfg.hook_layer in self.clamp_layers
        out: list[Mode] = ["clamp"] if clamps else []
        if info.cfg.hook_layer in self.vector_layers:
            out.append("add")
        if clamps:
            out.append("scale")
        return out

    def listing(self) -> SAEList:
        """``GET /v1/saes`` (cached until the registry changes)."""
        if self._listing is None:
            lim = self.limits
            positions = [p for p in get_args(Positions) if self.think_markers or p not in PHASES]
            self._listing = SAEList(
                data=[
                    SAEEntry(
                        name=s.name,
                        layer=s.cfg.hook_layer,
                        d_in=s.cfg.d_in,
                        d_sae=s.cfg.d_sae,
                        architecture=s.cfg.architecture,
                        modes=self.modes(s),
                        positions=positions,
                        has_statistics=s.max_activation is not None,
                        strength_units=[u for u in get_args(Unit) if u in s.units],
                        runtime=s.runtime,
                    )
                    for s in sorted(self.saes.values(), key=lambda s: s.name)
                ],
                model=ModelShape(
                    num_layers=self.num_layers,
                    d_model=self.d_model,
                    think_markers=self.think_markers,
                ),
                limits=ServerLimits(
                    max_interventions=lim.max_interventions,
                    max_clamp_per_layer=lim.max_clamp_per_layer,
                    vector_layers=sorted(self.vector_layers),
                    vector_layers_setting=lim.vector_layers,
                    max_spec_bytes=lim.max_spec_bytes,
                    max_body_bytes=lim.max_body_bytes,
                    readout=ReadoutLimits(
                        enabled=lim.readout,
                        max_top_k=lim.readout_max_top_k if lim.readout else 0,
                        max_watch=lim.readout_max_watch if lim.readout else 0,
                        layers=sorted(self.readout_layers),
                    ),
                ),
                runtime_updates=RuntimeUpdates(
                    enabled=lim.allow_runtime_sae_updates,
                    layers=sorted(self.clamp_layers) if lim.allow_runtime_sae_updates else [],
                    sources=self._sources(),
                ),
            )
        return self._listing

    def _sources(self) -> list[Literal["path", "hf"]]:
        if not self.limits.allow_runtime_sae_updates:
            return []
        return ["path", "hf"] if self.limits.sae_root else ["hf"]

    # ------------------------------------------------------------ runtime registration
    def read_runtime_sae(self, name: str, path: str | Path) -> SAEInfo:
        """Check an SAE for runtime registration: the start-up check, plus a layer that has
        clamp tables and at least one mode it can be steered with."""
        if name in self.saes:
            raise PluginConfigError(f"an SAE named {name!r} is already registered")
        info = read_sae_info(name, path, self.num_layers, self.d_model, runtime=True)
        layer = info.cfg.hook_layer
        if layer not in self.clamp_layers:
            raise PluginConfigError(
                f"SAE {name!r} hooks layer {layer}, which has no steering tables on this "
                f"server; runtime SAEs can hook layers {sorted(self.clamp_layers) or 'none'} "
                "(restart with --steerable-layers to add layers)"
            )
        if not self.modes(info):
            raise PluginConfigError(
                f"SAE {name!r} is TopK (add mode only) but layer {layer} does not accept 'add' "
                f"on this server (vector_layers={self.limits.vector_layers})"
            )
        return info

    def add(self, info: SAEInfo, rows: SAERows | None = None) -> None:
        """Register ``info`` (``rows``: its feature reader, when already opened)."""
        self.saes[info.name] = info
        self._rows.pop(info.name, None)
        if rows is not None:
            self._rows[info.name] = rows
        self._listing = None

    def remove(self, name: str) -> SAEInfo:
        info = self.saes.pop(name)
        self._rows.pop(name, None)
        self._listing = None
        return info


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
    if iv.unit != "max":
        unit = info.units.get(iv.unit)
        if unit is None:
            raise SteeringSpecError(
                f"steering: SAE {iv.sae!r} has no {iv.unit!r} unit in its feature statistics "
                f"({STATS_FILE} predates it); use unit 'max' or 'value', or re-run "
                f"`sae-steer score` for this SAE"
            )
        return iv.strength * float(unit[iv.feature])
    return iv.strength * float(info.max_activation[iv.feature])


def check_spec(spec: SteeringSpec, cat: SAECatalog) -> None:
    """Reject anything the model cannot do exactly; messages name the problem.

    The rules are :func:`~sae_steer_vllm.sae_api.check_spec_against` on the catalog's
    listing (what clients check a sweep against), plus finite feature targets.
    """
    check_spec_against(spec, cat.listing())
    for k, iv in enumerate(spec.interventions):
        if isinstance(iv, FeatureIntervention) and iv.mode != "scale":
            target = _target(iv, cat.saes[iv.sae])
            if not abs(target) < float("inf"):
                raise SteeringSpecError(f"steering: interventions.{k}: target value is not finite")


WINDOW_END = 1 << 62
"""An open end of a window (larger than any generated index)."""


@dataclass
class ConditionRow:
    """``when``: the condition feature's encoder row and the open band it must lie in."""

    enc: torch.Tensor  # [d] float32
    bias: float
    threshold: float
    above: float  # -inf when only 'below'
    below: float  # +inf when only 'above'


@dataclass
class EntryRow:
    """One per-token intervention: ``h' = h + (target + slope * f_i(h)) * W_dec[i]`` where its
    gate (positions, window, condition) admits the token. Clamp: slope -1; add: slope 0 (and a
    zero encoder); scale by ``m``: target 0, slope ``m - 1``."""

    enc: torch.Tensor  # [d] float32
    bias: float
    threshold: float
    dec: torch.Tensor  # [d] float32
    target: float
    slope: float = -1.0
    positions: PositionMode = PositionMode.ALL
    window: tuple[int, int] = (-WINDOW_END, WINDOW_END)
    """``[start, stop)`` in generated-token indices; the default admits every token, prompt too"""
    when: ConditionRow | None = None


@dataclass
class LayerPlan:
    add: torch.Tensor | None = None  # [d] float32, summed ungated add-mode and vector contributions
    entries: list[EntryRow] = field(default_factory=list)
    clamp_site: Site = "resid_post"
    """what clamps and scales encode: resid_post, or the layer's MLP output (check_spec: one
    per layer and request)"""


@dataclass
class SteeringPlan:
    layers: dict[int, LayerPlan]
    position_mode: PositionMode
    readout: ReadoutSpec | None = None
    """what the request reads (:mod:`sae_steer_vllm.readout_worker`); its tables may be empty"""

    @property
    def needs_phase(self) -> bool:
        """Some token's gate depends on the think markers (the worker then tracks S and E)."""
        phases = (PositionMode.THINKING, PositionMode.ANSWER)
        return self.position_mode in phases or any(
            e.positions in phases for lp in self.layers.values() for e in lp.entries
        )


def plan_spec(spec: SteeringSpec, cat: SAECatalog) -> SteeringPlan:
    """Checked spec -> per-layer add vector and entries (float32)."""
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
        layer = info.cfg.hook_layer
        enc, bias, thr, dec = cat.rows(iv.sae).feature(iv.feature)
        if iv.mode == "add" and not iv.gated:
            add_to(layer, dec * _target(iv, info))
            continue
        lp = layers.setdefault(layer, LayerPlan())
        if iv.mode == "add":
            row = EntryRow(torch.zeros_like(enc), 0.0, 0.0, dec, _target(iv, info), slope=0.0)
        elif iv.mode == "scale":
            assert iv.factor is not None
            row = EntryRow(enc, bias, thr, dec, 0.0, slope=iv.factor - 1.0)
            lp.clamp_site = iv.site
        else:
            row = EntryRow(enc, bias, thr, dec, _target(iv, info))
            lp.clamp_site = iv.site
        row.positions = PositionMode.of(iv.positions or spec.positions)
        if iv.window is not None:
            start, stop = iv.window
            row.window = (start or 0, WINDOW_END if stop is None else stop)
        if iv.when is not None:
            c = iv.when
            cenc, cbias, cthr, _ = cat.rows(c.sae).feature(c.feature)
            row.when = ConditionRow(
                cenc,
                cbias,
                cthr,
                -math.inf if c.above is None else c.above,
                math.inf if c.below is None else c.below,
            )
        lp.entries.append(row)
    return SteeringPlan(
        layers=layers, position_mode=PositionMode.of(spec.positions), readout=spec.readout
    )


def _think_markers(model_config: Any, config: PluginConfig) -> ThinkMarkers | None:
    """The served model's think markers, from vLLM's own tokenizer for it (the one that made
    the ids the worker sees); None, logged, when it has none."""
    from vllm.tokenizers.registry import cached_tokenizer_from_config

    from .think_phase import resolve_think_markers

    try:
        tokenizer = cached_tokenizer_from_config(model_config)
    except Exception as e:  # noqa: BLE001 - a model without a tokenizer just has no phases
        logger.warning("sae-steer: no tokenizer, so no think phases: %s", e)
        return None
    markers, why = resolve_think_markers(
        tokenizer, config.think_start_marker, config.think_end_marker
    )
    logger.info("sae-steer: think markers: %s", why)
    return markers
