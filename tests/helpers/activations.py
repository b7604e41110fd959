"""Activations for the training tests: a known sparse code, caches written by the real
writer, and a one-thread context for tiny tensors.

Synthetic data is a known sparse code (a few of ``m`` random unit directions per token),
so an SAE that learns anything reaches a high explained variance within a few hundred steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def synthetic_acts(
    n: int = 8192, d: int = 32, m: int = 96, k: int = 3, seed: int = 0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(m, d, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.randint(0, m, (n, k), generator=g)
    coef = torch.rand(n, k, generator=g) * 4 + 1
    x = torch.zeros(n, m).scatter_add_(1, idx, coef) @ dirs
    return x + 0.3 + 0.02 * torch.randn(n, d, generator=g)


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny tensors on a shared 2-core box run far faster without intra-op threads."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_cache(
    folder: Path,
    layer_acts: dict[int, torch.Tensor],
    *,
    model: str,
    shard_tokens: int = 65536,
    mix: dict[str, Any] | None = None,
) -> Path:
    """Activations already in memory as an activation cache, through the real writer."""
    from sae_training.activation_cache import CacheWriter

    writer = CacheWriter(folder, sorted(layer_acts), shard_tokens=shard_tokens)
    writer.add(layer_acts)
    writer.close(model=model, context_size=0, mix=mix or {})
    return folder
