"""ReasonScore: our one-pass statistics against a direct, slow, literal implementation of
the authors' algorithm (AIRI-Institute/SAE-Reasoning ``extraction/compute_score.py``,
written out again here from ``reasonscore.md``; no code shared with the implementation).

The reference does what the authors do: it re-runs the model for every chunk of 48
features, encodes with the decoder-norm-folded SAE restricted to that chunk, builds the
masks with explicit Python loops (match, mark every token of the match, expand each marked
position to [p - 1, p + 2] clipped to the sequence, drop ignored tokens) and keeps running
means with the authors' Welford update. It differs only in accumulating in float64
(the authors use float32), so a 1e-6 comparison tests the algorithm and not rounding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import EDGE_TEXTS, trace_records, write_jsonl
from helpers.models import TINY_LAYER, make_tiny_model
from helpers.saes import make_sae

from sae_steer_vllm.sae import SAE, load_max_activation
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.masks import build_patterns, group_hits, sequence_masks, widen
from sae_training.features.reasonscore import reason_score
from sae_training.features.stats_accumulator import FeatureStatsAccumulator, StatsConfig
from sae_training.features.stats_pass import run_feature_stats
from sae_training.features.vocabulary import load_vocabulary
from sae_training.tokens import CorpusSpec, ignore_mask, iter_windows, special_token_ids

FEATURE_CHUNK = 48  # the authors' batch of features per model run


# ====================================================================== the reference
def ref_single_mask(ids: list[int], pattern: list[int], expand: tuple[int, int]) -> list[bool]:
    """One string's mask with expansion, position by position."""
    T, L = len(ids), len(pattern)
    marked = [False] * T
    for p in range(T - L + 1):
        if ids[p : p + L] == pattern:
            for q in range(p, p + L):
                marked[q] = True
    left, right = expand
    out = [False] * T
    for p in range(T):
        if marked[p]:
            for q in range(max(0, p - left), min(T - 1, p + right) + 1):
                out[q] = True
    return out


class RefRollingMean:
    """The authors' RollingMean for one chunk of features: Welford means per concept
    (here: per group = union of its strings' masks), over M+ and over M-."""

    def __init__(
        self, concepts: list[list[list[int]]], ignore_ids: set[int], expand: tuple[int, int], n: int
    ) -> None:
        self.concepts, self.ignore_ids, self.expand = concepts, ignore_ids, expand
        self.means = [torch.zeros(n, dtype=torch.float64) for _ in concepts]
        self.counts = [0] * len(concepts)
        self.mean_pos, self.count_pos = torch.zeros(n, dtype=torch.float64), 0
        self.mean_neg, self.count_neg = torch.zeros(n, dtype=torch.float64), 0

    @staticmethod
    def _welford(
        acc_mean: torch.Tensor, acc_count: int, acts: torch.Tensor, mask: list[bool]
    ) -> tuple[torch.Tensor, int]:
        rows = [t for t, m in enumerate(mask) if m]
        if not rows:
            return acc_mean, acc_count
        sel = acts[rows]
        mean, count = sel.mean(dim=0), sel.shape[0]
        new_count = acc_count + count
        return acc_mean + (count / new_count) * (mean - acc_mean), new_count

    def update(self, ids: list[int], acts: torch.Tensor, burn_in: int = 0) -> None:
        """``burn_in``: the window's first positions are context only, like special tokens."""
        T = len(ids)
        ignored = [t in self.ignore_ids or p < burn_in for p, t in enumerate(ids)]
        combined = [False] * T
        for j, patterns in enumerate(self.concepts):
            m = [False] * T
            for pat in patterns:
                m = [a or b for a, b in zip(m, ref_single_mask(ids, pat, self.expand), strict=True)]
            m = [a and not ig for a, ig in zip(m, ignored, strict=True)]
            self.means[j], self.counts[j] = self._welford(self.means[j], self.counts[j], acts, m)
            combined = [a or b for a, b in zip(combined, m, strict=True)]
        pos = [c and not ig for c, ig in zip(combined, ignored, strict=True)]
        neg = [(not c) and not ig for c, ig in zip(combined, ignored, strict=True)]
        self.mean_pos, self.count_pos = self._welford(self.mean_pos, self.count_pos, acts, pos)
        self.mean_neg, self.count_neg = self._welford(self.mean_neg, self.count_neg, acts, neg)


def ref_fold(sae: SAE) -> SAE:
    """SAELens ``fold_W_dec_norm``: scale encoder (and threshold) up, decoder down."""
    norm = sae.W_dec.detach().norm(dim=1)
    thr = None if sae.threshold is None else sae.threshold * norm
    return SAE(
        sae.cfg,
        sae.W_enc.detach() * norm,
        sae.b_enc.detach() * norm,
        sae.W_dec.detach() / norm.unsqueeze(1),
        sae.b_dec.detach().clone(),
        thr,
    )


def ref_chunk_acts(sae: SAE, folded: SAE, h: torch.Tensor, feats: list[int]) -> torch.Tensor:
    """Folded activations of a chunk of features, encoding only those features (the
    authors' FeatureMaskingContext) for ReLU/JumpReLU. TopK needs every pre-activation to
    pick the winners, so it encodes all and selects, and folds after the activation rule
    (f_i * ||W_dec[i]||, the definition in reasonscore.md)."""
    if sae.cfg.architecture == "topk":
        norm = sae.W_dec.detach().norm(dim=1)
        return (sae.encode(h) * norm)[:, feats]
    pre = (h - folded.b_dec) @ folded.W_enc[:, feats] + folded.b_enc[feats]
    if sae.cfg.architecture == "jumprelu":
        assert folded.threshold is not None
        return torch.relu(pre) * (pre > folded.threshold[feats])
    return torch.relu(pre)


@torch.inference_mode()
def reference_run(
    model: Any,
    sae: SAE,
    windows: list[list[int]],
    concepts: list[list[list[int]]],
    ignore_ids: set[int],
    expand: tuple[int, int] = (1, 2),
    burn_in: int = 0,
) -> dict[str, torch.Tensor]:
    folded = ref_fold(sae)
    d = sae.cfg.d_sae
    layer = sae.cfg.hook_layer
    group_means, mu_pos, mu_neg = [], [], []
    max_raw = torch.zeros(d, dtype=torch.float64)
    fired = torch.zeros(d, dtype=torch.int64)
    norm = sae.W_dec.detach().norm(dim=1).double()
    for start in range(0, d, FEATURE_CHUNK):
        feats = list(range(start, min(d, start + FEATURE_CHUNK)))
        rm = RefRollingMean(concepts, ignore_ids, expand, len(feats))
        for ids in windows:  # the model runs again for every chunk of features
            out = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            h = out.hidden_states[layer + 1][0]
            acts = ref_chunk_acts(sae, folded, h, feats).double()
            rm.update(ids, acts, burn_in)
            keep = [t for t, tok in enumerate(ids) if tok not in ignore_ids and t >= burn_in]
            if not keep:  # every counted position is special
                continue
            raw = acts[keep] / norm[feats]
            max_raw[feats] = torch.maximum(max_raw[feats], raw.max(dim=0).values)
            fired[feats] += (raw > 0).sum(dim=0)
        group_means.append(torch.stack(rm.means, dim=1))
        mu_pos.append(rm.mean_pos)
        mu_neg.append(rm.mean_neg)
    m = torch.cat(group_means)
    mp, mn = torch.cat(mu_pos), torch.cat(mu_neg)
    return {
        "mean_group": m,
        "mean_pos": mp,
        "mean_neg": mn,
        "reasonscore": ref_score(m.tolist(), mp.tolist(), mn.tolist()),
        "max_activation": max_raw,
        "fire_count": fired,
    }


def ref_score(
    m: list[list[float]], mu_pos: list[float], mu_neg: list[float], alpha: float = 0.7
) -> torch.Tensor:
    """The score formula with plain floats."""
    eps = 1e-12
    R = len(m[0])
    s_pos, s_neg = sum(mu_pos), sum(mu_neg)
    out = []
    for i in range(len(m)):
        tot = sum(m[i])
        p = [x / (tot + eps) for x in m[i]]
        H = -sum(x * math.log(x) for x in p if x > 0)
        Hn = H / math.log(R) if R > 1 else 1.0
        out.append(mu_pos[i] / (s_pos + eps) * Hn**alpha - mu_neg[i] / (s_neg + eps))
    return torch.tensor(out, dtype=torch.float64)


# ====================================================================== fixtures
@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_model(tmp_path_factory.mktemp("tiny_model"))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    return model, tok, folder


def _assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, what: str, tol: float = 1e-6) -> None:
    ours, ref = ours.double(), ref.double()
    scale = max(float(ref.abs().max()), 1e-30)
    err = float((ours - ref).abs().max())
    assert err <= tol * scale, f"{what}: max |ours - ref| = {err:.3e} > {tol} x {scale:.3e}"


CASES = [
    ("standard", "text", 24),
    ("jumprelu", "trace", 40),
    ("topk", "text", 17),
]


@pytest.mark.parametrize("arch,kind,ctx", CASES)
def test_matches_authors_algorithm(
    tiny: tuple[Any, Any, Path], tmp_path: Path, arch: str, kind: str, ctx: int
) -> None:
    model, tok, _ = tiny
    dead = (3, 77, 150)
    sae = make_sae(arch, dead=dead)
    if kind == "text":
        corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in EDGE_TEXTS])
    else:
        corpus = write_jsonl(tmp_path / "c.jsonl", trace_records(3))
    spec = CorpusSpec(corpus, kind=kind, ctx=ctx)
    vocab = load_vocabulary()
    result = run_feature_stats(model, tok, sae, spec, vocab, batch_size=3, progress=False)
    st = result.stats

    windows = [w.ids for w in iter_windows(tok, spec)]
    # the edge cases are really present: cut windows, and words at both ends of a window
    assert any(len(w) == ctx for w in windows) and any(len(w) < ctx for w in windows)
    vp = build_patterns(tok, vocab)
    concepts = [[list(p) for p in pats] for pats in vp.patterns]
    ignore_ids = special_token_ids(tok)
    ref = reference_run(model, sae, windows, concepts, ignore_ids, burn_in=spec.counted_after)
    assert spec.counted_after > 0 and st.meta["burn_in"] == spec.counted_after
    shown = st["top_pos"][st["top_values"] > 0]
    assert bool((shown >= spec.counted_after).all())  # no top context at a window start

    for name in ("mean_group", "mean_pos", "mean_neg", "reasonscore"):
        _assert_close_rel(st[name], ref[name], f"{arch}/{kind} {name}")
    _assert_close_rel(st["max_activation"], ref["max_activation"], "max_activation")
    assert torch.equal(st["fire_count"], ref["fire_count"])

    # features that never fire: zero everywhere, score exactly 0
    for i in dead:
        assert float(st["max_activation"][i]) == 0.0
        assert float(st["reasonscore"][i]) == 0.0
        assert float(st["density"][i]) == 0.0
        assert st["top_seq"][i].eq(-1).all()
    # groups that never occur have zero count and zero means; the entropy still uses |R| = 10
    groups = st.groups
    assert len(groups) == 10
    counts = dict(zip(groups, st["count_group"].tolist(), strict=True))
    assert counts["perhaps"] == 0 and counts["however"] == 0
    assert st["mean_group"][:, groups.index("perhaps")].eq(0).all()
    # the ranking is the reference's ranking
    top_ours = st.ranking()[:10].tolist()
    top_ref = torch.argsort(ref["reasonscore"], descending=True)[:10].tolist()
    assert top_ours[:3] == top_ref[:3]


def test_edge_text_masks_positions(tiny: tuple[Any, Any, Path]) -> None:
    """Words split across tokens, matches at both sequence edges and overlapping windows,
    checked position by position on real tokenizations."""
    _, tok, _ = tiny
    vp = build_patterns(tok, load_vocabulary())
    enc = tok.convert_ids_to_tokens

    ids = tok("Wait, so 3 hmm", add_special_tokens=False)["input_ids"]
    toks = enc(ids)
    assert toks[0] == "Wait" and toks[-2:] == ["Ġh", "mm"]  # ' hmm' is two tokens
    sm = sequence_masks(torch.tensor(ids), vp, torch.zeros(len(ids), dtype=torch.bool))
    wait = sm.groups[vp.groups.index("wait")].tolist()
    assert wait == [True, True, True] + [False] * (len(ids) - 3)  # [0-1, 0+2] clipped left
    hmm = sm.groups[vp.groups.index("hmm")].tolist()
    T = len(ids)
    assert [i for i, v in enumerate(hmm) if v] == [T - 3, T - 2, T - 1]  # both tokens, clipped
    assert sm.pos.tolist() == [a or b for a, b in zip(wait, hmm, strict=True)]

    ids = tok("x alternatively y", add_special_tokens=False)["input_ids"]
    assert enc(ids)[1:3] == ["Ġaltern", "atively"] or "Ġalternatively" in enc(ids)
    ids = tok("alternatively", add_special_tokens=False)["input_ids"]
    assert len(ids) == 2
    sm = sequence_masks(torch.tensor(ids), vp, torch.zeros(2, dtype=torch.bool))
    assert sm.groups[vp.groups.index("alternatively")].tolist() == [True, True]

    # adjacent words: windows merge; special tokens are cut out of every mask
    ids = tok("<|im_start|>Maybe Wait Hmm", add_special_tokens=False)["input_ids"]
    ig = ignore_mask(torch.tensor(ids), special_token_ids(tok))
    assert ig.tolist()[0] is True
    sm = sequence_masks(torch.tensor(ids), vp, ig)
    assert sm.pos.tolist() == [False] + [True] * (len(ids) - 1)
    assert not (sm.pos & sm.neg).any() and bool((sm.pos | sm.neg | ig).all())


def test_masks_equal_literal_loops_on_random_sequences() -> None:
    """Many random sequences over a tiny alphabet (lots of overlapping matches), several
    windows: the vectorised masks equal the position-by-position reference."""
    from sae_training.features.masks import VocabPatterns

    g = torch.Generator().manual_seed(1)
    vp = VocabPatterns(
        groups=("a", "b", "c"),
        strings=(("a",), ("b", "B"), ("c",)),
        patterns=(((1,),), ((2, 3), (4,)), ((3, 3, 1),)),
    )
    for trial in range(200):
        T = int(torch.randint(1, 30, (1,), generator=g))
        ids = torch.randint(0, 6, (T,), generator=g)
        window = [(1, 2), (0, 0), (3, 0), (0, 4)][trial % 4]
        hits = widen(group_hits(ids, vp), window)
        for j, pats in enumerate(vp.patterns):
            ref = [False] * T
            for pat in pats:
                m = ref_single_mask(ids.tolist(), list(pat), window)
                ref = [a or b for a, b in zip(ref, m, strict=True)]
            assert hits[j].tolist() == ref, (ids.tolist(), window, j)


def test_reason_score_hand_computed() -> None:
    # feature 0 spreads evenly over 2 of 4 groups; feature 1 fires on one group only;
    # feature 2 never fires
    m = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mu_pos = torch.tensor([2.0, 6.0, 0.0])
    mu_neg = torch.tensor([1.0, 3.0, 0.0])
    parts = reason_score(m, mu_pos, mu_neg, alpha=0.7)
    eps = 1e-12
    p0 = 1 / (2 + eps)
    hn0 = -2 * p0 * math.log(p0) / math.log(4)  # ~ ln 2 / ln 4 = 0.5
    p1 = 3 / (3 + eps)  # eps keeps p just below 1: a vanishing but non-zero entropy
    hn1 = -p1 * math.log(p1) / math.log(4)
    expected = [2 / 8 * hn0**0.7 - 1 / 4, 6 / 8 * hn1**0.7 - 3 / 4, 0.0]
    assert hn0 == pytest.approx(0.5, abs=1e-9) and hn1 < 1e-12
    assert parts.entropy_norm.tolist() == pytest.approx([hn0, hn1, 0.0], abs=1e-15)
    assert parts.score.tolist() == pytest.approx(expected, abs=1e-12)
    one_group = reason_score(torch.tensor([[2.0], [0.0]]), torch.ones(2), torch.ones(2))
    assert one_group.entropy_norm.tolist() == [1.0, 1.0]  # |R| = 1: Hn = 1 by definition


def _feed(acc: FeatureStatsAccumulator, acts: torch.Tensor, seq0: int) -> None:
    S, T, _ = acts.shape
    ids = torch.arange(S * T).reshape(S, T) + 100
    acc.update(
        acts,
        ids,
        torch.zeros(S, acc.n_groups, T, dtype=torch.bool),
        torch.ones(S, T, dtype=torch.bool),
        torch.arange(seq0, seq0 + S),
    )


def test_quantiles_within_bin_bound_after_range_doubling() -> None:
    torch.manual_seed(0)
    cfg = StatsConfig(n_bins=64, n_examples=3, ctx_before=2, ctx_after=1)
    acc = FeatureStatsAccumulator(4, 1, cfg)
    chunks = []
    for scale in (0.01, 0.5, 3.0, 1000.0):  # max grows by x1..x2000: several doublings at once
        a = torch.rand(2, 50, 4) * scale
        a[a < 0.3 * scale] = 0.0  # sparse
        a[:, :, 3] = 0.0  # feature 3 never fires
        chunks.append(a)
    for n, a in enumerate(chunks):
        _feed(acc, a, seq0=2 * n)
    allv = torch.cat([c.reshape(-1, 4) for c in chunks])
    q = acc.quantiles()
    for f in range(3):
        nz = allv[:, f][allv[:, f] > 0].double()
        exact = torch.quantile(nz, torch.tensor(cfg.quantile_levels, dtype=torch.float64))
        bound = 2 * float(nz.max()) / cfg.n_bins
        assert (q[f].double() - exact).abs().max() <= bound + 1e-6
        assert int(acc.hist[f].sum()) == int((allv[:, f] > 0).sum()) == int(acc.fire[f])
        assert float(acc.max_raw[f]) == float(allv[:, f].max())
        assert float(acc.hist_max[f]) >= float(allv[:, f].max())
    assert q[3].eq(0).all() and acc.hist[3].sum() == 0


def test_top_examples_keep_one_per_sequence_with_context() -> None:
    cfg = StatsConfig(n_examples=2, ctx_before=2, ctx_after=1)
    acc = FeatureStatsAccumulator(2, 1, cfg)
    a = torch.zeros(3, 6, 2)
    a[0, 0, 0] = 5.0  # at the left edge: context clipped
    a[0, 1, 0] = 4.0  # same sequence, smaller: not a second example
    a[1, 5, 0] = 7.0  # right edge
    a[2, 3, 0] = 1.0
    _feed(acc, a, seq0=10)
    b = torch.zeros(1, 6, 2)
    b[0, 2, 0] = 6.0
    _feed(acc, b, seq0=13)
    assert acc.top_val[:, 0].tolist() == [7.0, 6.0]
    assert acc.top_seq[:, 0].tolist() == [11, 13]
    assert acc.top_pos[:, 0].tolist() == [5, 2]
    ids_seq11 = (torch.arange(6) + 106).tolist()
    assert acc.ctx_tok[0, 0].tolist() == [ids_seq11[3], ids_seq11[4], ids_seq11[5], -1]
    assert acc.ctx_act[0, 0].tolist() == [0.0, 0.0, 7.0, 0.0]
    assert acc.ctx_act[1, 0].tolist() == [0.0, 0.0, 6.0, 0.0]
    assert acc.top_seq[:, 1].tolist() == [-1, -1]  # feature 1 never fired: no examples


def test_accumulator_memory_does_not_grow_with_tokens() -> None:
    acc = FeatureStatsAccumulator(32, 3, StatsConfig(n_bins=16))

    def state_bytes() -> int:
        return sum(
            v.numel() * v.element_size() for v in vars(acc).values() if isinstance(v, torch.Tensor)
        )

    _feed(acc, torch.rand(2, 16, 32), 0)
    first = state_bytes()
    for n in range(20):
        _feed(acc, torch.rand(2, 16, 32) * (n + 1), 2 + 2 * n)
    assert state_bytes() == first


def test_stats_file_roundtrip_and_server_reader(
    tiny: tuple[Any, Any, Path], tmp_path: Path
) -> None:
    model, tok, _ = tiny
    sae = make_sae("standard", dead=(5,))
    sae_dir = sae.save(tmp_path / "sae")
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in EDGE_TEXTS[:3]])
    st = run_feature_stats(
        model, tok, sae, CorpusSpec(corpus, kind="text", ctx=32), load_vocabulary(), progress=False
    ).stats
    path = st.save(sae_dir)
    assert path.name == "feature_stats.safetensors"
    assert not list(sae_dir.glob("*.tmp"))
    back = FeatureStats.load(sae_dir)
    assert set(back.tensors) == set(st.tensors)
    for k, v in st.tensors.items():
        assert torch.equal(back[k], v), k
    assert back.meta["alpha"] == 0.7 and back.meta["window"] == [1, 2]
    assert back.meta["corpus"]["kind"] == "text"
    served = load_max_activation(sae_dir)
    assert served is not None and torch.equal(served, st["max_activation"])
    assert served.dtype == torch.float32 and served.shape == (sae.cfg.d_sae,)
    # raw SAE units: the folded max is the raw max times the decoder norm
    norm = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(st["max_activation_folded"], served * norm)
    assert sae.cfg.hook_layer == TINY_LAYER
