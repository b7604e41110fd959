"""Held-out and non-activating contexts, sampled in the one statistics pass.

An explanation written from a feature's top-activating contexts must be scored on contexts
its writer never saw, and not only on the strongest firings; detection also needs contexts
where the feature is silent (:mod:`~sae_training.features.contexts` reads both back). Both
samples are folded in chunk by chunk beside the other statistics
(:class:`~sae_training.features.stats_accumulator.FeatureStatsAccumulator`), in memory
bounded by ``d_sae x small``, and both are **deterministic**: every choice is a hash
priority (:func:`hash_priority`, no random state), so the result depends neither on the
order of the chunks nor on how the corpus is batched.

* **Activating sample** (``sample_*``): every (sequence, feature) pair where the feature
  fires (a sequence is one scoring window; only counted positions fire) gets the priority
  ``hash(sequence id, feature)``, and each feature keeps the ``n_sample`` pairs of smallest
  priority: a bottom-k sample, i.e. a uniform sample without replacement of the feature's
  firing sequences. Removing the explainer's sequences from it and keeping the order leaves a
  uniform sample of the other firing sequences. In each sampled sequence the context is
  centred on the firing position of smallest ``hash(that priority, position)`` (a
  pseudo-random one of the feature's firing positions there, not its strongest), with the
  same window as the top examples.
* **Shared random windows** (``random_*``): each sequence is tiled into disjoint windows of
  ``ctx_width`` tokens from its start; a window all of whose tokens are counted (past the
  burn-in, not special) gets the priority ``hash(sequence id, window index)`` and the
  ``n_random_windows`` smallest are kept, with every feature's max activation on each. A
  feature's non-activating windows are those where its max is 0 (its activation on every
  token there is 0), so they need no per-token activations.

Tensors in the statistics file (``d`` features, ``n = n_sample``, ``M = n_random_windows``,
``W = ctx_before + 1 + ctx_after``), samples in priority order (the first is the best):

=====================  ==============  ===================================================
``sample_values``      ``[d, n]`` f32  raw activation at the sampled position (0 = empty)
``sample_seq``         ``[d, n]`` i64  sequence (scoring window) id, -1 = empty slot
``sample_pos``         ``[d, n]`` i64  position of the sampled firing token in it
``sample_ctx_tokens``  ``[d, n, W]``   token ids around it (-1 outside the sequence), i32
``sample_ctx_acts``    ``[d, n, W]``   the feature's raw activation on each (0 = silent or
                                       not counted), f32
``random_seq``         ``[M]`` i64     sequence id of each shared window, -1 = empty slot
``random_start``       ``[M]`` i64     position of its first token in the sequence
``random_ctx_tokens``  ``[M, W]`` i32  its token ids
``random_max``         ``[d, M]`` f32  each feature's max raw activation on it
=====================  ==============  ===================================================
"""

from __future__ import annotations

import torch

EMPTY = 1 << 40
"""Priority of an empty slot: above every 32-bit hash."""
NONE = EMPTY + 1
"""Priority of a non-candidate (the feature does not fire there, or the window is not
whole): above ``EMPTY``, so it never takes a free slot."""
_M32 = 0xFFFFFFFF
_SEQ_SALT = 0x9E3779B9
_POS_SALT = 0x7F4A7C15
_WINDOW_SALT = 0x85EBCA6B

SAMPLE_TENSORS = (
    "sample_values",
    "sample_seq",
    "sample_pos",
    "sample_ctx_tokens",
    "sample_ctx_acts",
)
RANDOM_TENSORS = ("random_seq", "random_start", "random_ctx_tokens", "random_max")
CONTEXT_TENSORS = SAMPLE_TENSORS + RANDOM_TENSORS
"""Every tensor this module adds to the statistics file."""


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mix (two multiply-xorshift rounds); int64 in, int64 out.

    Products stay below 2^59, so int64 never overflows."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def hash_priority(*keys: torch.Tensor, salt: int) -> torch.Tensor:
    """A deterministic pseudo-random 32-bit priority per combination of ``keys`` (int64
    tensors, broadcast together): each key is xored in and mixed, so for fixed leading keys
    distinct last keys give distinct priorities."""
    h = torch.tensor(salt & _M32, dtype=torch.int64)
    for k in keys:
        h = _mix32(h ^ (k.to(torch.int64) & _M32))
    return h


def context_window(
    acts: torch.Tensor,
    ids: torch.Tensor,
    s_idx: torch.Tensor,
    p_idx: torch.Tensor,
    feat: torch.Tensor,
    offsets: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids ``[E, W]`` (int32, -1 outside the sequence) and feature ``feat``'s
    activations on them around position ``p_idx`` of sequence ``s_idx`` (one row each)."""
    T = ids.shape[1]
    P = p_idx.unsqueeze(1) + offsets.unsqueeze(0)  # [E, W]
    inside = (P >= 0) & (P < T)
    Pc = P.clamp(0, T - 1)
    s2 = s_idx.unsqueeze(1).expand_as(Pc)
    tok = torch.where(inside, ids[s2, Pc].to(torch.int32), -1)
    act = torch.where(inside, acts[s2, Pc, feat.unsqueeze(1).expand_as(Pc)], 0.0)
    return tok, act


def _entering(
    old: torch.Tensor, cand: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge candidate priorities into a bottom-k sample without moving stored entries.

    ``old`` ``[k, ...]`` holds the sample's priorities (unordered, ``EMPTY`` = free slot),
    ``cand`` ``[c, ...]`` the candidates' (``NONE`` = not a candidate). The bottom-k of the
    union keeps all but the ``m`` largest old entries and takes ``m`` candidates, per column.
    Returns, paired one to one and sorted by column: the candidates that enter (row in
    ``cand``, column) and the slots they replace (row in ``old``)."""
    k = old.shape[0]
    _, src = torch.cat([old, cand]).topk(k, dim=0, largest=False)
    src = src.reshape(k, -1)
    fresh = src >= k
    col_new, j = fresh.T.nonzero(as_tuple=True)  # by column
    # old entries the merge kept; all writes are True, so repeated indices do not conflict
    # (entering candidates write into the spare row k)
    kept = torch.zeros(k + 1, src.shape[1], dtype=torch.bool)
    kept.scatter_(0, torch.where(fresh, k, src), True)
    col_old, slot = (~kept[:k]).T.nonzero(as_tuple=True)  # by column: the same counts
    return src[j, col_new] - k, col_new, slot


class ContextSampler:
    """The two samples of the module docstring, updated one chunk at a time."""

    def __init__(
        self, d_sae: int, n_sample: int, n_windows: int, ctx_before: int, ctx_after: int
    ) -> None:
        n, M, W = n_sample, n_windows, ctx_before + 1 + ctx_after
        self.d_sae, self.width = d_sae, W
        self.offsets = torch.arange(-ctx_before, ctx_after + 1)
        self.s_pri = torch.full((n, d_sae), EMPTY, dtype=torch.int64)
        self.s_seq = torch.full((n, d_sae), -1, dtype=torch.int64)
        self.s_pos = torch.full((n, d_sae), -1, dtype=torch.int64)
        self.s_val = torch.zeros(n, d_sae)
        self.s_tok = torch.full((n, d_sae, W), -1, dtype=torch.int32)
        self.s_act = torch.zeros(n, d_sae, W)
        self.r_pri = torch.full((M,), EMPTY, dtype=torch.int64)
        self.r_seq = torch.full((M,), -1, dtype=torch.int64)
        self.r_start = torch.full((M,), -1, dtype=torch.int64)
        self.r_tok = torch.full((M, W), -1, dtype=torch.int32)
        self.r_max = torch.zeros(M, d_sae)

    def state_tensors(self) -> list[torch.Tensor]:
        return [v for v in vars(self).values() if isinstance(v, torch.Tensor)]

    @torch.inference_mode()
    def update(
        self,
        acts: torch.Tensor,
        ids: torch.Tensor,
        valid: torch.Tensor,
        seq_ids: torch.Tensor,
        seq_max: torch.Tensor | None = None,
        firing: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """``acts`` ``[S, T, d]`` already zero at positions not counted; ``seq_max`` its max
        over positions and ``firing`` ``(acts.reshape(S * T, d) > 0).nonzero(as_tuple=True)``,
        when the caller has them."""
        S, T, d = acts.shape
        if seq_max is None:
            seq_max = acts.amax(dim=1)
        if firing is None:
            row, col = (acts.reshape(S * T, d) > 0).nonzero(as_tuple=True)
            firing = (row, col)
        self._update_sample(acts, ids, seq_ids, seq_max, firing)
        self._update_windows(acts, ids, valid, seq_ids)

    @staticmethod
    def _sample_positions(
        acts: torch.Tensor,
        pair_pri: torch.Tensor,
        firing: tuple[torch.Tensor, torch.Tensor],
        s_idx: torch.Tensor,
        feat: torch.Tensor,
    ) -> torch.Tensor:
        """For each pair (``s_idx``, ``feat``) the firing position of smallest
        ``hash(pair priority, position)``. Hashes only those pairs' firing tokens (from the
        sparse ``firing`` list of positive activations), not every position; the key
        ``hash * T + position`` is reduced by ``amin`` per pair."""
        S, T, d = acts.shape
        wanted = torch.zeros(S * d, dtype=torch.bool)
        wanted[s_idx * d + feat] = True
        row, f = firing
        pair = (row // T) * d + f
        keep = wanted[pair].nonzero().squeeze(1)
        pair, t = pair[keep], row[keep] % T
        key = _mix32((pair_pri.reshape(-1)[pair] ^ (t * _POS_SALT)) & _M32) * T + t
        best = torch.full((S * d,), EMPTY * T, dtype=torch.int64)
        best.scatter_reduce_(0, pair, key, reduce="amin")
        return best[s_idx * d + feat] % T

    def _update_sample(
        self,
        acts: torch.Tensor,
        ids: torch.Tensor,
        seq_ids: torch.Tensor,
        seq_max: torch.Tensor,
        firing: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        # stored entries stay in their slots (unordered) and only entering ones are written:
        # moving the [n, d, W] windows on every chunk would cost more than everything else
        S, T, d = acts.shape
        pri = hash_priority(seq_ids.view(S, 1), torch.arange(d).view(1, d), salt=_SEQ_SALT)
        pri = torch.where(seq_max > 0, pri, NONE)
        s_idx, feat, slot = _entering(self.s_pri, pri)
        if s_idx.numel() == 0:
            return
        p_idx = self._sample_positions(acts, pri, firing, s_idx, feat)
        tok, act = context_window(acts, ids, s_idx, p_idx, feat, self.offsets)
        self.s_pri[slot, feat] = pri[s_idx, feat]
        self.s_seq[slot, feat] = seq_ids[s_idx]
        self.s_pos[slot, feat] = p_idx
        self.s_val[slot, feat] = acts[s_idx, p_idx, feat]
        self.s_tok[slot, feat] = tok
        self.s_act[slot, feat] = act

    def _update_windows(
        self, acts: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor, seq_ids: torch.Tensor
    ) -> None:
        S, T, d = acts.shape
        W = self.width
        K = T // W
        if K == 0:
            return
        whole = valid[:, : K * W].reshape(S, K, W).all(dim=2)  # every token counted
        pri = hash_priority(seq_ids.view(S, 1), torch.arange(K).view(1, K), salt=_WINDOW_SALT)
        pri = torch.where(whole, pri, NONE).reshape(-1)
        cand, _, slot = _entering(self.r_pri, pri)
        if cand.numel() == 0:
            return
        s = cand // K
        start = (cand % K) * W
        P = start.unsqueeze(1) + torch.arange(W).unsqueeze(0)  # [F, W]
        s2 = s.unsqueeze(1).expand_as(P)
        self.r_pri[slot] = pri[cand]
        self.r_seq[slot] = seq_ids[s]
        self.r_start[slot] = start
        self.r_tok[slot] = ids[s2, P].to(torch.int32)
        self.r_max[slot] = acts[s2, P].amax(dim=1)  # [F, W, d] -> [F, d]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The file tensors of the module docstring: samples in priority order (empty slots
        last), per-feature tensors feature-first."""
        o = self.s_pri.argsort(dim=0, stable=True)  # [n, d]
        o3 = o.unsqueeze(-1).expand_as(self.s_tok)
        r = self.r_pri.argsort(stable=True)
        return {
            "sample_values": self.s_val.gather(0, o).T.contiguous(),
            "sample_seq": self.s_seq.gather(0, o).T.contiguous(),
            "sample_pos": self.s_pos.gather(0, o).T.contiguous(),
            "sample_ctx_tokens": self.s_tok.gather(0, o3).permute(1, 0, 2).contiguous(),
            "sample_ctx_acts": self.s_act.gather(0, o3).permute(1, 0, 2).contiguous(),
            "random_seq": self.r_seq[r].contiguous(),
            "random_start": self.r_start[r].contiguous(),
            "random_ctx_tokens": self.r_tok[r].contiguous(),
            "random_max": self.r_max[r].T.contiguous(),
        }
