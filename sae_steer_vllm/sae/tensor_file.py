"""Reading and writing safetensors files, with errors that name the file.

Every SAE and statistics file goes through here, so a corrupt or truncated file
always gives the same :class:`SAEFormatError` ("not a readable safetensors
file") instead of one of the several exception types safetensors raises, and
every write is atomic (:func:`sae_steer_vllm.files.atomic_save`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_save
from .config import SAEFormatError

Shapes = dict[str, tuple[int, ...]]


def _unreadable(path: Path, e: Exception) -> SAEFormatError:
    return SAEFormatError(f"{path}: not a readable safetensors file ({e})")


@contextmanager
def opened(path: str | Path) -> Iterator[Any]:
    """``safe_open`` for slicing single rows; a file that cannot be opened is an SAEFormatError."""
    path = Path(path)
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # safetensors raises several types for corrupt files
        raise _unreadable(path, e) from None
    with f:
        yield f


def read_safetensors(
    path: str | Path, names: Iterable[str] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The named tensors (all when ``names`` is None) and the header's string metadata."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())  # noqa: SIM118 - safe_open is not a dict
            wanted = keys if names is None else list(names)
            for name in wanted:
                if name not in keys:
                    raise SAEFormatError(f"{path}: no {name} tensor")
            return {k: f.get_tensor(k) for k in wanted}, dict(f.metadata() or {})
    except SAEFormatError:
        raise
    except Exception as e:
        raise _unreadable(path, e) from None


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file."""
    return read_safetensors(path)[0]


def header_shapes(path: str | Path) -> Shapes:
    """Tensor name -> shape from the header only: cheap for multi-GB files."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise _unreadable(path, e) from None


def write_tensors(
    path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> Path:
    """Write contiguous CPU copies of ``tensors`` atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_save(path, lambda tmp: save_file(flat, str(tmp), metadata=metadata))
