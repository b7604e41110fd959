"""SAE training and feature finding.

Two data paths, each reading top to bottom:

* text -> tokens -> residual -> activations -> SAE: :mod:`~sae_training.corpus`,
  :mod:`~sae_training.tokens`, :mod:`~sae_training.lm`, :mod:`~sae_training.collection`
  (into :mod:`~sae_training.activation_cache`), :mod:`~sae_training.trainer`, run end to
  end by :func:`run_training` (:mod:`~sae_training.train_job`) from a recipe
  (:mod:`~sae_training.recipe`);
* SAE + corpus -> statistics -> ReasonScore -> ranked table -> dashboards:
  :mod:`sae_training.features`, run end to end by :func:`score_sae`.

The names below are the public API (``from sae_training import score_sae``): the verbs
``collect_to_disk``, ``run_training`` / ``train_default_sae``, ``score_sae`` and
``build_dashboard``, with their configs and errors. They are imported on first use, so
``import sae_training`` stays light. Modules not exported here are internal and may move.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_steer_vllm.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_training.activation_cache import cache_matches, find_matching_cache
    from sae_training.activation_sources import DiskCache, MemoryActivations
    from sae_training.collection import CollectConfig, collect_to_disk, collect_to_memory
    from sae_training.corpus import BadLine, TextMix, data_file, read_jsonl
    from sae_training.errors import (
        ActivationError,
        CorpusError,
        FeatureStatsError,
        ModelLoadError,
        TrainingError,
    )
    from sae_training.features.dashboard import build_dashboard
    from sae_training.features.feature_stats import FeatureStats
    from sae_training.features.ranked_table import load_ranked_table, write_ranked_table
    from sae_training.features.score import compute_feature_stats, score_sae
    from sae_training.features.vocabulary import load_vocabulary
    from sae_training.lm import ResidReader, load_model
    from sae_training.recipe import DEFAULT_RECIPE, default_job, train_default_sae
    from sae_training.train_job import TrainJob, run_training
    from sae_training.trainer import RunOptions, TrainConfig, Trainer, export_sae

_EXPORTS: dict[str, str] = {
    # text -> tokens -> residual
    "BadLine": ".corpus",
    "TextMix": ".corpus",
    "data_file": ".corpus",
    "read_jsonl": ".corpus",
    "ResidReader": ".lm",
    "load_model": ".lm",
    # collect: residual -> activation cache
    "CollectConfig": ".collection",
    "collect_to_disk": ".collection",
    "collect_to_memory": ".collection",
    "cache_matches": ".activation_cache",
    "find_matching_cache": ".activation_cache",
    "DiskCache": ".activation_sources",
    "MemoryActivations": ".activation_sources",
    # train: activations -> SAE
    "TrainConfig": ".trainer",
    "RunOptions": ".trainer",
    "Trainer": ".trainer",
    "export_sae": ".trainer",
    "TrainJob": ".train_job",
    "run_training": ".train_job",
    "DEFAULT_RECIPE": ".recipe",
    "default_job": ".recipe",
    "train_default_sae": ".recipe",
    # score: SAE + corpus -> statistics -> ReasonScore -> table -> dashboards
    "score_sae": ".features.score",
    "compute_feature_stats": ".features.score",
    "FeatureStats": ".features.feature_stats",
    "load_ranked_table": ".features.ranked_table",
    "write_ranked_table": ".features.ranked_table",
    "build_dashboard": ".features.dashboard",
    "load_vocabulary": ".features.vocabulary",
    # errors (all are sae_steer_vllm.SaeSteerError)
    "ActivationError": ".errors",
    "CorpusError": ".errors",
    "FeatureStatsError": ".errors",
    "ModelLoadError": ".errors",
    "TrainingError": ".errors",
}

__all__ = [
    "ActivationError",
    "BadLine",
    "CollectConfig",
    "CorpusError",
    "DEFAULT_RECIPE",
    "DiskCache",
    "FeatureStats",
    "FeatureStatsError",
    "MemoryActivations",
    "ModelLoadError",
    "ResidReader",
    "RunOptions",
    "TextMix",
    "TrainConfig",
    "TrainJob",
    "Trainer",
    "TrainingError",
    "build_dashboard",
    "cache_matches",
    "collect_to_disk",
    "collect_to_memory",
    "compute_feature_stats",
    "data_file",
    "default_job",
    "export_sae",
    "find_matching_cache",
    "load_model",
    "load_ranked_table",
    "load_vocabulary",
    "read_jsonl",
    "run_training",
    "score_sae",
    "train_default_sae",
    "write_ranked_table",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
