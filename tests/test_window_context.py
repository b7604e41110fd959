"""Feature statistics count only tokens with left context, the quantile unit, and its use.

Issue 13 §1b: the first token of a scoring window has no left context (an attention sink
in real models) and used to win many features' maxima and top contexts, so
``max_activation``, the unit of every ``strength``, was an artefact of where windows start.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import write_jsonl

from sae_steer_vllm.sae import SAE, SAEConfig, load_units, random_sae, write_stats
from sae_steer_vllm.sae.stats_file import QUANTILE_UNIT
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError
from sae_steer_vllm.steering_plan import SAECatalog, plan_spec
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.masks import build_patterns
from sae_training.features.ranked_table import select_features, write_ranked_table
from sae_training.features.stats_accumulator import FeatureStatsAccumulator, StatsConfig
from sae_training.features.stats_pass import accumulate_corpus
from sae_training.tokens import CorpusSpec, iter_windows

SINK = 50.0  # what the fake model writes at every window's first position


class WordTokenizer:
    """One token per word, id = word length + 1; BOS (id 0) is special."""

    all_special_ids = [0]

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, Any]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [len(w) + 1 for w in text.split()]
        return ([0] if add_special_tokens else []) + ids


class SinkReader:
    """A stand-in model with the artefact made explicit: dim 0 is ``SINK`` at a window's
    first position only (no left context), dim 1 is the token id / 10 everywhere."""

    def read_one(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.zeros(*ids.shape, 4)
        h[:, 0, 0] = SINK
        h[..., 1] = ids.float() / 10
        return h


def _sink_sae() -> SAE:
    """Feature 0 reads the sink dimension, feature 1 the token dimension."""
    W_enc = torch.zeros(4, 2)
    W_enc[0, 0] = W_enc[1, 1] = 1.0
    cfg = SAEConfig(d_in=4, d_sae=2, architecture="standard", hook_layer=0)
    return SAE(cfg, W_enc, torch.zeros(2), W_enc.T.clone(), torch.zeros(4))


def _words(n: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join("x" * int(k) for k in torch.randint(1, 9, (n,), generator=g))


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    docs = [_words(n, i) + " wait" for i, n in enumerate((40, 25, 61, 7))]
    return write_jsonl(tmp_path / "c.jsonl", [{"text": d} for d in docs])


def _run(corpus: Path, burn_in: int) -> tuple[FeatureStatsAccumulator, CorpusSpec]:
    tok = WordTokenizer()
    spec = CorpusSpec(corpus, kind="text", ctx=16, burn_in=burn_in)
    patterns = build_patterns(tok, {"wait": ["wait"]})
    acc, _ = accumulate_corpus(
        SinkReader(),  # type: ignore[arg-type]
        _sink_sae(),
        tok,
        spec,
        patterns,
        batch_size=2,
        cfg=StatsConfig(n_examples=4, ctx_before=4, ctx_after=2),
        progress=False,
    )
    return acc, spec


def test_window_start_no_longer_wins_the_maximum(corpus: Path) -> None:
    """Without burn-in the sink feature's max and every top context sit at window starts;
    with it no counted position lacks left context, and the other feature's max is the max
    over exactly the counted positions."""
    old, _ = _run(corpus, burn_in=0)
    assert float(old.max_raw[0]) == SINK
    assert old.top_pos[:, 0].eq(0).all()  # the artefact: all top contexts at position 0

    acc, spec = _run(corpus, burn_in=3)
    assert float(acc.max_raw[0]) == 0.0 and int(acc.fire[0]) == 0
    shown = acc.top_pos[acc.top_val > 0]
    assert shown.numel() > 0 and bool((shown >= 3).all())
    # the counted positions, listed from the windows: past the burn-in and not special
    counted = [
        (w, p)
        for w in iter_windows(WordTokenizer(), spec)
        for p in range(w.counted_from, len(w.ids))
        if w.ids[p] != 0
    ]
    assert acc.n_valid == len(counted)
    # ReasonScore's masks count the same positions: M+ and M- partition them
    assert int(acc.counts[-2] + acc.counts[-1]) == len(counted) and int(acc.counts[-2]) > 0
    assert float(acc.max_raw[1]) == pytest.approx(max(w.ids[p] for w, p in counted) / 10)
    # each document token is counted once, and only from document position 3 on
    starts = sorted((w.doc_id, w.start + p) for w, p in counted)
    assert len(starts) == len(set(starts)) and min(s[1] for s in starts) >= 3


def test_quantile_unit_matches_torch_quantile_within_the_bound() -> None:
    """The quantile unit from the streaming histogram against torch.quantile on the very
    same non-zero activations: within w of x_(ceil(qN)), and within w + x_(k+1) - x_(k-1) of
    torch.quantile (w = hist_max / n_bins <= 2 max / n_bins), including after the range
    doubled several times."""
    cfg = StatsConfig(unit_quantile=0.99, n_bins=256)
    acc = FeatureStatsAccumulator(3, 1, cfg)
    g = torch.Generator().manual_seed(0)
    chunks = []
    for n in range(12):
        a = torch.relu(torch.randn(4, 64, 3, generator=g)) * (1.0 + n) ** 1.5
        a[..., 2] = torch.where(torch.rand(4, 64, generator=g) < 0.05, a[..., 2] + 3.0, 0.0)
        chunks.append(a)
        acc.update(
            a,
            torch.zeros(4, 64, dtype=torch.long),
            torch.zeros(4, 1, 64, dtype=torch.bool),
            torch.ones(4, 64, dtype=torch.bool),
            torch.arange(4 * n, 4 * n + 4),
        )
    st = acc.finalize(torch.ones(3), ("g",))
    unit = st[QUANTILE_UNIT]
    assert st.meta["quantile_unit_level"] == 0.99
    allv = torch.cat([c.reshape(-1, 3) for c in chunks]).double()
    q = 0.99
    for f in range(3):
        x = allv[:, f][allv[:, f] > 0].sort().values
        n = x.numel()
        assert n > 100
        w = float(acc.hist_max[f]) / cfg.n_bins
        assert w <= 2 * float(x[-1]) / cfg.n_bins
        k = math.ceil(q * n)  # 1-based rank
        est = float(unit[f])
        tiny = 1e-5 * float(x[-1])  # float32 binning at bin edges
        assert abs(est - float(x[k - 1])) <= w + tiny
        spread = float(x[min(k, n - 1)] - x[max(k - 2, 0)])
        assert abs(est - float(torch.quantile(x, q))) <= w + spread + tiny
        assert est <= float(x[-1])  # never above the max


def _stats_with_scores(scores: torch.Tensor) -> FeatureStats:
    d = scores.numel()
    t = {
        "max_activation": torch.linspace(1, 2, d),
        "max_activation_folded": torch.linspace(1, 2, d),
        QUANTILE_UNIT: torch.linspace(0.5, 1, d),
        "reasonscore": scores.double(),
        "pos_term": scores.double(),
        "entropy_norm": torch.ones(d, dtype=torch.float64),
        "neg_term": torch.zeros(d, dtype=torch.float64),
        "mean_pos": torch.zeros(d),
        "mean_neg": torch.zeros(d),
        "density": torch.zeros(d),
        "quantile_levels": torch.tensor([0.5], dtype=torch.float64),
        "quantiles": torch.zeros(d, 1),
        "group_share": torch.ones(d, 1, dtype=torch.float64),
    }
    return FeatureStats(t, {"groups": ["wait"], "burn_in": 16, "quantile_unit_level": 0.99})


def test_quantile_selection_is_the_papers_candidate_rule(tmp_path: Path) -> None:
    scores = torch.randn(2000, generator=torch.Generator().manual_seed(3))
    st = _stats_with_scores(scores)
    chosen = select_features(st, quantile=0.997)
    threshold = float(torch.quantile(scores.double(), 0.997))
    expected = sorted(
        (i for i in range(2000) if float(scores[i]) > threshold), key=lambda i: -float(scores[i])
    )
    assert chosen == expected and 5 <= len(chosen) <= 7  # 0.3% of 2000
    jpath, _ = write_ranked_table(st, tmp_path, top_k=100, quantile=0.997)
    doc = json.loads(jpath.read_text())
    assert [r["feature"] for r in doc["features"]] == expected
    assert "0.997 quantile" in doc["meta"]["selection"] and doc["meta"]["burn_in"] == 16
    assert doc["features"][0]["quantile_unit"] == pytest.approx(
        float(st[QUANTILE_UNIT][expected[0]])
    )
    assert select_features(st, top_k=10) == st.ranking()[:10].tolist()


def test_score_cli_quantile_option(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--quantile reaches score_sae; --top-k with it is a usage error (exit 2)."""
    from sae_steer_vllm.cli import main as cli_main
    from sae_training.features import score_cli

    sae_dir = tmp_path / "sae"
    random_sae(sae_dir, d_in=8, d_sae=16, layer=0)
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": "a b"}])
    base = ["score", "--sae", str(sae_dir), "--corpus", str(corpus), "--no-progress"]
    assert cli_main([*base, "--top-k", "5", "--quantile", "0.997"]) == 2
    assert cli_main([*base, "--ctx", "16", "--burn-in", "9"]) == 2
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_score_sae(*args: Any, **kw: Any) -> Any:
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(score_cli, "score_sae", fake_score_sae)
    with pytest.raises(Stop):
        score_cli._run(score_cli.ScoreCommand(sae=sae_dir, corpus=str(corpus), quantile=0.997))
    assert seen["quantile"] == 0.997 and seen["burn_in"] is None


def test_request_unit_quantile_round_trips_and_is_applied(tmp_path: Path) -> None:
    spec = SteeringSpec.from_obj(
        {"interventions": [{"sae": "s", "feature": 5, "strength": 2.0, "unit": "quantile"}]}
    )
    back = SteeringSpec.from_json(spec.to_json())
    assert back == spec and back.interventions[0].unit == "quantile"  # type: ignore[union-attr]
    default = SteeringSpec.from_obj({"interventions": [{"sae": "s", "feature": 5, "strength": 2}]})
    assert default.interventions[0].unit == "max"  # type: ignore[union-attr]
    explicit = {"sae": "s", "feature": 5, "strength": 2, "unit": "max"}
    assert SteeringSpec.from_obj({"interventions": [explicit]}).cache_salt() == default.cache_salt()
    assert spec.cache_salt() != default.cache_salt()
    assert "unit" not in default.to_json() and '"unit":"quantile"' in spec.to_json()
    with pytest.raises(SteeringSpecError, match="unit"):
        SteeringSpec.from_obj(
            {"interventions": [{"sae": "s", "feature": 5, "strength": 1, "unit": "p99"}]}
        )
    with pytest.raises(SteeringSpecError, match="'unit' scales 'strength'"):
        SteeringSpec.from_obj(
            {"interventions": [{"sae": "s", "feature": 5, "value": 1, "unit": "quantile"}]}
        )

    from sae_steer_vllm.plugin_config import PluginConfig

    new, old = tmp_path / "new", tmp_path / "old"
    random_sae(new, d_in=16, d_sae=32, layer=1)
    units = load_units(new)
    qunit = units["max"] * 0.4
    write_stats(new, {"max_activation": units["max"], QUANTILE_UNIT: qunit}, {})
    random_sae(old, d_in=16, d_sae=32, layer=2, seed=1)  # format 1: max only
    assert set(load_units(old)) == {"max"}
    cat = SAECatalog.load(
        PluginConfig(saes={"s": str(new), "o": str(old)}), num_layers=3, d_model=16
    )
    plan = plan_spec(spec, cat)
    assert plan.layers[1].entries[0].target == pytest.approx(2.0 * float(qunit[5]))
    plan = plan_spec(default, cat)
    assert plan.layers[1].entries[0].target == pytest.approx(2.0 * float(units["max"][5]))
    old_spec = SteeringSpec.from_obj(
        {"interventions": [{"sae": "o", "feature": 1, "strength": 1, "unit": "quantile"}]}
    )
    with pytest.raises(SteeringSpecError, match="no 'quantile' unit"):
        plan_spec(old_spec, cat)
