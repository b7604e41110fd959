"""Trainable SAE architectures, one module per concept, looked up by name."""

from __future__ import annotations

from typing import Any

from sae_training.architectures.base import ForwardOutput, TrainableSAE
from sae_training.architectures.batchtopk import BatchTopKSAE
from sae_training.architectures.matryoshka import MatryoshkaBatchTopKSAE
from sae_training.architectures.standard import StandardSAE
from sae_training.architectures.topk import TopKSAE

ARCHITECTURES: dict[str, type[TrainableSAE]] = {
    cls.name: cls for cls in (StandardSAE, TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE)
}


def build(name: str, d_in: int, d_sae: int, **hparams: Any) -> TrainableSAE:
    """Construct architecture ``name``; unknown hyperparameters are an error, not ignored."""
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown architecture {name!r} (choose from {sorted(ARCHITECTURES)})"
        ) from None
    return cls(d_in, d_sae, **hparams)


__all__ = [
    "ARCHITECTURES",
    "BatchTopKSAE",
    "ForwardOutput",
    "MatryoshkaBatchTopKSAE",
    "StandardSAE",
    "TopKSAE",
    "TrainableSAE",
    "build",
]
