"""SAEs for the feature-finding tests: random, with non-unit decoder norms and dead features.

Serving tests use :func:`sae_steer_vllm.sae.random_sae` (unit decoder rows, features that
fire on real activations); these differ on purpose: ReasonScore folds decoder norms, so
they must not be 1, and the statistics must handle features that never fire.
"""

from __future__ import annotations

from typing import Any

import torch

from sae_steer_vllm.sae import SAE, SAEConfig

from .models import TINY_LAYER


def make_sae(
    architecture: str = "standard",
    d_in: int = 64,
    d_sae: int = 200,
    layer: int = TINY_LAYER,
    seed: int = 0,
    dead: tuple[int, ...] = (),
    k: int = 12,
) -> SAE:
    """Random SAE with non-unit decoder norms (so folding matters) and some dead features.

    Encoder columns are scaled so roughly a third of features fire on the tiny model's
    residual stream; ``dead`` features get a bias that no input can overcome.
    """
    g = torch.Generator().manual_seed(seed)
    # the tiny model's residual norms are ~0.25: scale so pre-activations have std ~0.3
    W_enc = torch.randn(d_in, d_sae, generator=g) * (10.0 / d_in**0.5)
    b_enc = torch.randn(d_sae, generator=g) * 0.05 - 0.2
    W_dec = torch.randn(d_sae, d_in, generator=g) * (torch.rand(d_sae, 1, generator=g) * 2 + 0.2)
    b_dec = torch.randn(d_in, generator=g) * 0.01
    threshold = None
    if architecture == "jumprelu":
        threshold = torch.rand(d_sae, generator=g) * 0.2
    for i in dead:
        b_enc[i] = -1e4
    topk: dict[str, Any] = {"k": k} if architecture == "topk" else {}
    arch: Any = architecture
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=arch, hook_layer=layer, **topk)
    return SAE(cfg, W_enc, b_enc, W_dec, b_dec, threshold)
