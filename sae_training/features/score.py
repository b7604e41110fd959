"""Feature finding for one SAE, as one library call: :func:`score_sae`.

``sae-steer score`` and the demo both call it. It loads the model and the SAE once and:

1. makes one streaming pass of the model over the reasoning traces
   (:mod:`~sae_training.features.stats_pass`) and writes the statistics file
   (default ``<sae>/feature_stats.safetensors``; the server reads ``max_activation``);
2. runs the token-dependence check on the top features
   (:mod:`~sae_training.features.token_dependence`);
3. writes the ranked table (:mod:`~sae_training.features.ranked_table`), with the
   explanations of an earlier ``sae-steer explain`` run when the output or SAE folder has them;
4. optionally writes the dashboards (:mod:`~sae_training.features.dashboard`).

``small=True`` settings (a few thousand tokens) make a whole run take about a minute on
the default model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import DASHBOARD_DIR, STATS_FILE, TRACE_CORPUS
from sae_steer_vllm.sae import SAE
from sae_training.corpus import data_file
from sae_training.features.dashboard import build_dashboard
from sae_training.features.explanations import read_explanations
from sae_training.features.feature_stats import FeatureStats, sae_weights_digest
from sae_training.features.masks import DEFAULT_WINDOW, build_patterns
from sae_training.features.ranked_table import write_ranked_table
from sae_training.features.reasonscore import DEFAULT_ALPHA, DEFAULT_EPS
from sae_training.features.stats_accumulator import StatsConfig
from sae_training.features.stats_pass import run_feature_stats
from sae_training.features.token_dependence import (
    TokenDependence,
    measure_token_dependence,
    reasoning_reference,
)
from sae_training.features.vocabulary import load_vocabulary
from sae_training.lm import ResidReader, load_model, model_or_default
from sae_training.tokens import CorpusSpec

DEFAULT_MAX_TOKENS = 200_000
DEFAULT_CTX = 1024
DEFAULT_TOKEN_TEXTS = 32
SMALL_MAX_TOKENS = 2_000
SMALL_CTX = 256
SMALL_TOKEN_TEXTS = 4


@dataclass(frozen=True)
class Loaded:
    """Model, tokenizer and SAE loaded once and shared by the steps of :func:`score_sae`."""

    model: Any
    tokenizer: Any
    sae: SAE
    model_dir: Path


def load_for_scoring(
    model_path: str | Path | None, sae_path: str | Path, device: str = "cpu"
) -> Loaded:
    """Model (float32: statistics are sums over many tokens), tokenizer and SAE on ``device``."""
    model_dir = model_or_default(model_path)
    sae = SAE.load(sae_path, device=device)
    model, tok = load_model(model_dir, device=device, dtype=torch.float32)
    return Loaded(model, tok, sae, model_dir)


def compute_feature_stats(
    model_path: str | Path | None,
    sae_path: str | Path,
    corpus_path: str | Path | None = None,
    *,
    kind: str = "trace",
    text_column: str = "text",
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    ctx: int = DEFAULT_CTX,
    batch_size: int = 1,
    vocab_path: str | Path | None = None,
    window: tuple[int, int] = DEFAULT_WINDOW,
    alpha: float = DEFAULT_ALPHA,
    eps: float = DEFAULT_EPS,
    out_path: str | Path | None = None,
    stats_config: StatsConfig | None = None,
    device: str = "cpu",
    progress: bool = True,
    loaded: Loaded | None = None,
    burn_in: int | None = None,
) -> Path:
    """One streaming pass; writes the statistics file (default ``<sae>/feature_stats.safetensors``)
    and returns its path. ``model_path=None`` means the default model; ``loaded`` reuses
    objects already in memory (then ``model_path`` is only recorded)."""
    ld = loaded or load_for_scoring(model_path, sae_path, device)
    spec = CorpusSpec(
        data_file(str(corpus_path or TRACE_CORPUS)),
        kind=kind,
        text_column=text_column,
        ctx=ctx,
        max_tokens=max_tokens,
        burn_in=burn_in,
    )
    result = run_feature_stats(
        ld.model,
        ld.tokenizer,
        ld.sae,
        spec,
        load_vocabulary(vocab_path),
        window=window,
        alpha=alpha,
        eps=eps,
        batch_size=batch_size,
        cfg=stats_config,
        progress=progress,
        metadata={
            "model": str(ld.model_dir),
            "sae": str(Path(sae_path)),
            "sae_weights_sha256": sae_weights_digest(sae_path),
        },
    )
    return result.stats.save(Path(out_path) if out_path else Path(sae_path) / STATS_FILE)


def token_dependence_for(
    stats: FeatureStats,
    model_path: str | Path | None,
    sae_path: str | Path,
    features: list[int],
    *,
    n_texts: int = DEFAULT_TOKEN_TEXTS,
    ctx: int = 256,
    device: str = "cpu",
    progress: bool = True,
    loaded: Loaded | None = None,
) -> dict[int, TokenDependence]:
    """Run the token-dependence check for ``features`` with the vocabulary the stats used."""
    ld = loaded or load_for_scoring(model_path or stats.meta.get("model"), sae_path, device)
    vocab = stats.meta.get("vocab") or load_vocabulary()
    window = tuple(stats.meta.get("window", DEFAULT_WINDOW))
    return measure_token_dependence(
        ResidReader(ld.model, ld.sae.cfg.hook_layer),
        ld.sae,
        ld.tokenizer,
        build_patterns(ld.tokenizer, vocab),
        features,
        *reasoning_reference(stats.tensors),
        n_texts=n_texts,
        ctx=ctx,
        window=(int(window[0]), int(window[1])),
        progress=progress,
    )


@dataclass(frozen=True)
class ScoreOutputs:
    stats: Path
    table_json: Path
    table_csv: Path
    dashboard: Path | None


def score_sae(
    sae_path: str | Path,
    model_path: str | Path | None = None,
    corpus_path: str | Path | None = None,
    *,
    small: bool = False,
    max_tokens: int | None = None,
    ctx: int | None = None,
    kind: str = "trace",
    text_column: str = "text",
    vocab_path: str | Path | None = None,
    top_k: int = 100,
    quantile: float | None = None,
    burn_in: int | None = None,
    token_check: int = 20,
    token_texts: int | None = None,
    dashboard_top: int = 0,
    out_dir: str | Path | None = None,
    batch_size: int = 1,
    device: str = "cpu",
    progress: bool = True,
    stats_path: str | Path | None = None,
    table_dir: str | Path | None = None,
    dashboard_dir: str | Path | None = None,
) -> ScoreOutputs:
    """The whole scoring step, model and SAE loaded once.

    Outputs go to ``out_dir`` (default: the SAE folder) unless placed one by one:
    ``stats_path`` (default ``<out>/feature_stats.safetensors``), ``table_dir`` (default
    ``<out>``) and ``dashboard_dir`` (default ``<out>/dashboard``; written only when
    ``dashboard_top > 0``). ``small=True``: 2k tokens, 256-token windows, 4 texts for the
    token check (about a minute on the default model on 2 CPU cores). The table holds the
    top ``top_k`` features, or with ``quantile`` those whose ReasonScore is above that
    quantile of all scores; ``burn_in`` None: :class:`sae_training.tokens.CorpusSpec`'s default.
    """
    out = Path(out_dir) if out_dir else Path(sae_path)
    loaded = load_for_scoring(model_path, sae_path, device)
    stats_file = compute_feature_stats(
        model_path,
        sae_path,
        corpus_path,
        kind=kind,
        text_column=text_column,
        max_tokens=max_tokens or (SMALL_MAX_TOKENS if small else DEFAULT_MAX_TOKENS),
        ctx=ctx or (SMALL_CTX if small else DEFAULT_CTX),
        batch_size=batch_size,
        vocab_path=vocab_path,
        out_path=Path(stats_path) if stats_path else out / STATS_FILE,
        device=device,
        progress=progress,
        loaded=loaded,
        burn_in=burn_in,
    )
    stats = FeatureStats.load(stats_file)
    dep: dict[int, TokenDependence] = {}
    if token_check > 0:
        dep = token_dependence_for(
            stats,
            model_path,
            sae_path,
            stats.ranking()[:token_check].tolist(),
            n_texts=token_texts or (SMALL_TOKEN_TEXTS if small else DEFAULT_TOKEN_TEXTS),
            device=device,
            progress=progress,
            loaded=loaded,
        )
    jpath, cpath = write_ranked_table(
        stats,
        Path(table_dir) if table_dir else out,
        top_k,
        dep,
        quantile=quantile,
        explanations=read_explanations(out) or read_explanations(sae_path),
    )
    dash = None
    if dashboard_top > 0:
        dash = build_dashboard(
            stats_file,
            Path(dashboard_dir) if dashboard_dir else out / DASHBOARD_DIR,
            top_k=dashboard_top,
            model_path=loaded.model_dir,
            sae_path=sae_path,
            table=jpath,
            tokenizer=loaded.tokenizer,
            progress=progress,
        )
    return ScoreOutputs(stats_file, jpath, cpath, dash)
