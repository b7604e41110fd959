"""The feature statistics of one SAE over a corpus, as one object, and its file.

The file (``feature_stats.safetensors`` beside the SAE) has one owner,
:mod:`sae_steer_vllm.sae.stats_file`, which the server reads ``max_activation`` from;
:class:`FeatureStats` is the feature-finding side's view of it: named per-feature tensors
(what :mod:`~sae_training.features.stats_accumulator` computes: means, ReasonScore and
its parts, density, quantiles, histograms, top examples) plus the run's metadata.

The metadata records ``sae_weights_sha256`` (:func:`sae_weights_digest`) so a statistics
file left over from an earlier SAE in the same folder is recognised
(:meth:`FeatureStats.check_weights`) instead of shown as current.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.files import sha256_file
from sae_steer_vllm.sae import SAEFormatError, read_config, read_stats, write_stats


def sae_weights_digest(sae_path: str | Path) -> str:
    """First 16 hex digits of the SAE weights file's sha256."""
    _, weights, _ = read_config(sae_path)
    return sha256_file(weights)[:16]


@dataclass
class FeatureStats:
    """The statistics file's content: named tensors plus JSON-able metadata."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    @property
    def groups(self) -> list[str]:
        return [str(g) for g in self.meta.get("groups", [])]

    @property
    def d_sae(self) -> int:
        return int(self.tensors["max_activation"].shape[0])

    def ranking(self) -> torch.Tensor:
        """Feature indices by descending ReasonScore."""
        return torch.argsort(self.tensors["reasonscore"], descending=True, stable=True)

    def check_weights(self, sae_dir: str | Path) -> None:
        """Refuse statistics computed for other weights than ``sae_dir`` holds now."""
        recorded = self.meta.get("sae_weights_sha256")
        if recorded and sae_weights_digest(sae_dir) != recorded:
            raise SAEFormatError(
                f"these statistics were computed for other weights than {sae_dir} holds "
                "now (re-run `sae-steer score`)"
            )

    def save(self, path: str | Path) -> Path:
        """Write atomically into an SAE folder (or to a file path); returns the file."""
        return write_stats(path, self.tensors, self.meta)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read an SAE folder's statistics (or a statistics file)."""
        tensors, meta = read_stats(path)
        return cls(tensors, meta)
