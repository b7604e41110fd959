"""The one random-SAE builder, for tests and speed benchmarks.

Random but useful: decoder rows are unit vectors, the encoder is their transpose
and ``b_enc`` is positive, so features actually fire on real activations and
steering visibly moves outputs. Deterministic for a given ``seed``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import Architecture, SAEConfig
from .model import SAE
from .stats_file import write_stats


def random_sae(
    folder: str | Path,
    d_in: int,
    d_sae: int,
    layer: int,
    architecture: Architecture | str = "standard",
    seed: int = 0,
    with_stats: bool = True,
    threshold: float | None = None,
    enc_scale: float = 1.0,
    k: int = 8,
) -> SAE:
    """Build, save (SAELens layout) and return a random SAE.

    ``threshold``: one JumpReLU threshold for every feature (default: random in
    [0, 0.2)). ``k``: active features of a TopK SAE. ``with_stats`` also writes a
    statistics file whose ``max_activation`` is random in [1, 5), so ``strength``
    works.
    """
    folder = Path(folder)
    g = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.clone() * enc_scale
    b_enc = torch.rand(d_sae, generator=g) * 0.5
    b_dec = torch.randn(d_in, generator=g) * 0.01
    thr = None
    if architecture == "jumprelu":
        thr = torch.rand(d_sae, generator=g) * 0.2
        if threshold is not None:
            thr = torch.full((d_sae,), threshold)
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=architecture,  # type: ignore[arg-type]
        hook_layer=layer,
        k=k if architecture == "topk" else None,
        model_name="test",
    )
    sae = SAE(cfg, W_enc, b_enc, W_dec, b_dec, thr)
    sae.save(folder)
    if with_stats:
        max_act = torch.rand(d_sae, generator=g) * 4.0 + 1.0
        write_stats(folder, {"max_activation": max_act}, {})
    return sae
