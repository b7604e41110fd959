"""The table of SAE folder layouts we read, each turned into the one canonical SAE.

As SAELens does with its converters, every foreign layout is one entry of
:data:`LAYOUTS`: the weights file that identifies it, one function that parses
its ``cfg.json`` into a :class:`SAEConfig`, and where it stores each canonical
tensor. Nothing outside this module knows which layout a folder had: the full
loader (:func:`load_canonical`) and the per-feature row reader
(:class:`~sae_steer_vllm.sae.rows.SAERows`) both go through the same entry, so
they cannot disagree about orientation or thresholds. Adding a layout is one
parsing function and one table row.

Canonical tensors (SAELens orientation): ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` and, for JumpReLU, ``threshold [d_sae]``.
Pickle weights are never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..constants import SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from .config import ARCHITECTURES, SAEConfig, SAEFormatError, layer_from_text
from .tensor_file import Shapes, header_shapes, read_tensors

ConfigParser = Callable[[dict[str, Any], Path, Shapes], SAEConfig]
"""(raw cfg.json, folder, tensor shapes from the weights header) -> canonical config."""


@dataclass(frozen=True)
class StoredNames:
    """Where a layout keeps each canonical tensor, and how its encoder is oriented."""

    W_enc: str
    b_enc: str
    W_dec: str = "W_dec"
    b_dec: str = "b_dec"
    enc_rows_first: bool = False
    """True when the encoder is stored ``[d_sae, d_in]`` (``nn.Linear``); decides square SAEs."""
    threshold: str | None = None
    log_threshold: str | None = None
    """JumpReLU threshold stored as its logarithm (SAELens training checkpoints)."""

    def threshold_of(
        self, present: set[str], get: Callable[[str], torch.Tensor]
    ) -> torch.Tensor | None:
        """The canonical threshold (float32), or None; ``get`` reads one stored tensor."""
        if self.threshold is not None and self.threshold in present:
            return get(self.threshold).float()
        if self.log_threshold is not None and self.log_threshold in present:
            return torch.exp(get(self.log_threshold).float())
        return None


@dataclass(frozen=True)
class Layout:
    """One on-disk SAE layout: its weights file, config parser and tensor names."""

    name: str
    weights_file: str
    parse_config: ConfigParser
    stored: StoredNames


def _rows_first(
    shape: tuple[int, ...], cfg: SAEConfig, native_rows_first: bool, path: Path, name: str
) -> bool:
    """Whether a ``[d_sae, d_in]``-or-transposed matrix holds one feature per row.

    Either orientation is accepted; a square matrix cannot tell, so the layout's
    native orientation decides.
    """
    d_in, d_sae = cfg.d_in, cfg.d_sae
    if d_in == d_sae and tuple(shape) == (d_in, d_in):
        return native_rows_first
    if tuple(shape) == (d_sae, d_in):
        return True
    if tuple(shape) == (d_in, d_sae):
        return False
    raise SAEFormatError(f"{path}: {name} has shape {tuple(shape)}; d_in={d_in} d_sae={d_sae}")


def orientation(
    cfg: SAEConfig, stored: StoredNames, shapes: Shapes, path: Path
) -> tuple[bool, bool]:
    """Whether the stored encoder and decoder hold one feature per row, from the header.

    Checks every required tensor is present and has a usable shape, so a broken
    file fails before any weights are read.
    """
    for name in (stored.W_enc, stored.b_enc, stored.W_dec, stored.b_dec):
        if name not in shapes:
            raise SAEFormatError(f"{path}: missing tensor {name!r}")
    enc = _rows_first(shapes[stored.W_enc], cfg, stored.enc_rows_first, path, stored.W_enc)
    dec = _rows_first(shapes[stored.W_dec], cfg, True, path, stored.W_dec)
    return enc, dec


# ------------------------------------------------------------------ SAELens (v6 and flat)
def saelens_config(raw: dict[str, Any], folder: Path, shapes: Shapes) -> SAEConfig:
    """SAELens ``cfg.json``: v6 (hook and model under ``metadata``) or the older flat one."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    assert isinstance(meta, dict)

    def get(key: str, default: Any = None) -> Any:
        return raw.get(key, meta.get(key, default))

    if "W_dec" not in shapes:
        raise SAEFormatError("weights file has no W_dec tensor")
    d_sae, d_in = shapes["W_dec"]
    d_in = int(get("d_in", d_in))
    d_sae = int(get("d_sae", d_sae))
    arch = str(get("architecture", "standard"))
    act_fn = str(get("activation_fn_str", get("activation_fn", "relu")))
    k = get("k")
    kwargs = get("activation_fn_kwargs") or {}
    if k is None and isinstance(kwargs, dict):
        k = kwargs.get("k")
    if arch == "standard" and act_fn == "topk":
        arch = "topk"
    if arch == "batchtopk":
        # SAELens folds BatchTopK into a JumpReLU threshold when it saves for inference
        if "threshold" in shapes or "log_threshold" in shapes:
            arch = "jumprelu"
        else:
            raise SAEFormatError("batchtopk SAE without a threshold tensor cannot run at inference")
    if arch not in ARCHITECTURES:
        raise SAEFormatError(f"unsupported architecture {arch!r} (supported: {ARCHITECTURES})")
    hook_name = str(get("hook_name", ""))
    layer = get("hook_layer")
    if layer is None:
        layer = layer_from_text(hook_name)
    if layer is None:
        raise SAEFormatError("no hook_layer and no layer number in hook_name")
    norm = get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEFormatError(
            f"normalize_activations={norm!r} is not folded into the weights; "
            "fold it (SAELens: sae.fold_activation_norm_scaling_factor) and save again"
        )
    if hook_name and "resid_post" not in hook_name and "layers." not in hook_name:
        raise SAEFormatError(
            f"hook {hook_name!r} is not a residual-stream-after-layer hook (resid_post)"
        )
    ctx = get("context_size")
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=arch,  # type: ignore[arg-type]
        hook_layer=int(layer),
        hook_name=hook_name,
        model_name=str(get("model_name", "")),
        k=None if k is None else int(k),
        apply_b_dec_to_input=bool(get("apply_b_dec_to_input", True)),
        dtype=str(get("dtype", "float32")),
        context_size=None if ctx is None else int(ctx),
    )


# ------------------------------------------------------------------ EleutherAI sparsify
def sparsify_config(raw: dict[str, Any], folder: Path, shapes: Shapes) -> SAEConfig:
    """sparsify ``cfg.json``: always TopK; the layer from ``layer``, ``hookpoint`` or the folder name."""
    if "encoder.weight" not in shapes:
        raise SAEFormatError("sparsify weights have no encoder.weight tensor")
    d_sae, d_in = shapes["encoder.weight"]
    d_in = int(raw.get("d_in", d_in))
    k = raw.get("k")
    if k is None:
        raise SAEFormatError("sparsify config has no k")
    layer = raw.get("layer")
    if layer is None:
        layer = layer_from_text(str(raw.get("hookpoint", ""))) or layer_from_text(folder.name)
    if layer is None:
        raise SAEFormatError(
            "cannot tell the layer: no 'layer'/'hookpoint' and folder is not layers.N"
        )
    return SAEConfig(
        d_in=d_in,
        d_sae=int(d_sae),
        architecture="topk",
        hook_layer=int(layer),
        hook_name=f"layers.{layer}",
        model_name=str(raw.get("model", "")),
        k=int(k),
        apply_b_dec_to_input=True,
    )


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout(
            "saelens",
            SAELENS_WEIGHTS,
            saelens_config,
            StoredNames("W_enc", "b_enc", threshold="threshold", log_threshold="log_threshold"),
        ),
        Layout(
            "sparsify",
            SPARSIFY_WEIGHTS,
            sparsify_config,
            StoredNames("encoder.weight", "encoder.bias", enc_rows_first=True),
        ),
    )
}
"""Layout name -> entry, in detection order (the first whose weights file exists wins)."""


# ------------------------------------------------------------------ reading a folder
def read_config(folder: str | Path) -> tuple[SAEConfig, Path, str]:
    """Parse a folder's config without reading the weights.

    Returns the config, the weights path and the layout name (a key of
    :data:`LAYOUTS`). Sizes missing from the config are read from the safetensors
    header, so this stays cheap for multi-GB SAEs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEFormatError(f"{folder}: not a directory (an SAE is a folder with cfg.json)")
    cfg_path = folder / SAELENS_CFG
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    layout = next((lo for lo in LAYOUTS.values() if (folder / lo.weights_file).is_file()), None)
    if layout is None:
        if any(folder.glob("*.pt")) or any(folder.glob("*.bin")):
            raise SAEFormatError(
                f"{folder}: only pickle weights found; safetensors required (pickle is never loaded)"
            )
        names = " or ".join(lo.weights_file for lo in LAYOUTS.values())
        raise SAEFormatError(f"{folder}: no {names}")
    weights = folder / layout.weights_file
    shapes = header_shapes(weights)
    try:
        return layout.parse_config(raw, folder, shapes), weights, layout.name
    except SAEFormatError as e:
        msg = str(e)
        raise SAEFormatError(
            msg if msg.startswith(str(cfg_path)) else f"{cfg_path}: {msg}"
        ) from None


def load_canonical(folder: str | Path) -> tuple[SAEConfig, dict[str, torch.Tensor], Path]:
    """Config, canonical float32 tensors and weights path of any layout in :data:`LAYOUTS`."""
    cfg, path, name = read_config(folder)
    stored = LAYOUTS[name].stored
    enc_rows_first, dec_rows_first = orientation(cfg, stored, header_shapes(path), path)
    t = read_tensors(path)
    enc, b_enc, dec, b_dec = (
        t[n] for n in (stored.W_enc, stored.b_enc, stored.W_dec, stored.b_dec)
    )
    if enc_rows_first:
        enc = enc.T.contiguous()
    if not dec_rows_first:
        dec = dec.T.contiguous()
    threshold = stored.threshold_of(set(t), t.__getitem__)
    canon = {"W_enc": enc, "b_enc": b_enc, "W_dec": dec, "b_dec": b_dec}
    out = {k: v.float() for k, v in canon.items()}
    if threshold is not None:
        out["threshold"] = threshold
    return cfg, out, path
