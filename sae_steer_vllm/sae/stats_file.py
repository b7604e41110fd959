"""``feature_stats.safetensors``: the per-feature statistics file beside an SAE, and its one owner.

Written by ``sae-steer score`` (sae_training's feature statistics call
:func:`write_stats`), read by the server (:func:`load_units`: ``strength`` is a
multiple of each feature's max activation, or of its quantile unit) and by the
feature-finding tools (:func:`read_stats`).

Schema: a safetensors file whose tensors are named per-feature statistics. The
one every reader needs is ``max_activation`` (``[d_sae]`` float32, raw SAE units,
finite). Since format 2 there is also ``quantile_unit`` (``[d_sae]`` float32, raw
units: a high quantile of the feature's non-zero activations, its level in the
metadata key ``quantile_unit_level``); format-1 files lack it and stay readable (a
request for that unit is refused). The full list written by sae_training is
documented in ``docs/reasonscore.md``. Metadata values are JSON, stored one JSON
string per key (safetensors metadata is ``str -> str``); ``format_version`` names
the schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..constants import STATS_FILE
from .config import SAEFormatError
from .tensor_file import opened, read_safetensors, write_tensors

STATS_FORMAT_VERSION = "2"
MAX_ACTIVATION = "max_activation"
QUANTILE_UNIT = "quantile_unit"
QUANTILE_UNIT_LEVEL = "quantile_unit_level"
UNIT_TENSORS: dict[str, str] = {"max": MAX_ACTIVATION, "quantile": QUANTILE_UNIT}
"""A request's ``unit`` -> the tensor its ``strength`` multiplies."""


def stats_path(path: str | Path) -> Path:
    """The statistics file of an SAE folder (or ``path`` itself when it is not a folder)."""
    path = Path(path)
    return path / STATS_FILE if path.is_dir() else path


def write_stats(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write tensors + JSON-able metadata atomically into a folder or to a file path."""
    if MAX_ACTIVATION not in tensors:
        raise SAEFormatError(f"{path}: statistics need a {MAX_ACTIVATION} tensor")
    return write_tensors(stats_path(path), tensors, {k: json.dumps(v) for k, v in meta.items()})


def read_stats(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every tensor and the decoded metadata of a statistics file (folder or file path)."""
    path = stats_path(path)
    if not path.is_file():
        raise SAEFormatError(f"{path}: no statistics file (run `sae-steer score` first)")
    tensors, raw = read_safetensors(path)
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    if MAX_ACTIVATION not in tensors:
        raise SAEFormatError(f"{path}: no {MAX_ACTIVATION} tensor")
    return tensors, meta


def load_max_activation(folder: str | Path) -> torch.Tensor | None:
    """Per-feature max activation from the statistics file, or None if there is none.

    Reads only that tensor: the full file (top examples, histograms) is much larger.
    """
    return load_units(folder).get("max")


def load_units(folder: str | Path) -> dict[str, torch.Tensor]:
    """The ``strength`` units the statistics file holds, by unit name (``UNIT_TENSORS``):
    ``{}`` without a file, ``max`` always with one, ``quantile`` from format 2 on.

    Reads only those tensors: the full file (top examples, histograms) is much larger.
    """
    path = stats_path(folder)
    if not path.is_file():
        return {}
    with opened(path) as f:
        present = set(f.keys())
    wanted = {u: n for u, n in UNIT_TENSORS.items() if n in present}
    if MAX_ACTIVATION not in present:
        raise SAEFormatError(f"{path}: no {MAX_ACTIVATION} tensor")
    tensors = read_safetensors(path, list(wanted.values()))[0]
    units: dict[str, torch.Tensor] = {}
    for unit, name in wanted.items():
        t = tensors[name].float()
        if t.shape != tensors[MAX_ACTIVATION].shape:
            raise SAEFormatError(
                f"{path}: {name} has shape {tuple(t.shape)}, "
                f"{MAX_ACTIVATION} {tuple(tensors[MAX_ACTIVATION].shape)}"
            )
        if not torch.isfinite(t).all():
            raise SAEFormatError(f"{path}: {name} has non-finite values")
        units[unit] = t
    return units
