"""SAE training and feature finding.

Two data paths, each reading top to bottom:

* text -> tokens -> residual -> activations -> SAE: :mod:`~sae_training.corpus`,
  :mod:`~sae_training.tokens`, :mod:`~sae_training.lm`, :mod:`~sae_training.collection`
  (into :mod:`~sae_training.activation_cache`), :mod:`~sae_training.trainer`, run end to
  end by :func:`run_training` (:mod:`~sae_training.train_job`) from a recipe
  (:mod:`~sae_training.recipe`);
* SAE + corpus -> statistics -> ReasonScore -> ranked table -> dashboards:
  :mod:`sae_training.features`, run end to end by :func:`score_sae`.

The names below are the public API (``from sae_training import score_sae``); they are
imported on first use, so ``import sae_training`` stays light. Everything else may move.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sae_training.activation_cache import (
        CacheMeta,
        CacheWriter,
        cache_matches,
        find_matching_cache,
        read_cache_meta,
    )
    from sae_training.activation_sources import ActivationSource, DiskCache, MemoryActivations
    from sae_training.collection import (
        CollectConfig,
        collect_to_disk,
        collect_to_memory,
        iter_activations,
    )
    from sae_training.corpus import BadLine, TextMix, data_file, read_jsonl
    from sae_training.errors import (
        ActivationError,
        CorpusError,
        FeatureStatsError,
        ModelLoadError,
        TrainingDiverged,
        TrainingError,
        VocabPatternError,
        VocabularyError,
    )
    from sae_training.features.dashboard import build_dashboard
    from sae_training.features.feature_stats import FeatureStats
    from sae_training.features.masks import build_patterns
    from sae_training.features.ranked_table import (
        load_ranked_table,
        ranked_rows,
        write_ranked_table,
    )
    from sae_training.features.score import (
        ScoreOutputs,
        compute_feature_stats,
        score_sae,
        token_dependence_for,
    )
    from sae_training.features.stats_accumulator import StatsConfig
    from sae_training.features.stats_pass import run_feature_stats
    from sae_training.features.token_dependence import TokenDependence
    from sae_training.features.vocabulary import load_vocabulary, surface_words
    from sae_training.lm import ResidReader, decoder_layers, load_model
    from sae_training.recipe import DEFAULT_RECIPE, Recipe, default_job, train_default_sae
    from sae_training.tokens import (
        CorpusSpec,
        iter_batches,
        iter_windows,
        pack_rows,
        special_token_ids,
    )
    from sae_training.train_job import TrainJob, run_training
    from sae_training.trainer import RunOptions, TrainConfig, Trainer, export_sae

_EXPORTS: dict[str, str] = {
    # text -> tokens -> residual
    "BadLine": "corpus",
    "TextMix": "corpus",
    "data_file": "corpus",
    "read_jsonl": "corpus",
    "CorpusSpec": "tokens",
    "iter_batches": "tokens",
    "iter_windows": "tokens",
    "pack_rows": "tokens",
    "special_token_ids": "tokens",
    "ResidReader": "lm",
    "decoder_layers": "lm",
    "load_model": "lm",
    # activations
    "CollectConfig": "collection",
    "collect_to_disk": "collection",
    "collect_to_memory": "collection",
    "iter_activations": "collection",
    "CacheMeta": "activation_cache",
    "CacheWriter": "activation_cache",
    "cache_matches": "activation_cache",
    "find_matching_cache": "activation_cache",
    "read_cache_meta": "activation_cache",
    "ActivationSource": "activation_sources",
    "DiskCache": "activation_sources",
    "MemoryActivations": "activation_sources",
    # training
    "RunOptions": "trainer",
    "TrainConfig": "trainer",
    "Trainer": "trainer",
    "export_sae": "trainer",
    "TrainJob": "train_job",
    "run_training": "train_job",
    "DEFAULT_RECIPE": "recipe",
    "Recipe": "recipe",
    "default_job": "recipe",
    "train_default_sae": "recipe",
    # feature finding
    "load_vocabulary": "features.vocabulary",
    "surface_words": "features.vocabulary",
    "build_patterns": "features.masks",
    "StatsConfig": "features.stats_accumulator",
    "run_feature_stats": "features.stats_pass",
    "FeatureStats": "features.feature_stats",
    "TokenDependence": "features.token_dependence",
    "ScoreOutputs": "features.score",
    "compute_feature_stats": "features.score",
    "score_sae": "features.score",
    "token_dependence_for": "features.score",
    "load_ranked_table": "features.ranked_table",
    "ranked_rows": "features.ranked_table",
    "write_ranked_table": "features.ranked_table",
    "build_dashboard": "features.dashboard",
    # errors
    "ActivationError": "errors",
    "CorpusError": "errors",
    "FeatureStatsError": "errors",
    "ModelLoadError": "errors",
    "TrainingDiverged": "errors",
    "TrainingError": "errors",
    "VocabPatternError": "errors",
    "VocabularyError": "errors",
}

__all__ = [
    "ActivationError",
    "ActivationSource",
    "BadLine",
    "CacheMeta",
    "CacheWriter",
    "CollectConfig",
    "CorpusError",
    "CorpusSpec",
    "DEFAULT_RECIPE",
    "DiskCache",
    "FeatureStats",
    "FeatureStatsError",
    "MemoryActivations",
    "ModelLoadError",
    "Recipe",
    "ResidReader",
    "RunOptions",
    "ScoreOutputs",
    "StatsConfig",
    "TextMix",
    "TokenDependence",
    "TrainConfig",
    "TrainJob",
    "Trainer",
    "TrainingDiverged",
    "TrainingError",
    "VocabPatternError",
    "VocabularyError",
    "build_dashboard",
    "build_patterns",
    "cache_matches",
    "collect_to_disk",
    "collect_to_memory",
    "compute_feature_stats",
    "data_file",
    "decoder_layers",
    "default_job",
    "export_sae",
    "find_matching_cache",
    "iter_activations",
    "iter_batches",
    "iter_windows",
    "load_model",
    "load_ranked_table",
    "load_vocabulary",
    "pack_rows",
    "ranked_rows",
    "read_cache_meta",
    "read_jsonl",
    "run_feature_stats",
    "run_training",
    "score_sae",
    "special_token_ids",
    "surface_words",
    "token_dependence_for",
    "train_default_sae",
    "write_ranked_table",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sae_training' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"sae_training.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
