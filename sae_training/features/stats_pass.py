"""The one streaming pass: corpus -> windows -> resid_post -> SAE codes -> accumulators.

Why one pass: the authors' code re-runs the model once per batch of 48 features; every
statistic ReasonScore needs is a token-weighted sum, so all features are accumulated
from the same forward (:mod:`sae_training.features.stats_accumulator`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from sae_steer_vllm.sae import SAE
from sae_training.errors import CorpusError
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.masks import (
    DEFAULT_WINDOW,
    VocabPatterns,
    build_patterns,
    sequence_masks,
)
from sae_training.features.reasonscore import DEFAULT_ALPHA, DEFAULT_EPS
from sae_training.features.stats_accumulator import FeatureStatsAccumulator, StatsConfig
from sae_training.lm import ResidReader
from sae_training.tokens import (
    CorpusSpec,
    StreamReport,
    counted_mask,
    iter_batches,
    iter_windows,
    special_token_ids,
)


@dataclass
class PassResult:
    stats: FeatureStats
    report: StreamReport
    seconds: float


def accumulate_corpus(
    reader: ResidReader,
    sae: SAE,
    tokenizer: Any,
    spec: CorpusSpec,
    patterns: VocabPatterns,
    *,
    window: tuple[int, int] = DEFAULT_WINDOW,
    batch_size: int = 1,
    cfg: StatsConfig | None = None,
    progress: bool = True,
) -> tuple[FeatureStatsAccumulator, StreamReport]:
    """The streaming pass: model forward to resid_post, SAE encode, fold into accumulators.

    ``reader`` reads resid_post at the SAE's layer (a single-layer :class:`ResidReader`).
    """
    from tqdm import tqdm

    cfg = cfg or StatsConfig()
    acc = FeatureStatsAccumulator(sae.cfg.d_sae, patterns.n_groups, cfg)
    ignored = special_token_ids(tokenizer)
    report = StreamReport()
    bar = tqdm(
        total=spec.max_tokens, desc="feature stats", unit="tok", disable=not progress, smoothing=0.1
    )
    for batch in iter_batches(iter_windows(tokenizer, spec, report), batch_size, spec.ctx):
        ids = torch.tensor([w.ids for w in batch], dtype=torch.long)
        resid = reader.read_one(ids)
        S, T = ids.shape
        per_chunk = max(1, cfg.chunk_tokens // T)
        for s0 in range(0, S, per_chunk):
            sub = ids[s0 : s0 + per_chunk]
            masks = []
            valid = []
            for row, w in zip(sub, batch[s0 : s0 + per_chunk], strict=True):
                # burn-in and special positions are left out of every statistic alike;
                # vocabulary matches still see them (a word may straddle the boundary)
                keep = counted_mask(row, w.counted_from, ignored)
                m = sequence_masks(row, patterns, ~keep, window)
                masks.append(m.groups)
                valid.append(keep)
            with torch.inference_mode():
                acts = sae.encode(resid[s0 : s0 + per_chunk].reshape(-1, resid.shape[-1]))
            acc.update(
                acts.reshape(sub.shape[0], T, -1),
                sub,
                torch.stack(masks),
                torch.stack(valid),
                torch.tensor([w.seq_id for w in batch[s0 : s0 + per_chunk]]),
            )
        bar.update(int(ids.numel()))
    bar.close()
    return acc, report


def run_feature_stats(
    model: Any,
    tokenizer: Any,
    sae: SAE,
    spec: CorpusSpec,
    vocab: dict[str, list[str]],
    *,
    window: tuple[int, int] = DEFAULT_WINDOW,
    alpha: float = DEFAULT_ALPHA,
    eps: float = DEFAULT_EPS,
    batch_size: int = 1,
    cfg: StatsConfig | None = None,
    progress: bool = True,
    metadata: dict[str, Any] | None = None,
) -> PassResult:
    """Everything in memory: one pass, then means, ReasonScore and summaries."""
    patterns = build_patterns(tokenizer, vocab)
    reader = ResidReader(model, sae.cfg.hook_layer)
    t0 = time.perf_counter()
    acc, report = accumulate_corpus(
        reader,
        sae,
        tokenizer,
        spec,
        patterns,
        window=window,
        batch_size=batch_size,
        cfg=cfg,
        progress=progress,
    )
    seconds = time.perf_counter() - t0
    if report.n_tokens == 0:
        raise CorpusError(f"{spec.path}: no usable {spec.kind} records (nothing to score)")
    meta = dict(metadata or {})
    meta.update(
        {
            "corpus": spec.to_metadata(),
            "window": list(window),
            "vocab": {g: list(s) for g, s in zip(patterns.groups, patterns.strings, strict=True)},
            "n_docs": report.n_docs,
            "n_windows": report.n_windows,
            "n_tokens_all": report.n_tokens,
            "burn_in": spec.counted_after,
            "counted_positions": f"window positions >= burn_in ({spec.counted_after}: every counted "
            "token has that many tokens of its document before it), special tokens excluded",
            "n_skipped_records": len(report.skipped),
            "seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    )
    with torch.inference_mode():
        norm = sae.W_dec.detach().norm(dim=1)
    stats = acc.finalize(norm, patterns.groups, alpha=alpha, eps=eps, metadata=meta)
    return PassResult(stats, report, seconds)
