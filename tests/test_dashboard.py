"""Dashboards: built from a real scoring run on a tiny model, rendered in headless Chromium.

Chromium (Debian package ``chromium``) is installed by the CI set-up; the rendering test
is skipped, saying so, only when the binary is absent.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
from helpers.chromium import chromium_or_skip, dump_dom, orange_pixels, screenshot_pixels
from helpers.corpora import trace_records, write_jsonl
from helpers.models import make_tiny_model
from helpers.saes import make_sae

from sae_steer_vllm.sae import SAEFormatError
from sae_training import FeatureStats, build_dashboard, write_ranked_table
from sae_training.features.dashboard_html import _fmt
from sae_training.features.explanations import (
    ExplanationScore,
    ExplanationsFile,
    FeatureExplanation,
    read_explanations,
    write_explanations,
)
from sae_training.features.logit_lens import load_unembedding, logit_lens
from sae_training.features.ranked_table import EXPLANATION_COLUMNS, load_ranked_table, ranked_rows
from sae_training.features.token_dependence import TokenDependence

TOP_K = 4


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, FeatureStats]:
    from sae_training import compute_feature_stats

    root = tmp_path_factory.mktemp("dash")
    model_dir = make_tiny_model(root / "model")
    sae_dir = make_sae("jumprelu", dead=(0,)).save(root / "sae")
    corpus = write_jsonl(root / "traces.jsonl", trace_records(6))
    stats_path = compute_feature_stats(
        model_dir, sae_dir, corpus, max_tokens=2000, ctx=96, progress=False
    )
    stats = FeatureStats.load(stats_path)
    top = stats.ranking()[:TOP_K].tolist()
    dep = {top[0]: TokenDependence(top[0], 0.9, 0.1, 1.0, 0.9, 0.889, 40)}
    write_ranked_table(stats, sae_dir, top_k=10, token_dep=dep)
    index = build_dashboard(stats_path, root / "dash", top_k=TOP_K)
    return index, model_dir, stats


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(html_text: str) -> list[tuple[str, dict[str, str | None]]]:
    p = _Collect()
    p.feed(html_text)
    return p.tags


def test_pages_contain_every_part(built: tuple[Path, Path, FeatureStats]) -> None:
    index, _, stats = built
    html_text = index.read_text()
    top = stats.ranking()[:TOP_K].tolist()
    rows = [a for t, a in _tags(html_text) if t == "tr" and a.get("class") == "feature-row"]
    assert [int(str(a["data-feature"])) for a in rows] == top  # sorted by score
    assert "0.90" in html_text  # token-dependence ratio from the table
    # self-contained: no scripts, no external resources
    assert "<script" not in html_text and not re.search(r"(src|href)=\"(https?:)?//", html_text)
    for rank, f in enumerate(top, 1):
        page = (index.parent / f"feature_{f}.html").read_text()
        tags = _tags(page)
        assert any(t == "svg" and a.get("class") == "histogram" for t, a in tags)
        assert sum(1 for t, a in tags if t == "rect" and a.get("class") == "bar") > 0
        lens = [
            a.get("data-kind") for t, a in tags if t == "table" and a.get("class") == "logit-lens"
        ]
        assert lens == ["top", "bottom"]
        n_ctx = sum(1 for t, a in tags if t == "div" and a.get("class") == "context")
        assert n_ctx == int((stats["top_values"][f] > 0).sum()) > 0
        assert any(t == "span" and a.get("class") == "tok peak" for t, a in tags)
        # left context before every peak, and the burn-in tokens (run, never counted) marked:
        # shown token j sits at window position top_pos + j - 16, burn-in if that is < 16
        burn = int(stats.meta["burn_in"])
        pos = stats["top_pos"][f][stats["top_values"][f] > 0]
        assert burn == 16 and bool((pos >= burn).all())  # no counted peak lacks left context
        assert sum(1 for t, a in tags if t == "span" and a.get("class") == "left") == n_ctx
        n_burn = sum(1 for t, a in tags if t == "span" and a.get("class") == "tok burnin")
        assert n_burn == sum(max(0, burn - int(p) + 16) for p in pos.tolist())
        assert f'data-stat="ReasonScore">{_fmt(float(stats["reasonscore"][f]))}<' in page
        assert f'data-stat="rank">{rank}<' in page
        assert f'data-stat="density">{float(stats["density"][f]):.5f}<' in page
        assert "normalised entropy" in page and "μ− share" in page
        assert "<script" not in page and "http://" not in page and "https://" not in page


def test_logit_lens_applies_final_norm(built: tuple[Path, Path, FeatureStats]) -> None:
    _, model_dir, _ = built
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    W_U, g = load_unembedding(model_dir)
    assert g is not None
    torch.testing.assert_close(W_U, model.get_output_embeddings().weight.detach())
    direction = torch.randn(W_U.shape[1])
    top, bottom = logit_lens(direction, W_U, g, n=5)
    # equal to the model's own head applied to the norm-weighted direction
    with torch.no_grad():
        logits = model.lm_head(direction * model.model.norm.weight)
    assert [i for i, _ in top] == logits.topk(5).indices.tolist()
    assert [i for i, _ in bottom] == (-logits).topk(5).indices.tolist()


def test_renders_in_headless_chromium(
    built: tuple[Path, Path, FeatureStats], tmp_path: Path
) -> None:
    chromium = chromium_or_skip()
    index, _, stats = built
    f0 = int(stats.ranking()[0])
    profile = tmp_path / "profile"
    page = index.parent / f"feature_{f0}.html"
    dom = dump_dom(chromium, page, profile)
    assert f'data-feature="{f0}"' in dom
    assert dom.count('class="context"') == int((stats["top_values"][f0] > 0).sum())
    assert 'class="histogram"' in dom and dom.count('class="logit-lens"') == 2
    index_dom = dump_dom(chromium, index, profile)
    assert index_dom.count('class="feature-row"') == TOP_K

    px = screenshot_pixels(chromium, page, profile)  # [N, 3]
    assert float(px.std()) > 10.0, "screenshot is blank"
    # the orange token highlighting and the blue histogram bars are really drawn
    blue = ((px[:, 2] > 150) & (px[:, 0] < 110) & (px[:, 1] > 90) & (px[:, 1] < 150)).sum()
    assert orange_pixels(px) > 50 and int(blue) > 50


def test_ranked_rows_match_stats(built: tuple[Path, Path, FeatureStats]) -> None:
    _, _, stats = built
    rows = ranked_rows(stats, 3)
    for r in rows:
        f = r["feature"]
        assert r["reasonscore"] == float(stats["reasonscore"][f])
        assert r["max_activation"] == float(stats["max_activation"][f])
        assert r["injection_ratio"] is None
    assert rows[0]["q50"] <= rows[0]["q90"] <= rows[0]["q99"] <= rows[0]["max_activation"] + 1e-6


def test_stale_statistics_are_refused(
    built: tuple[Path, Path, FeatureStats], tmp_path: Path
) -> None:
    """Statistics left over from an earlier SAE in the same folder are not shown as current."""
    index, model_dir, stats = built
    sae_dir = Path(str(stats.meta["sae"]))
    assert stats.meta["sae_weights_sha256"]
    other = tmp_path / "other_sae"
    make_sae("jumprelu", seed=5).save(other)
    stats.save(other)
    with pytest.raises(SAEFormatError, match="other weights"):
        build_dashboard(other, tmp_path / "d", top_k=2, model_path=model_dir, sae_path=other)
    assert sae_dir.is_dir() and index.is_file()


def _explanations(top: list[int]) -> ExplanationsFile:
    """Feature top[0] explained and scored both ways, top[1] explained but not scored."""
    det = ExplanationScore(
        balanced_accuracy=0.8125, ci_low=0.625, ci_high=0.9375, n_positive=8, n_negative=8
    )
    fuzz = ExplanationScore(
        balanced_accuracy=0.5, ci_low=0.25, ci_high=0.75, n_positive=4, n_negative=4, n_unclear=1
    )
    return ExplanationsFile(
        meta={"explainer": "scripted"},
        features=[
            FeatureExplanation(
                feature=top[0], explanation="<b>Wait</b> at a restart", detection=det, fuzzing=fuzz
            ),
            FeatureExplanation(feature=top[1], explanation="numbers"),
        ],
    )


def test_explanations_in_the_ranked_table(
    built: tuple[Path, Path, FeatureStats], tmp_path: Path
) -> None:
    _, _, stats = built
    top = stats.ranking()[:3].tolist()
    data = _explanations(top)
    plain = ranked_rows(stats, 3)
    assert not set(EXPLANATION_COLUMNS) & set(plain[0])  # no file: the table is unchanged
    rows = ranked_rows(stats, 3, explanations=data)
    assert list(rows[0])[: len(plain[0])] == list(plain[0])  # the new columns come last,
    assert list(rows[0])[len(plain[0]) - 1] == "likely_token_detector"  # beside the flag
    assert [r["explanation"] for r in rows] == ["<b>Wait</b> at a restart", "numbers", None]
    assert (rows[0]["detection"], rows[0]["detection_ci_low"], rows[0]["detection_ci_high"]) == (
        0.8125,
        0.625,
        0.9375,
    )
    assert rows[0]["fuzzing"] == 0.5 and rows[1]["detection"] is None and rows[2]["fuzzing"] is None
    jpath, cpath = write_ranked_table(stats, tmp_path, top_k=3, explanations=data)
    doc = load_ranked_table(jpath)
    assert doc["meta"]["explanations"] == {"explainer": "scripted"}
    assert doc["features"][0]["fuzzing_ci_high"] == 0.75
    header, first = cpath.read_text().splitlines()[:2]
    assert header.endswith(",".join(EXPLANATION_COLUMNS))
    assert first.endswith("<b>Wait</b> at a restart,0.8125,0.625,0.9375,0.5,0.25,0.75")
    jpath, cpath = write_ranked_table(stats, tmp_path, top_k=3)
    assert "explanations" not in load_ranked_table(jpath)["meta"]
    assert "detection" not in cpath.read_text()


def test_explanations_on_the_dashboard(
    built: tuple[Path, Path, FeatureStats], tmp_path: Path
) -> None:
    index, model_dir, stats = built
    top = stats.ranking()[:TOP_K].tolist()
    for f in top:  # without an explanations file the pages show none
        assert 'class="card explanation"' not in (index.parent / f"feature_{f}.html").read_text()
    assert "detection" not in index.read_text()
    sae_dir = Path(str(stats.meta["sae"]))
    written = write_explanations(sae_dir, _explanations(top))
    try:  # found in the SAE folder by default
        out = build_dashboard(sae_dir, tmp_path / "d", top_k=TOP_K, model_path=model_dir)
    finally:
        written.unlink()
    assert read_explanations(sae_dir) is None
    page = (out.parent / f"feature_{top[0]}.html").read_text()
    assert 'class="card explanation"' in page
    assert "&lt;b&gt;Wait&lt;/b&gt; at a restart" in page and "<b>Wait</b>" not in page
    assert 'data-score="detection">0.812 [0.625, 0.938]<' in page
    assert 'data-score="fuzzing">0.500 [0.250, 0.750]<' in page and "1 unclear" in page
    # the token-dependence verdict beside the scores (top[0] was flagged by the fixture)
    assert re.search(r'data-score="token-dependence">.*likely token detector.*0\.900', page)
    page1 = (out.parent / f"feature_{top[1]}.html").read_text()
    assert 'data-score="detection">not scored<' in page1
    assert 'data-score="token-dependence"><span class="muted">not checked' in page1
    assert "Not explained" in (out.parent / f"feature_{top[2]}.html").read_text()
    html_text = out.read_text()
    assert '<td data-score="detection">0.81 [0.62, 0.94]</td>' in html_text
    assert html_text.count("not explained") == TOP_K - 2
    # an explicit file works the same, and a missing one is an error, not a silent omission
    explicit = write_explanations(tmp_path / "e.json", _explanations(top))
    out2 = build_dashboard(
        sae_dir, tmp_path / "d2", top_k=2, model_path=model_dir, explanations=explicit
    )
    assert 'class="card explanation"' in (out2.parent / f"feature_{top[0]}.html").read_text()
    with pytest.raises(SAEFormatError, match="no explanations file"):
        build_dashboard(sae_dir, tmp_path / "d3", top_k=1, explanations=tmp_path / "none.json")
    from sae_training.features import dashboard_cli

    argv = ["--sae", str(sae_dir), "--explanations", str(tmp_path / "none.json")]
    assert dashboard_cli.main(argv) == 2  # a usage error, before any work
