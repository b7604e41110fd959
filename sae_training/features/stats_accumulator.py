"""Per-feature statistics of an SAE, folded chunk by chunk into bounded accumulators.

Why one pass: the authors' code re-runs the model once per batch of 48 features; every
statistic ReasonScore needs is a token-weighted sum, so all features can be accumulated
from the same forward. Memory is bounded by the number of features (a few tensors of
``d_sae x small``), never by the number of tokens: each chunk of activations is folded
into the accumulators and dropped.

What is accumulated (ignored = special-token positions, excluded everywhere):

* sums of raw activations over each group mask M_j, over M+ and over M-  (float64), whose
  ratios to the mask sizes give m_ij, mu+ and mu-; folding the decoder norm is a
  per-feature factor, applied when the means are taken (``f_i * ||W_dec[i]||``);
* max raw activation (what the server multiplies ``strength`` by), firing count (density);
* a fixed-size histogram per feature of its non-zero activations, for quantiles and the
  dashboard. The range of feature i is ``[0, hist_max_i]``; when a larger value arrives the
  range doubles (as often as needed) and adjacent bins merge, so the bin width stays
  within ``2 * max_i / n_bins`` whatever the data. Chosen over a reservoir sample because it
  is deterministic, has a guaranteed error bound relative to the max, updates with one
  ``index_add`` per chunk and its memory is exactly ``d_sae x n_bins`` counts;
  from it the **quantile unit** ``quantile_unit`` (level ``unit_quantile``, default 0.99 of
  the non-zero activations): a robust alternative to the max for ``strength``. Error bound
  (:meth:`FeatureStatsAccumulator.quantiles`): with ``w = hist_max_i / n_bins <= 2 * max_i /
  n_bins`` and ``x_(k)`` the ``k = ceil(q N)``-th smallest of the ``N`` non-zero values, the
  estimate is within ``w`` of ``x_(k)``, hence within ``w + x_(k+1) - x_(k-1)`` of
  ``torch.quantile(x, q)`` (linear interpolation). 256 bins: ``w <= max / 128``;
* the top-n activating sequences per feature (one example per sequence) with a token
  window of context and the feature's activations on it, so dashboards need no re-run;
* for explanations scored on contexts the explainer never saw
  (:mod:`~sae_training.features.contexts`): a uniform sample of each feature's firing
  sequences with one context each, and a fixed sample of corpus windows shared by all
  features with each feature's max on each (:mod:`~sae_training.features.context_sample`
  documents the ``sample_*`` / ``random_*`` tensors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from sae_steer_vllm.sae.stats_file import (
    QUANTILE_UNIT,
    QUANTILE_UNIT_LEVEL,
    STATS_FORMAT_VERSION,
)
from sae_training.features.context_sample import ContextSampler, context_window
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.reasonscore import DEFAULT_ALPHA, DEFAULT_EPS, reason_score


@dataclass(frozen=True)
class StatsConfig:
    """Sizes of the bounded per-feature summaries."""

    n_bins: int = 256
    n_examples: int = 10
    ctx_before: int = 16
    ctx_after: int = 8
    quantile_levels: tuple[float, ...] = (0.5, 0.9, 0.99)
    chunk_tokens: int = 1024
    unit_quantile: float = 0.99
    """level of the quantile unit (``quantile_unit``): a request's ``strength`` with
    ``unit: "quantile"`` multiplies it. Why 0.99 and not 0.999: at the corpus sizes used
    (40k-200k tokens) a feature of density 0.1-1% fires 40-2000 times, so the 0.999 quantile
    is the maximum itself for most features; 0.99 ignores the top 1% of firings."""
    n_sample: int = 20
    """activating contexts kept per feature, sampled uniformly over its firing sequences
    (held-out contexts for scoring explanations). 20 = the 10 held-out contexts
    ``sae-steer explain`` scores on by default even when all 10 top sequences (shown to the
    explainer, hence excluded) fall in the sample. Memory and file: ``d x n x W x 8`` bytes"""
    n_random_windows: int = 128
    """corpus windows sampled once for all features, with each feature's max on each: a
    feature's non-activating contexts are those where it is 0. 128 leaves 10 for a feature
    active on up to ~90% of windows. Memory and file: ``d x n x 4`` bytes"""

    def __post_init__(self) -> None:
        if self.n_bins < 2 or self.n_bins & (self.n_bins - 1):
            raise ValueError(f"n_bins must be a power of two >= 2, got {self.n_bins}")
        if self.n_examples < 1 or self.ctx_before < 0 or self.ctx_after < 0:
            raise ValueError("n_examples must be >= 1 and context sizes >= 0")
        if self.n_sample < 1 or self.n_random_windows < 1:
            raise ValueError("n_sample and n_random_windows must be >= 1")
        if not all(0.0 < q < 1.0 for q in (*self.quantile_levels, self.unit_quantile)):
            raise ValueError(
                f"quantile levels must be in (0, 1): {self.quantile_levels}, {self.unit_quantile}"
            )

    @property
    def ctx_width(self) -> int:
        return self.ctx_before + 1 + self.ctx_after


class FeatureStatsAccumulator:
    """Folds chunks of SAE activations into bounded per-feature summaries.

    ``update`` takes whole sequences of one length: activations ``[S, T, d_sae]`` (raw SAE
    units), token ids ``[S, T]``, group masks ``[S, G, T]`` (already widened and with
    ignored positions removed), ``valid`` ``[S, T]`` (not ignored) and ``seq_ids`` ``[S]``.
    """

    def __init__(self, d_sae: int, n_groups: int, cfg: StatsConfig | None = None) -> None:
        self.cfg = cfg or StatsConfig()
        self.d_sae, self.n_groups = d_sae, n_groups
        n, W = self.cfg.n_examples, self.cfg.ctx_width
        self.sums = torch.zeros(n_groups + 2, d_sae, dtype=torch.float64)  # groups, M+, M-
        self.counts = torch.zeros(n_groups + 2, dtype=torch.int64)
        self.n_valid = 0
        self.fire = torch.zeros(d_sae, dtype=torch.int64)
        self.max_raw = torch.zeros(d_sae, dtype=torch.float32)
        self.hist = torch.zeros(d_sae, self.cfg.n_bins, dtype=torch.int64)
        self.hist_max = torch.zeros(d_sae, dtype=torch.float32)  # 0 = feature not seen firing yet
        self.top_val = torch.full((n, d_sae), -1.0)
        self.top_seq = torch.full((n, d_sae), -1, dtype=torch.int64)
        self.top_pos = torch.full((n, d_sae), -1, dtype=torch.int64)
        self.ctx_tok = torch.full((n, d_sae, W), -1, dtype=torch.int32)
        self.ctx_act = torch.zeros(n, d_sae, W)
        self._offsets = torch.arange(-self.cfg.ctx_before, self.cfg.ctx_after + 1)
        self.contexts = ContextSampler(
            d_sae,
            self.cfg.n_sample,
            self.cfg.n_random_windows,
            self.cfg.ctx_before,
            self.cfg.ctx_after,
        )

    # ------------------------------------------------------------------ update
    @torch.inference_mode()
    def update(
        self,
        acts: torch.Tensor,
        ids: torch.Tensor,
        group_masks: torch.Tensor,
        valid: torch.Tensor,
        seq_ids: torch.Tensor,
    ) -> None:
        S, T, d = acts.shape
        if d != self.d_sae or group_masks.shape != (S, self.n_groups, T):
            raise ValueError(
                f"shapes: acts {tuple(acts.shape)}, masks {tuple(group_masks.shape)}; "
                f"expected d_sae={self.d_sae}, groups={self.n_groups}"
            )
        acts = acts.float() * valid.unsqueeze(-1)  # ignored positions count nowhere
        flat = acts.reshape(S * T, d)
        pos = group_masks.any(dim=1)
        neg = valid & ~pos
        masks = torch.cat(
            [
                group_masks.permute(1, 0, 2).reshape(self.n_groups, S * T),
                pos.reshape(1, -1),
                neg.reshape(1, -1),
            ]
        )
        self.sums += masks.double() @ flat.double()
        self.counts += masks.sum(dim=1)
        self.n_valid += int(valid.sum())
        self.fire += (flat > 0).sum(dim=0)
        chunk_max = flat.max(dim=0).values
        self.max_raw = torch.maximum(self.max_raw, chunk_max)
        rows, cols = (flat > 0).nonzero(as_tuple=True)  # SAE codes are >= 0: the non-zero
        self._update_hist(flat, chunk_max, (rows, cols))
        seq_max, seq_arg = acts.max(dim=1)  # [S, d]: one example per sequence and feature
        self.contexts.update(acts, ids, valid, seq_ids, seq_max, (rows, cols))
        self._update_top(acts, ids, seq_ids, seq_max, seq_arg)

    def _update_hist(
        self, flat: torch.Tensor, chunk_max: torch.Tensor, firing: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        nb = self.cfg.n_bins
        fresh = (self.hist_max == 0) & (chunk_max > 0)
        self.hist_max[fresh] = chunk_max[fresh]
        grow = chunk_max > self.hist_max
        if grow.any():
            idx = grow.nonzero().squeeze(1)
            k = torch.ceil(torch.log2(chunk_max[idx].double() / self.hist_max[idx].double()))
            k = k.long().clamp(min=1)
            # float rounding of log2 can leave the max just outside: one more doubling fixes it
            k += (self.hist_max[idx].double() * 2.0**k < chunk_max[idx].double()).long()
            for kv in k.unique().tolist():
                feats = idx[k == kv]
                shift = min(int(kv), int(math.log2(nb)))
                dest = (torch.arange(nb) >> shift).expand(len(feats), nb)
                merged = torch.zeros(len(feats), nb, dtype=torch.int64)
                merged.scatter_add_(1, dest, self.hist[feats])
                self.hist[feats] = merged
                self.hist_max[feats] = (self.hist_max[feats].double() * 2.0**kv).float()
        rows, cols = firing
        if rows.numel() == 0:
            return
        vals = flat[rows, cols]
        b = (vals / self.hist_max[cols] * nb).long().clamp(0, nb - 1)
        self.hist.view(-1).index_add_(0, cols * nb + b, torch.ones_like(b))

    def _update_top(
        self,
        acts: torch.Tensor,
        ids: torch.Tensor,
        seq_ids: torch.Tensor,
        seq_max: torch.Tensor,
        seq_arg: torch.Tensor,
    ) -> None:
        S, T, d = acts.shape
        n = self.cfg.n_examples
        seq_max = torch.where(seq_max > 0, seq_max, torch.full_like(seq_max, -1.0))
        all_val = torch.cat([self.top_val, seq_max])
        top_val, src = all_val.topk(n, dim=0)  # all_val has n + S >= n rows
        from_old = src < n
        old_src = src.clamp(max=n - 1)
        new_src = (src - n).clamp(min=0)
        seq_cand = seq_ids.view(S, 1).expand(S, d)
        self.top_seq = torch.where(
            from_old, self.top_seq.gather(0, old_src), seq_cand.gather(0, new_src)
        )
        self.top_pos = torch.where(
            from_old, self.top_pos.gather(0, old_src), seq_arg.gather(0, new_src)
        )
        W = self.cfg.ctx_width
        self.ctx_tok = self.ctx_tok.gather(0, old_src.unsqueeze(-1).expand(n, d, W)).clone()
        self.ctx_act = self.ctx_act.gather(0, old_src.unsqueeze(-1).expand(n, d, W)).clone()
        fresh = (~from_old) & (top_val > 0)
        slot, feat = fresh.nonzero(as_tuple=True)
        if slot.numel():
            s_idx = new_src[slot, feat]
            p_idx = seq_arg[s_idx, feat]
            tok, act = context_window(acts, ids, s_idx, p_idx, feat, self._offsets)
            self.ctx_tok[slot, feat] = tok
            self.ctx_act[slot, feat] = act
        empty = top_val <= 0
        self.ctx_tok[empty] = -1
        self.ctx_act[empty] = 0.0
        self.top_seq[empty] = -1
        self.top_pos[empty] = -1
        self.top_val = top_val

    # ------------------------------------------------------------------ results
    def quantiles(self, levels_: tuple[float, ...] | None = None) -> torch.Tensor:
        """``[d_sae, Q]`` quantiles of each feature's non-zero activations (0 if it never fired);
        ``levels_`` default: ``cfg.quantile_levels``.

        Linear interpolation inside the bin holding the ``ceil(q N)``-th smallest value
        ``x_(k)``: the estimate is within one bin width ``w = hist_max / n_bins`` (``<= 2 *
        max / n_bins``) of ``x_(k)``, so within ``w + x_(k+1) - x_(k-1)`` of
        ``torch.quantile`` (whose linear interpolation lies between those neighbours)."""
        nb = self.cfg.n_bins
        lv = self.cfg.quantile_levels if levels_ is None else levels_
        levels = torch.tensor(lv, dtype=torch.float64)
        cum = self.hist.cumsum(dim=1).double()  # [d, nb]
        total = cum[:, -1:]
        target = levels.unsqueeze(0) * total  # [d, Q]
        b = torch.searchsorted(cum.contiguous(), target.contiguous()).clamp(max=nb - 1)
        below = torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), torch.zeros_like(target))
        in_bin = self.hist.double().gather(1, b)
        frac = torch.where(in_bin > 0, (target - below) / in_bin.clamp(min=1), 0.0)
        width = self.hist_max.double().unsqueeze(1) / nb
        q = (b.double() + frac.clamp(0, 1)) * width
        q = torch.minimum(q, self.max_raw.double().unsqueeze(1))
        return torch.where(total > 0, q, 0.0).float()

    def finalize(
        self,
        decoder_norm: torch.Tensor,
        groups: tuple[str, ...],
        *,
        alpha: float = DEFAULT_ALPHA,
        eps: float = DEFAULT_EPS,
        metadata: dict[str, Any] | None = None,
    ) -> FeatureStats:
        """Means (folded), ReasonScore and everything else as a :class:`FeatureStats`."""
        if len(groups) != self.n_groups:
            raise ValueError(f"{len(groups)} group names for {self.n_groups} groups")
        norm = decoder_norm.double().reshape(-1)
        means_raw = self.sums / self.counts.clamp(min=1).double().unsqueeze(1)  # [G+2, d]
        means = means_raw * norm.unsqueeze(0)  # folded: f_i * ||W_dec[i]||
        G = self.n_groups
        mean_group, mu_pos, mu_neg = means[:G].T.contiguous(), means[G], means[G + 1]
        parts = reason_score(mean_group, mu_pos, mu_neg, alpha=alpha, eps=eps)
        t: dict[str, torch.Tensor] = {
            "max_activation": self.max_raw.clone(),
            "max_activation_folded": (self.max_raw.double() * norm).float(),
            "decoder_norm": norm.float(),
            "mean_group": mean_group,
            "mean_pos": mu_pos.clone(),
            "mean_neg": mu_neg.clone(),
            "mean_all": (self.sums[G] + self.sums[G + 1]) / max(self.n_valid, 1) * norm,
            "count_group": self.counts[:G].clone(),
            "count_pos": self.counts[G : G + 1].clone(),
            "count_neg": self.counts[G + 1 : G + 2].clone(),
            "n_tokens": torch.tensor([self.n_valid], dtype=torch.int64),
            "fire_count": self.fire.clone(),
            "density": self.fire.double() / max(self.n_valid, 1),
            "quantile_levels": torch.tensor(self.cfg.quantile_levels, dtype=torch.float64),
            "quantiles": self.quantiles(),
            QUANTILE_UNIT: self.quantiles((self.cfg.unit_quantile,))[:, 0].contiguous(),
            "hist_counts": self.hist.to(torch.int32),
            "hist_max": self.hist_max.clone(),
            "top_values": self.top_val.T.contiguous(),
            "top_seq": self.top_seq.T.contiguous(),
            "top_pos": self.top_pos.T.contiguous(),
            "top_ctx_tokens": self.ctx_tok.permute(1, 0, 2).contiguous(),
            "top_ctx_acts": self.ctx_act.permute(1, 0, 2).contiguous(),
            "reasonscore": parts.score,
            "pos_term": parts.pos_term,
            "neg_term": parts.neg_term,
            "entropy_norm": parts.entropy_norm,
            "group_share": parts.group_share,
            **self.contexts.tensors(),
        }
        meta = dict(metadata or {})
        meta.update(
            {
                "format_version": STATS_FORMAT_VERSION,
                "groups": list(groups),
                "alpha": alpha,
                "eps": eps,
                "n_tokens": self.n_valid,
                "ctx_before": self.cfg.ctx_before,
                "ctx_after": self.cfg.ctx_after,
                "n_bins": self.cfg.n_bins,
                "n_sample": self.cfg.n_sample,
                "n_random_windows": self.cfg.n_random_windows,
                QUANTILE_UNIT_LEVEL: self.cfg.unit_quantile,
                "quantile_error_bound": "|q - x_(ceil(qN))| <= hist_max / n_bins "
                "(<= 2 max / n_bins), x = the feature's sorted non-zero activations",
                "activation_units": "max_activation, quantiles, hist, top_*: raw SAE units; "
                "mean_*: folded (f_i * ||W_dec[i]||)",
                "quantiles_of": "non-zero activations on non-special tokens",
            }
        )
        return FeatureStats(t, meta)
