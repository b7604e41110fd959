"""What the trainer reads: a fixed set of activations of one layer, batch by batch.

Two sources with one interface (:class:`ActivationSource`): :class:`MemoryActivations`
(all tokens in RAM, shuffled per epoch) and :class:`DiskCache` (an activation cache on
disk, :mod:`sae_training.activation_cache`; memory stays at about one shuffle window
whatever the run length). Both give a deterministic batch order per ``(seed, epoch)``,
so a resumed run sees the very same batches.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from sae_training.activation_cache import read_cache_meta, read_shard
from sae_training.errors import ActivationError


class ActivationSource(Protocol):
    """A fixed set of ``[N, d]`` activations of one layer."""

    d_in: int
    num_tokens: int

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        """All full batches of one epoch in a deterministic order (drops the ragged end)."""
        ...

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` activations (for the normalisation estimate)."""
        ...


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The batch order's own generator: a pure function of (seed, epoch), no global RNG."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class MemoryActivations:
    """All activations in one tensor; a seeded permutation per epoch."""

    def __init__(self, acts: torch.Tensor) -> None:
        if acts.ndim != 2 or acts.shape[0] == 0:
            raise ActivationError(f"expected a non-empty [N, d] tensor, got {tuple(acts.shape)}")
        self.acts = acts.float().contiguous()
        self.d_in = int(acts.shape[1])
        self.num_tokens = int(acts.shape[0])

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        perm = torch.randperm(self.num_tokens, generator=_epoch_generator(seed, epoch))
        for i in range(self.num_tokens // batch_size):
            yield self.acts[perm[i * batch_size : (i + 1) * batch_size]]

    def head(self, n: int) -> torch.Tensor:
        return self.acts[:n]


class DiskCache:
    """One layer of an activation cache, read a shuffle window (``window_shards``) at a time."""

    def __init__(
        self, folder: str | Path, layer: int | None = None, window_shards: int = 4
    ) -> None:
        self.folder = Path(folder)
        self.meta = read_cache_meta(self.folder)
        self.layer = self.meta.layers[0] if layer is None else layer
        if self.layer not in self.meta.layers:
            raise ActivationError(f"{self.folder}: has layers {self.meta.layers}, not {self.layer}")
        self.d_in = self.meta.d_in
        self.num_tokens = self.meta.tokens
        self.window_shards = max(1, window_shards)

    def load_shard(self, i: int) -> torch.Tensor:
        return read_shard(self.folder, i, self.layer)

    def head(self, n: int) -> torch.Tensor:
        parts, have = [], 0
        for i in range(len(self.meta.shards)):
            if have >= n:
                break
            t = self.load_shard(i)[: n - have]
            parts.append(t)
            have += t.shape[0]
        return torch.cat(parts)

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        g = _epoch_generator(seed, epoch)
        order = torch.randperm(len(self.meta.shards), generator=g).tolist()
        carry = torch.empty(0, self.d_in)
        for w in range(0, len(order), self.window_shards):
            window = torch.cat(
                [carry, *[self.load_shard(i) for i in order[w : w + self.window_shards]]]
            )
            window = window[torch.randperm(window.shape[0], generator=g)]
            full = window.shape[0] // batch_size
            for b in range(full):
                yield window[b * batch_size : (b + 1) * batch_size]
            carry = window[full * batch_size :]


def estimate_norm_scale(source: ActivationSource, n: int = 32768) -> float:
    """Factor making the mean activation norm sqrt(d_in) (SAELens ``expected_average_only_in``)."""
    head = source.head(n)
    mean_norm = float(head.norm(dim=-1).mean())
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ActivationError(f"activations have mean norm {mean_norm}; cannot normalise")
    return math.sqrt(source.d_in) / mean_norm
