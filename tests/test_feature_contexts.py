"""Held-out and non-activating contexts from the one statistics pass (issue 16).

Hand-built activations whose firing sequences are known (token ids encode their sequence
and position, so every context can be traced back), then one real pass over a tiny model
whose recorded contexts are checked against a direct SAE encode of the same tokens.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import EDGE_TEXTS, write_jsonl
from helpers.models import make_tiny_model
from helpers.saes import make_sae

from sae_training.errors import FeatureStatsError
from sae_training.features.context_sample import CONTEXT_TENSORS, hash_priority
from sae_training.features.contexts import Context, feature_contexts, has_held_out_contexts
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.stats_accumulator import FeatureStatsAccumulator, StatsConfig
from sae_training.features.stats_pass import run_feature_stats
from sae_training.features.vocabulary import load_vocabulary
from sae_training.lm import ResidReader
from sae_training.tokens import CorpusSpec, counted_mask, iter_windows, special_token_ids

T = 40  # tokens per hand-built sequence
BASE = 1000  # token id of (seq, pos) = BASE + seq * T + pos: every token names its place
BURN = 4  # the first positions of each sequence are not counted


def _feed(acc: FeatureStatsAccumulator, acts: torch.Tensor, seqs: list[int]) -> None:
    ids = BASE + torch.tensor(seqs).view(-1, 1) * T + torch.arange(T).view(1, -1)
    valid = torch.ones(len(seqs), T, dtype=torch.bool)
    valid[:, :BURN] = False
    groups = torch.zeros(len(seqs), acc.n_groups, T, dtype=torch.bool)
    acc.update(acts, ids, groups, valid, torch.tensor(seqs))


def _place(tok: int) -> tuple[int, int]:
    return (tok - BASE) // T, (tok - BASE) % T


def _hand_built() -> tuple[torch.Tensor, FeatureStats, StatsConfig]:
    """30 sequences. Feature 0 fires in 12 known ones (two positions each, one in the
    burn-in where it must not count); feature 1 in two; feature 2 never; feature 3 everywhere
    but on positions 8-23 (the 4-token windows 2-5 of every sequence). Fed in three chunks."""
    cfg = StatsConfig(
        n_examples=3, ctx_before=2, ctx_after=1, n_sample=6, n_random_windows=8, n_bins=16
    )
    acts = torch.zeros(30, T, 4)
    for k, s in enumerate((1, 3, 4, 7, 9, 12, 15, 18, 21, 22, 26, 29)):
        acts[s, 5 + k, 0] = 1.0 + k  # distinct strengths: the top 3 are known
        acts[s, 30, 0] = 0.5
        acts[s, 1, 0] = 50.0  # burn-in: never counted, never shown as firing
    acts[10, 20, 1], acts[25, 8, 1] = 2.0, 3.0
    acts[:, BURN:, 3] = torch.rand(30, T - BURN, generator=torch.Generator().manual_seed(0))
    acts[:, 8:24, 3] = 0.0
    acc = FeatureStatsAccumulator(4, 1, cfg)
    for lo in (0, 10, 20):
        _feed(acc, acts[lo : lo + 10], list(range(lo, lo + 10)))
    stats = acc.finalize(torch.ones(4), ("g",))
    acts[:, :BURN] = 0.0  # what the statistics see
    return acts, stats, cfg


def _check_context(ctx: Context, acts: torch.Tensor, f: int) -> tuple[int, int]:
    """Every token is where its id says and carries the feature's true activation there;
    returns the (sequence, position) of the strongest token."""
    places = [_place(t) for t in ctx.token_ids]
    assert len({s for s, _ in places}) == 1  # one sequence, consecutive positions
    assert [p for _, p in places] == list(range(places[0][1], places[0][1] + len(places)))
    assert list(ctx.acts) == [float(acts[s, p, f]) for s, p in places]
    return places[max(range(len(places)), key=lambda j: ctx.acts[j])]


def test_explain_held_out_and_non_activating_on_known_firings() -> None:
    acts, stats, cfg = _hand_built()
    assert has_held_out_contexts(stats)
    fc = feature_contexts(stats, 0, n_explain=3, n_held_out=10, n_non_activating=10)
    # explain = the three strongest sequences, strongest first, -1 padding never shown
    assert [_check_context(c, acts, 0) for c in fc.explain] == [(29, 16), (26, 15), (22, 14)]
    shown = {29, 26, 22}
    firing = {1, 3, 4, 7, 9, 12, 15, 18, 21, 22, 26, 29}
    held = [_check_context(c, acts, 0) for c in fc.held_out]
    assert all(c.max_act > 0 for c in fc.held_out)
    held_seqs = [s for s, _ in held]
    assert not shown & set(held_seqs) and set(held_seqs) <= firing
    assert len(set(held_seqs)) == len(held_seqs)
    # exactly the bottom-k sample: the lowest-priority firing sequences, minus the shown ones
    pri = {s: int(hash_priority(torch.tensor(s), torch.tensor(0), salt=0x9E3779B9)) for s in firing}
    sample = sorted(firing, key=pri.__getitem__)[: cfg.n_sample]
    assert held_seqs == [s for s in sample if s not in shown]
    # the firing token at the centre of each held-out window carries the recorded activation
    for c, (s, p) in zip(fc.held_out, held, strict=True):
        assert c.acts[cfg.ctx_before] > 0 and float(acts[s, p, 0]) == c.max_act
    # non-activating: shared windows, whole, counted, where feature 0 is 0 on every token
    assert 0 < len(fc.non_activating) <= 8
    for c in fc.non_activating:
        places = [_place(t) for t in c.token_ids]
        assert len(places) == cfg.ctx_width and c.acts == (0.0,) * cfg.ctx_width
        assert all(float(acts[s, p, 0]) == 0.0 and p >= BURN for s, p in places)
        assert places[0][1] % cfg.ctx_width == 0  # the tiling of each sequence
    assert len({c.token_ids for c in fc.non_activating}) == len(fc.non_activating)


def test_rare_dense_and_dead_features_get_what_exists() -> None:
    acts, stats, _ = _hand_built()
    rare = feature_contexts(stats, 1, n_explain=5)
    assert [_check_context(c, acts, 1) for c in rare.explain] == [(25, 8), (10, 20)]
    assert rare.held_out == ()  # both firing sequences were shown: nothing is invented
    dead = feature_contexts(stats, 2)
    assert dead.explain == () and dead.held_out == ()
    assert len(dead.non_activating) == 8  # silent on every sampled window
    dense = feature_contexts(stats, 3, n_non_activating=10)
    silent = {
        tuple(stats["random_ctx_tokens"][m].tolist())
        for m in range(8)
        if 8 <= int(stats["random_start"][m]) < 24
    }
    assert silent and {c.token_ids for c in dense.non_activating} == silent
    assert all(c.max_act > 0 for c in dense.held_out) and len(dense.held_out) == 6 - sum(
        1 for s in stats["sample_seq"][3].tolist() if s in stats["top_seq"][3].tolist()
    )


def test_selection_is_deterministic_and_seeded() -> None:
    _, stats, _ = _hand_built()
    a = feature_contexts(stats, 2, n_non_activating=4, seed=0)
    assert a == feature_contexts(stats, 2, n_non_activating=4, seed=0)
    orders = {
        feature_contexts(stats, 2, n_non_activating=8, seed=s).non_activating for s in range(6)
    }
    assert len(orders) > 1  # the seed reorders the silent windows...
    assert len({frozenset(o) for o in orders}) == 1  # ...but never changes which are silent
    assert a.non_activating == feature_contexts(stats, 2, n_non_activating=8).non_activating[:4]


def test_sample_is_uniform_and_independent_of_chunking() -> None:
    """400 features, each firing in a random half of 24 sequences: the bottom-5 samples,
    fed in one chunk or one sequence at a time in reverse order, are identical, and each
    sequence is sampled as often as a uniform sample would (within 5 sd)."""
    g = torch.Generator().manual_seed(1)
    S, d, n = 24, 400, 5
    fires = torch.rand(S, d, generator=g) < 0.5
    acts = torch.rand(S, T, d, generator=g) * (torch.rand(S, T, d, generator=g) < 0.2)
    acts *= fires.unsqueeze(1)
    acts[:, BURN + 3] += fires * 0.1  # every firing sequence fires at a counted position
    cfg = StatsConfig(n_examples=2, ctx_before=3, ctx_after=2, n_sample=n, n_bins=16)
    one = FeatureStatsAccumulator(d, 1, cfg)
    _feed(one, acts, list(range(S)))
    many = FeatureStatsAccumulator(d, 1, cfg)
    for s in reversed(range(S)):
        _feed(many, acts[s : s + 1], [s])
    for name, x in one.contexts.tensors().items():
        assert torch.equal(x, many.contexts.tensors()[name]), name
    seq = one.contexts.s_seq  # [n, d]
    counted = acts.clone()
    counted[:, :BURN] = 0.0
    n_fire = fires.sum(dim=0)
    for f in range(d):
        got = [s for s in seq[:, f].tolist() if s >= 0]
        assert len(got) == min(n, int(n_fire[f])) and all(bool(fires[s, f]) for s in got)
        for j, s in enumerate(got):  # the sampled position fires, with the recorded value
            p = int(one.contexts.s_pos[j, f])
            assert float(one.contexts.s_val[j, f]) == float(counted[s, p, f]) > 0
    p_pick = torch.where(fires, n / n_fire.clamp(min=1), 0.0).double()  # [S, d]
    expected, sd = p_pick.sum(dim=1), (p_pick * (1 - p_pick)).sum(dim=1).sqrt()
    observed = torch.bincount(seq[seq >= 0], minlength=S).double()
    assert bool(((observed - expected).abs() <= 5 * sd).all()), (observed, expected)
    # and across features the picks are not one fixed order of sequences
    assert len({tuple(sorted(seq[:, f].tolist())) for f in range(d)}) > d // 2


def test_sampler_memory_does_not_grow_with_tokens() -> None:
    acc = FeatureStatsAccumulator(
        16, 1, StatsConfig(n_bins=16, n_sample=3, n_random_windows=4, ctx_before=2, ctx_after=1)
    )

    def state_bytes() -> int:
        return sum(v.numel() * v.element_size() for v in acc.contexts.state_tensors())

    _feed(acc, torch.rand(2, T, 16), [0, 1])
    first = state_bytes()
    for n in range(1, 15):
        _feed(acc, torch.rand(2, T, 16) * (n + 1), [2 * n, 2 * n + 1])
    assert state_bytes() == first and int((acc.contexts.r_seq >= 0).sum()) == 4


def test_old_files_and_bad_requests_are_refused() -> None:
    _, stats, _ = _hand_built()
    old = FeatureStats(
        {k: v for k, v in stats.tensors.items() if k not in CONTEXT_TENSORS}, stats.meta
    )
    assert not has_held_out_contexts(old)
    with pytest.raises(FeatureStatsError, match="re-run `sae-steer score`"):
        feature_contexts(old, 0)
    with pytest.raises(FeatureStatsError, match="out of range"):
        feature_contexts(stats, 4)
    with pytest.raises(FeatureStatsError, match=">= 0"):
        feature_contexts(stats, 0, n_held_out=-1)
    with pytest.raises(ValueError, match="n_sample"):
        StatsConfig(n_sample=0)


def test_stats_pass_contexts_equal_a_direct_encode(tmp_path: Path) -> None:
    """One real pass over a tiny model: every held-out context's tokens are the window's
    tokens and its activations the SAE's own encode there (0 where not counted); every
    shared window's per-feature max is the encode's max over its tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model(tmp_path / "model")
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    sae = make_sae("jumprelu", dead=(7,))
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in EDGE_TEXTS])
    spec = CorpusSpec(corpus, kind="text", ctx=32)
    cfg = StatsConfig(n_sample=4, n_random_windows=6, ctx_before=4, ctx_after=2)
    st = run_feature_stats(
        model, tok, sae, spec, load_vocabulary(), batch_size=2, cfg=cfg, progress=False
    ).stats
    reader, ignored = ResidReader(model, sae.cfg.hook_layer), special_token_ids(tok)
    enc: dict[int, tuple[list[int], torch.Tensor]] = {}
    for w in iter_windows(tok, spec):
        ids = torch.tensor([w.ids])
        with torch.no_grad():
            a = sae.encode(reader.read_one(ids)[0])
        enc[w.seq_id] = (w.ids, a * counted_mask(ids[0], w.counted_from, ignored).unsqueeze(1))
    checked = 0
    for f in range(sae.cfg.d_sae):
        for j in range(cfg.n_sample):
            s = int(st["sample_seq"][f, j])
            if s < 0:
                continue
            ids, a = enc[s]
            p = int(st["sample_pos"][f, j])
            P = [p + o for o in range(-cfg.ctx_before, cfg.ctx_after + 1)]
            want_tok = [ids[q] if 0 <= q < len(ids) else -1 for q in P]
            want_act = torch.tensor([float(a[q, f]) if 0 <= q < len(ids) else 0.0 for q in P])
            assert st["sample_ctx_tokens"][f, j].tolist() == want_tok
            torch.testing.assert_close(st["sample_ctx_acts"][f, j], want_act, atol=1e-5, rtol=0)
            assert float(a[p, f]) > 0
            checked += 1
    assert checked > 100 and st["sample_seq"][7].eq(-1).all()  # the dead feature: empty
    for m in range(cfg.n_random_windows):
        s, start = int(st["random_seq"][m]), int(st["random_start"][m])
        assert s >= 0
        ids, a = enc[s]
        assert st["random_ctx_tokens"][m].tolist() == ids[start : start + cfg.ctx_width]
        torch.testing.assert_close(
            st["random_max"][:, m], a[start : start + cfg.ctx_width].amax(dim=0), atol=1e-5, rtol=0
        )
    fc = feature_contexts(st, int(st.ranking()[0]))
    assert fc.explain and all(not math.isnan(x) for c in fc.held_out for x in c.acts)
