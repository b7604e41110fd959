"""``sae-steer demo``: config files, the study's analysis and report, and the whole pipeline
on a tiny configuration against the shared steering server.

The end-to-end test trains a tiny SAE (4k tokens, 512 features), scores it, registers it
on the session's ``steer_server`` through ``POST /v1/saes`` (the server allows runtime
SAEs under its ``--sae-root``, where the test writes the demo), and runs the study through
that server (``--base-url``) steering the SAE it has just trained: no second vLLM server
is started.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from benchmarks.demo import (
    DemoConfig,
    PipelineError,
    ReportContext,
    analyse,
    choose_random_features,
    load_config,
    main,
    make_design,
    plot_study,
    write_study_report,
)
from benchmarks.runner import run_sweep
from benchmarks.sweep import BASELINE, load_specs_file

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()[:24]
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------------ config files
def test_demo_default_config_file_is_the_default() -> None:
    """configs/demo_default.json documents the defaults: it must not drift from the code."""
    assert load_config(CONFIGS / "demo_default.json", {}) == DemoConfig()


def test_demo_tiny_config_parses_and_cli_overrides_it() -> None:
    cfg = load_config(CONFIGS / "demo_tiny.json", {"n_prompts": 7, "out": Path("/x")})
    assert cfg.collect_tokens == 4096 and cfg.d_sae == 512
    assert cfg.n_prompts == 7 and cfg.out == Path("/x")
    assert cfg.reuse_sae_from == []


def test_bad_config_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"n_prompts": 0, "colour": "red"}')
    assert main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "n_prompts" in err and "colour" in err and "Traceback" not in err
    bad.write_text("{not json")
    with pytest.raises(PipelineError, match="invalid JSON"):
        load_config(bad, {})
    assert main(["--config", str(tmp_path / "missing.json")]) == 2


@pytest.mark.parametrize(
    ("name", "field", "value"),
    [
        ("paper_r1_llama8b_specs.json", "strength", 2.0),
        ("paper_r1_llama8b_specs_value.json", "value", 11.68),
    ],
)
def test_paper_spec_files_parse(name: str, field: str, value: float) -> None:
    """The files docs/paper_recipe.md passes to `sae-steer eval --specs-file`."""
    specs = load_specs_file(CONFIGS / name)
    assert specs[BASELINE] is None
    (steered,) = [s for n, s in specs.items() if n != BASELINE]
    assert steered is not None
    (iv,) = steered.interventions
    assert iv.sae == "r1-l19" and iv.feature == 46379 and iv.mode == "clamp"  # type: ignore[union-attr]
    assert getattr(iv, field) == pytest.approx(value)
    assert steered.positions == "all"


def test_paper_all_features_file_has_the_papers_four_features() -> None:
    specs = load_specs_file(CONFIGS / "paper_r1_llama8b_all_features_specs.json")
    feats = sorted(s.interventions[0].feature for s in specs.values() if s is not None)  # type: ignore[union-attr]
    assert feats == [15136, 17456, 46379, 62777]


# ------------------------------------------------------------------ study design and report
def test_random_control_features_are_live_and_disjoint_from_the_top() -> None:
    max_act = [0.0, 1.0, 0.0, 2.0, 3.0, 0.5, 0.0, 4.0]
    picked = choose_random_features(max_act, exclude=[3, 7], k=3, seed=1)
    assert len(set(picked)) == 3
    assert all(max_act[f] > 0 and f not in (3, 7) for f in picked)
    assert picked == choose_random_features(max_act, exclude=[3, 7], k=3, seed=1)
    with pytest.raises(ValueError, match="live features"):
        choose_random_features(max_act, exclude=[3, 7], k=4, seed=0)


def test_study_report_from_a_scripted_server(tmp_path: Path) -> None:
    """Sweep + analysis + plots + report against the scripted fake (steering adds 'Wait').

    The fake makes every steered completion longer and wordier, so the steered arms must
    come out higher than baseline with CIs above zero, and top vs random must be ~0.
    """
    from helpers.fake_endpoint import FakeModel, FakeServer, make_problems

    problems = make_problems(12)
    design = make_design("fake-sae", [5, 9], [100, 200], [1.0, 2.0], "clamp")
    assert len(design.specs()) == 1 + 2 * 2 * 2
    with FakeServer(FakeModel(sae="fake-sae", d_sae=1000)) as srv:
        res = run_sweep(
            srv.base_url,
            srv.model_name,
            problems,
            design.specs(),
            out_dir=tmp_path / "study",
            dataset="toy",
            max_tokens=200,
            temperature=0.0,
            concurrency=4,
            progress=False,
        )
    assert len(res.records) == 12 * 9 and all(r.ok for r in res.records)
    an = analyse(design, res.records)
    assert an.n_problems == 12 and an.n_errors == 0
    assert an.baseline.values["accuracy"].mean == pytest.approx(100.0)
    for g in an.groups:
        assert g.n_samples == 24
        words = g.vs_baseline["word_rate"]
        tokens = g.vs_baseline["tokens"]
        assert words is not None and words.lo > 0
        assert tokens is not None and tokens.lo > 0
    for d in an.top_minus_random.values():
        assert d["tokens"] is not None and d["tokens"].diff == pytest.approx(0.0)
    plots = plot_study(design, an, tmp_path / "study" / "plots")
    for p in plots:
        w, h = _png_size(p)
        assert w > 500 and h > 300
    ctx = ReportContext(
        model="fake-model",
        sae_path="sae",
        sae_summary="test",
        score_summary="",
        dataset="toy",
        n_prompts=12,
        max_tokens=200,
        temperature=0.0,
        top_p=1.0,
        seed=0,
        feature_notes={5: "rank 1"},
        problems={p.id: p.problem for p in problems},
        links={"samples": str(res.log_path)},
        elapsed={"study": 1.0},
    )
    report = write_study_report(
        tmp_path / "study" / "report.md", design, an, res.records, plots, ctx
    )
    text = report.read_text()
    assert "| no steering |" in text and "top-2 ReasonScore" in text and "2 random" in text
    assert "higher (95% CI excludes 0)" in text
    assert "not a reasoning model" in text
    # side by side: the first problem (p0), baseline vs the top-1 feature at the middle strength
    assert "Problem `p0`" in text and "top1.f5_clamp_s2" in text
    for p in plots:
        assert f"(plots/{p.name})" in text


# ------------------------------------------------------------------ the whole pipeline, tiny
@pytest.mark.server
def test_demo_pipeline_tiny_end_to_end(
    steer_server,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from helpers.registry import saes_http

    from benchmarks.demo import run as demo_run
    from sae_steer_vllm.sae import SAE, STATS_FILE
    from sae_steer_vllm.sae_api import SAEList
    from sae_training import FeatureStats

    name = "tiny-demo"
    out = steer_server.sae_root / f"demo-{tmp_path.name}"
    real_step_server = demo_run.step_server
    registered: list[int] = []

    def step_server_then_register(cfg: Any, root: Path, sae_dir: Path, *a: Any) -> Any:
        """``--base-url`` names a running server: register the SAE just trained and scored
        there, as its operator would (the second run finds it registered: 409)."""
        served = real_step_server(cfg, root, sae_dir, *a)
        rel = sae_dir.resolve().relative_to(steer_server.sae_root.resolve())
        status, body = saes_http(steer_server, "POST", "/v1/saes", {"name": name, "path": str(rel)})
        assert status in (200, 409), body
        registered.append(status)
        return served

    monkeypatch.setattr(demo_run, "step_server", step_server_then_register)
    argv = [
        "--config",
        str(CONFIGS / "demo_tiny.json"),
        "--out",
        str(out),
        "--base-url",
        steer_server.base_url,
        "--sae-name",
        name,
    ]
    try:
        assert main(argv) == 0
        printed = capsys.readouterr().out
        assert registered == [200]
        status, body = saes_http(steer_server, "GET", "/v1/saes")
        entry = SAEList.model_validate(body).by_name()[name]
        assert entry.runtime and entry.has_statistics and entry.d_sae == 512

        sae = SAE.load(out / "sae")
        assert sae.cfg.d_sae == 512
        assert (entry.layer, entry.architecture) == (sae.cfg.hook_layer, sae.cfg.architecture)
        stats = FeatureStats.load(out / "sae" / STATS_FILE)
        assert stats["max_activation"].shape == (512,)
        assert float(stats["max_activation"].max()) > 0
        table = json.loads((out / "reasonscore" / "reasonscore_top.json").read_text())
        top1 = table["features"][0]["feature"]
        assert table["features"][0]["rank"] == 1
        index = (out / "dashboard" / "index.html").read_text()
        assert f"feature_{top1}.html" in index
        assert (out / "dashboard" / f"feature_{top1}.html").is_file()

        lines = (out / "study" / "samples.jsonl").read_text().splitlines()
        recs = [json.loads(x) for x in lines]
        # 4 problems x (baseline + 1 top + 1 random x 3), + thinking-only and answer-only arms
        # when the server has think markers (the suite's server has none: they are skipped)
        scope = {r["spec_name"] for r in recs if r["spec_name"].startswith("top1-")}
        assert len(scope) in (0, 2)
        assert len(recs) == 4 * (1 + 2 * 3 + len(scope))
        assert all(r["error"] is None for r in recs), [r["error"] for r in recs if r["error"]]
        # every steered sample steered the freshly trained SAE, not one the server started with
        assert {json.loads(r["spec"])["interventions"][0]["sae"] for r in recs if r["spec"]} == {
            name
        }
        # the tiny SAE is BatchTopK saved as JumpReLU (the default recipe): "auto" means clamp
        assert sae.cfg.architecture == "jumprelu"
        assert {r["spec_name"] for r in recs} >= {BASELINE, f"top1.f{top1}_clamp_s4"}
        base = {r["problem_id"]: r["completion"] for r in recs if r["spec_name"] == BASELINE}
        strong = [r for r in recs if r["spec_name"].endswith("_s4")]
        assert any(r["completion"] != base[r["problem_id"]] for r in strong), (
            "steering had no effect"
        )

        # the study read the top features through the server's readout (issue 14)
        assert all(r["readout"] for r in recs), "a study sample lacks the watched features"
        report = out / "study" / "report.md"
        text = report.read_text()
        assert "How steering one feature moves the others" in text
        assert "## Results" in text and "One completion, unsteered and steered" in text
        if scope:
            assert "## Where to steer: all vs thinking vs answer" in text
        else:
            assert "the scope arms (thinking / answer only) were skipped" in text
        imgs = [ln.split("](", 1)[1].rstrip(")") for ln in text.splitlines() if ln.startswith("![")]
        assert len(imgs) >= 2
        for rel in imgs:
            _png_size(report.parent / rel)
        assert str(report) in printed and "from openai import OpenAI" in printed
        assert f'"feature": {top1}' in printed

        # a second run reuses every step (nothing is retrained or regenerated)
        assert main(argv) == 0
        again = capsys.readouterr().out
        assert "reusing the SAE" in again and "reusing the statistics" in again
        assert len((out / "study" / "samples.jsonl").read_text().splitlines()) == len(lines)
        assert registered == [200, 409]
    finally:
        saes_http(steer_server, "DELETE", f"/v1/saes/{name}")
