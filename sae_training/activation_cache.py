"""The activation cache on disk: its names, its manifest, reading, writing, compatibility.

A cache is a folder of ``shard_NNNNN.safetensors`` files (one ``layer_L`` tensor
``[n, d_in]`` per collected layer) plus ``meta.json`` (:class:`CacheMeta`). The manifest
is written last and atomically, with ``complete: true``: a folder whose collection was
killed has no usable manifest, so nothing ever trains on half a cache.

This module is the one owner of the format: ``sae-steer collect`` and ``sae-steer train``
write it through :class:`CacheWriter`; the trainer reads it through
:class:`~sae_training.activation_sources.DiskCache`; and whether an existing cache can
stand in for a new collection is decided only by :func:`cache_matches`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import BaseModel, ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from sae_steer_vllm.constants import ACTIVATION_META, ACTIVATIONS_DIR, SHARD_PREFIX
from sae_steer_vllm.files import atomic_save, atomic_write_json
from sae_training.errors import ActivationError

DEFAULT_SHARD_TOKENS = 65536
"""Tokens per shard file: 64k x 576 floats is 150 MB, a comfortable unit to shuffle."""

if TYPE_CHECKING:
    from sae_training.collection import CollectConfig


class CacheMeta(BaseModel):
    """``meta.json``: what was collected, from what, and how it is sharded."""

    model: str
    """The model folder the activations come from."""
    layers: list[int]
    """Decoder layers collected (one ``layer_L`` tensor per shard each)."""
    d_in: int
    context_size: int
    """Tokens per packed row (BOS + text, or text only when ``prepend_bos`` is false)."""
    prepend_bos: bool = True
    """Whether every packed row started with BOS (caches written before this field
    existed always did)."""
    tokens: int
    """Kept (non-special) token activations per layer, over all shards."""
    shard_tokens: int
    shards: list[int]
    """Tokens in each shard, in file order."""
    mix: dict[str, Any]
    """The :class:`~sae_training.corpus.TextMix` the documents came from (empty if unknown)."""
    split: str
    dtype: str
    complete: bool = False
    skipped_records: int = 0
    seconds: float = 0.0


def shard_path(folder: str | Path, i: int) -> Path:
    return Path(folder) / f"{SHARD_PREFIX}{i:05d}.safetensors"


def read_cache_meta(folder: str | Path, *, require_complete: bool = True) -> CacheMeta:
    """The manifest of the cache in ``folder``; :class:`ActivationError` if there is none,
    it is unreadable, or (``require_complete``) the collection did not finish."""
    folder = Path(folder)
    path = folder / ACTIVATION_META
    if not path.is_file():
        raise ActivationError(
            f"{folder}: not an activation cache (no {ACTIVATION_META}); "
            "write one with `sae-steer collect`"
        )
    try:
        meta = CacheMeta.model_validate_json(path.read_text())
    except (OSError, ValidationError) as e:
        raise ActivationError(f"{path}: unreadable ({e})") from None
    if require_complete and not meta.complete:
        raise ActivationError(
            f"{folder}: collection did not finish ({ACTIVATION_META} complete=false)"
        )
    return meta


def read_shard(folder: str | Path, i: int, layer: int) -> torch.Tensor:
    """Shard ``i``'s activations of ``layer`` as float32 ``[n, d_in]``."""
    with safe_open(str(shard_path(folder, i)), framework="pt") as f:
        return f.get_tensor(f"layer_{layer}").float()


class CacheWriter:
    """Writes a cache shard by shard; at most one shard is held in memory.

    Opening clears any earlier shards and manifest in ``folder``; :meth:`close` writes the
    last partial shard and then the manifest (complete).
    """

    def __init__(
        self,
        folder: str | Path,
        layers: Sequence[int],
        *,
        shard_tokens: int = DEFAULT_SHARD_TOKENS,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if shard_tokens <= 0:
            raise ActivationError(f"shard_tokens must be positive, got {shard_tokens}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        for old in self.folder.glob(f"{SHARD_PREFIX}*.safetensors"):
            old.unlink()
        (self.folder / ACTIVATION_META).unlink(missing_ok=True)
        self.layers = list(layers)
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.sizes: list[int] = []
        self.d_in = 0
        self._pending: dict[int, list[torch.Tensor]] = {ly: [] for ly in self.layers}
        self._have = 0

    def add(self, chunk: dict[int, torch.Tensor]) -> None:
        """Append ``{layer: [n, d_in]}`` (the same ``n`` for every layer)."""
        for layer, a in chunk.items():
            self._pending[layer].append(a)
            self.d_in = int(a.shape[1])
        self._have += int(next(iter(chunk.values())).shape[0])
        while self._have >= self.shard_tokens:
            self._flush(self.shard_tokens)

    def _flush(self, n: int) -> None:
        tensors = {}
        for layer in self.layers:
            cat = torch.cat(self._pending[layer])
            tensors[f"layer_{layer}"] = cat[:n].to(self.dtype).contiguous()
            self._pending[layer] = [cat[n:]]
        atomic_save(shard_path(self.folder, len(self.sizes)), lambda p: save_file(tensors, str(p)))
        self.sizes.append(n)
        self._have -= n

    def close(
        self,
        *,
        model: str,
        context_size: int,
        mix: dict[str, Any],
        prepend_bos: bool = True,
        split: str = "train",
        skipped_records: int = 0,
        seconds: float = 0.0,
    ) -> CacheMeta:
        if self._have > 0:
            self._flush(self._have)
        meta = CacheMeta(
            model=str(model),
            layers=self.layers,
            d_in=self.d_in,
            context_size=context_size,
            prepend_bos=prepend_bos,
            tokens=sum(self.sizes),
            shard_tokens=self.shard_tokens,
            shards=self.sizes,
            mix=mix,
            split=split,
            dtype=str(self.dtype).removeprefix("torch."),
            complete=True,
            skipped_records=skipped_records,
            seconds=round(seconds, 2),
        )
        atomic_write_json(self.folder / ACTIVATION_META, meta.model_dump())
        return meta


# ---------------------------------------------------------------------- compatibility
def cache_matches(folder: str | Path, cfg: CollectConfig) -> bool:
    """Whether the finished cache in ``folder`` holds exactly what ``cfg`` would collect.

    The one rule, used by ``sae-steer train`` (a resumed run does not collect again) and
    by the demo (adopting a cache collected earlier): same model, same token count, row
    length, row start (with or without BOS: the residual stream of every position
    differs), document mix, split and storage dtype, and every requested layer present
    (a cache with more layers serves as well: layers are stored separately).
    """
    try:
        meta = read_cache_meta(folder)
    except ActivationError:
        return False
    return (
        meta.model == str(cfg.model)
        and set(cfg.layers) <= set(meta.layers)
        and meta.tokens == cfg.tokens
        and meta.context_size == cfg.context_size
        and meta.prepend_bos == cfg.prepend_bos
        and meta.mix == asdict(cfg.mix)
        and meta.split == cfg.split
        and meta.dtype == cfg.dtype
    )


def find_matching_cache(roots: Iterable[str | Path], cfg: CollectConfig) -> Path | None:
    """The first cache matching ``cfg`` (:func:`cache_matches`) at, under or in a run of
    each root: ``root``, ``root/*`` and ``root/*/activations``, in that order."""
    for root in map(Path, roots):
        cands = [root, *sorted(p.parent for p in root.glob(f"*/{ACTIVATION_META}"))]
        cands += sorted(p.parent for p in root.glob(f"*/{ACTIVATIONS_DIR}/{ACTIVATION_META}"))
        for folder in cands:
            if cache_matches(folder, cfg):
                return folder
    return None
