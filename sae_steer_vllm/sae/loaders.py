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

from ..constants import LM_SAES_CFG, SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS
from .config import SAEConfig, SAEFormatError, layer_from_text
from .llama_scope import llama_scope_config, llama_scope_vectors
from .saelens_format import saelens_config
from .tensor_file import Shapes, header_shapes, read_tensors

ConfigParser = Callable[[dict[str, Any], Path, Shapes], SAEConfig]
"""(raw cfg.json, folder, tensor shapes from the weights header) -> canonical config."""
VectorReader = Callable[[SAEConfig, Path], dict[str, torch.Tensor]]
"""(config, weights path) -> canonical float32 ``b_enc``, ``b_dec`` (and ``threshold``)."""


@dataclass(frozen=True)
class StoredNames:
    """Where a layout keeps each canonical tensor, and how its encoder is oriented."""

    W_enc: str
    b_enc: str
    W_dec: str = "W_dec"
    b_dec: str = "b_dec"
    enc_rows_first: bool = False
    """True when the encoder is stored ``[d_sae, d_in]`` (``nn.Linear``); decides square SAEs."""
    dec_rows_first: bool = True
    """False when the decoder is stored ``[d_in, d_sae]`` (``nn.Linear``); decides square SAEs."""
    threshold: str | None = None
    log_threshold: str | None = None
    """JumpReLU threshold stored as its logarithm (SAELens training checkpoints)."""

    gate: tuple[str, str, str] | None = None
    """Gated-SAE tensors ``(b_gate, b_mag, r_mag)`` (SAELens ``GatedSAE``). When present the
    SAE is read as the JumpReLU it equals: ``1[x.w + b_gate > 0] * relu(e^r x.w + b_mag)``
    is ``relu(pre) * (pre > t)`` with ``pre = x.(w e^r) + b_mag`` and ``t = b_mag - e^r
    b_gate`` (``e^r > 0`` keeps the comparison's direction), so the server's JumpReLU clamp
    serves it unchanged."""

    def gated(self, present: set[str]) -> bool:
        return self.gate is not None and all(n in present for n in self.gate)

    def bias_name(self, present: set[str]) -> str:
        """The stored tensor that is the canonical ``b_enc`` (``b_mag`` for a gated SAE)."""
        return self.gate[1] if self.gate is not None and self.gated(present) else self.b_enc

    def enc_scale_of(
        self, present: set[str], get: Callable[[str], torch.Tensor]
    ) -> torch.Tensor | None:
        """Per-feature factor of the encoder columns (``exp(r_mag)``, gated), or None."""
        if self.gate is None or not self.gated(present):
            return None
        return get(self.gate[2]).float().exp()

    def threshold_of(
        self, present: set[str], get: Callable[[str], torch.Tensor]
    ) -> torch.Tensor | None:
        """The canonical threshold (float32), or None; ``get`` reads one stored tensor."""
        if self.gate is not None and self.gated(present):
            b_gate, b_mag, r_mag = (get(n).float() for n in self.gate)
            return b_mag - r_mag.exp() * b_gate
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
    config_file: str = SAELENS_CFG
    vectors: VectorReader | None = None
    """For layouts whose small vectors need a fold (a stored norm factor): computes them
    instead of reading ``stored.b_enc``/``b_dec``/threshold; the matrices stay as stored."""


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
    for name in (stored.W_enc, stored.bias_name(set(shapes)), stored.W_dec, stored.b_dec):
        if name not in shapes:
            raise SAEFormatError(f"{path}: missing tensor {name!r}")
    enc = _rows_first(shapes[stored.W_enc], cfg, stored.enc_rows_first, path, stored.W_enc)
    dec = _rows_first(shapes[stored.W_dec], cfg, stored.dec_rows_first, path, stored.W_dec)
    return enc, dec


# ------------------------------------------------------------------ EleutherAI sparsify
def sparsify_config(raw: dict[str, Any], folder: Path, shapes: Shapes) -> SAEConfig:
    """sparsify ``cfg.json``: always TopK; the layer from ``layer``, ``hookpoint`` or the folder name.

    Transcoders (``transcode: true``, or a ``W_skip`` skip connection) are refused: they
    encode one site (an MLP's input) and decode into another (its output, plus ``W_skip @ x``),
    so there is no residual vector whose features could be clamped and written back.
    """
    found = [
        what
        for what, present in (
            ("a W_skip tensor (skip connection)", "W_skip" in shapes),
            ("transcode: true", bool(raw.get("transcode"))),
            ("skip_connection: true", bool(raw.get("skip_connection"))),
        )
        if present
    ]
    if found:
        raise SAEFormatError(
            f"sparsify transcoder ({', '.join(found)}): it reads one site and writes another "
            "(an MLP's input and output), so it cannot be served as a resid_post SAE"
        )
    known = {"encoder.weight", "encoder.bias", "W_dec", "b_dec"}
    extra = sorted(set(shapes) - known)
    if extra:
        raise SAEFormatError(f"sparsify weights: unexpected tensor(s) {extra}")
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
            StoredNames(
                "W_enc",
                "b_enc",
                threshold="threshold",
                log_threshold="log_threshold",
                gate=("b_gate", "b_mag", "r_mag"),
            ),
        ),
        Layout(
            "llama_scope",
            SAELENS_WEIGHTS,
            llama_scope_config,
            StoredNames(
                "encoder.weight",
                "encoder.bias",
                "decoder.weight",
                "decoder.bias",
                enc_rows_first=True,
                dec_rows_first=False,
            ),
            config_file=LM_SAES_CFG,
            vectors=llama_scope_vectors,
        ),
        Layout(
            "sparsify",
            SPARSIFY_WEIGHTS,
            sparsify_config,
            StoredNames("encoder.weight", "encoder.bias", enc_rows_first=True),
        ),
    )
}
"""Layout name -> entry, in detection order (the first whose weights and config files both
exist wins: a SAELens folder has ``cfg.json``, an lm-saes one ``config.json``)."""


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
    layout = next(
        (
            lo
            for lo in LAYOUTS.values()
            if (folder / lo.weights_file).is_file() and (folder / lo.config_file).is_file()
        ),
        None,
    )
    if layout is None:
        if any(folder.glob("*.pt")) or any(folder.glob("*.pth")) or any(folder.glob("*.bin")):
            raise SAEFormatError(
                f"{folder}: only pickle weights found; the server never unpickles "
                "(safetensors required): convert them with `sae-steer convert`"
            )
        if not any((folder / lo.config_file).is_file() for lo in LAYOUTS.values()):
            raise SAEFormatError(f"{folder / SAELENS_CFG}: missing (lm-saes: {LM_SAES_CFG})")
        names = " or ".join(sorted({lo.weights_file for lo in LAYOUTS.values()}))
        raise SAEFormatError(f"{folder}: no {names}")
    cfg_path = folder / layout.config_file
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
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
    present = set(t)
    enc, b_enc, dec, b_dec = (
        t[n] for n in (stored.W_enc, stored.bias_name(present), stored.W_dec, stored.b_dec)
    )
    if enc_rows_first:
        enc = enc.T.contiguous()
    enc_scale = stored.enc_scale_of(present, t.__getitem__)
    if enc_scale is not None:
        enc = enc.float() * enc_scale
    if not dec_rows_first:
        dec = dec.T.contiguous()
    threshold = stored.threshold_of(present, t.__getitem__)
    canon = {"W_enc": enc, "b_enc": b_enc, "W_dec": dec, "b_dec": b_dec}
    out = {k: v.float() for k, v in canon.items()}
    if threshold is not None:
        out["threshold"] = threshold
    fold = LAYOUTS[name].vectors
    if fold is not None:
        out.update(fold(cfg, path))
    return cfg, out, path
