"""``feature_stats.safetensors``: the per-feature statistics file beside an SAE, and its one owner.

Written by ``sae-steer score`` (sae_training's feature statistics call
:func:`write_stats`), read by the server (:func:`load_max_activation`: ``strength``
is a multiple of each feature's max activation) and by the feature-finding tools
(:func:`read_stats`).

Schema: a safetensors file whose tensors are named per-feature statistics. The
one every reader needs is ``max_activation`` (``[d_sae]`` float32, raw SAE units,
finite); the full list written by sae_training is documented in
``docs/reasonscore.md``. Metadata values are JSON, stored one JSON string per key
(safetensors metadata is ``str -> str``); ``format_version`` names the schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..constants import STATS_FILE
from .config import SAEFormatError
from .tensor_file import read_safetensors, write_tensors

STATS_FORMAT_VERSION = "1"
MAX_ACTIVATION = "max_activation"


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
    path = stats_path(folder)
    if not path.is_file():
        return None
    t = read_safetensors(path, [MAX_ACTIVATION])[0][MAX_ACTIVATION].float()
    if not torch.isfinite(t).all():
        raise SAEFormatError(f"{path}: {MAX_ACTIVATION} has non-finite values")
    return t
