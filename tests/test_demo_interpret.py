"""The demo's interpretation steps: the CPU-scale config, refusals, and the report page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.demo.config import DemoConfig, PipelineError, load_config
from benchmarks.demo.interpret_report import write_interpretation_report
from benchmarks.demo.interpret_steps import InterpretOutputs, step_diff, step_distill
from sae_training.features.explanations import (
    ExplanationScore,
    ExplanationsFile,
    FeatureExplanation,
    write_explanations,
)

REPO = Path(__file__).resolve().parents[1]


def test_cpu_scale_config_turns_every_part_on() -> None:
    cfg = load_config(REPO / "configs" / "paper_at_cpu_scale.json", {})
    assert cfg.distill and cfg.diff and cfg.explain_top > 0 and cfg.explain_steering > 0
    assert (cfg.think_start_marker, cfg.think_end_marker) == ("<think>", "</think>")
    assert min(cfg.strengths) < 1.0  # strengths where outputs stay fluent are included
    assert cfg.out != DemoConfig().out  # never mixes with the default demo's folder


def test_steps_are_off_by_default_and_diff_needs_the_distill(tmp_path: Path) -> None:
    cfg = DemoConfig()
    assert step_distill(cfg, tmp_path) == tmp_path  # off: the base model, nothing run
    assert step_diff(cfg, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path) is None
    on = DemoConfig(diff=True)
    with pytest.raises(PipelineError, match="add --distill"):
        step_diff(on, tmp_path, tmp_path, tmp_path, tmp_path, tmp_path)


def _score(ba: float, unclear: int = 0) -> ExplanationScore:
    return ExplanationScore(
        balanced_accuracy=ba,
        ci_low=0.0,
        ci_high=1.0,
        n_positive=4,
        n_negative=4,
        n_unclear=unclear,
    )


def test_report_page_reads_each_steps_files(tmp_path: Path) -> None:
    feats = [
        FeatureExplanation(
            feature=f, explanation=f"words | {f}", detection=_score(d), fuzzing=_score(z)
        )
        for f, d, z in [(1, 0.9, 0.7), (2, 0.7, 0.5), (3, 0.5, 0.5), (4, 0.6, 0.4)]
    ]
    feats[3] = feats[3].model_copy(update={"fuzzing": _score(0.0, unclear=2)})
    expl = write_explanations(
        tmp_path / "e.json", ExplanationsFile(meta={"constrained": True}, features=feats)
    )
    table = tmp_path / "steering_effects.md"
    table.write_text("# Steering effects\n\n| cluster | features |\n|---|---|\n| hedging | 1 |\n")
    check = {
        "before": {"closed_think_share": 0.0, "reasoning_word_rate": 0.1, "n_problems": 8},
        "after": {"closed_think_share": 0.75, "reasoning_word_rate": 2.5, "held_out_loss": 1.2},
        "held_out_loss_before": 1.9,
    }
    (tmp_path / "model_diff").mkdir()
    plot = tmp_path / "model_diff" / "model_diff.png"
    plot.write_bytes(b"png")
    outs = InterpretOutputs(explanations=expl, steering_table=table, diff_plot=plot)
    page = write_interpretation_report(
        tmp_path, outs, Path("m"), check, Path("sae"), [1, 2], [3, 4]
    )
    assert page is not None
    text = page.read_text()
    assert "| completions closing `</think>` | 0% | 75% |" in text
    assert "| held-out trace loss (nats/token) | 1.900 | 1.200 |" in text
    # top: detection mean of 0.9 and 0.7; random: 0.5 and 0.6
    assert "| top ReasonScore | 0.80 [" in text and "| random | 0.55 [" in text
    assert "| 1 | top | words \\| 1 | 0.90 [0.00, 1.00] | 0.70 [0.00, 1.00] |" in text
    assert "| 0.00 [0.00, 1.00] (2 unreadable answers) |" in text  # never a silent 0
    assert "answers constrained to the form that is read" in text
    assert "## Steering effects" in text  # the included table's heading, nested one level
    assert "## Model diffing (`sae-steer diff`)\n\nNot run." in text
    assert "![model diff](model_diff/model_diff.png)" in text  # relative to the page


def test_no_page_when_nothing_ran(tmp_path: Path) -> None:
    assert (
        write_interpretation_report(
            tmp_path, InterpretOutputs(), Path("m"), None, Path("s"), [], []
        )
        is None
    )
    assert not (tmp_path / "interpretation.md").exists()


def test_default_config_file_lists_the_new_options() -> None:
    raw = json.loads((REPO / "configs" / "demo_default.json").read_text())
    assert raw["explain_top"] == 0 and raw["distill"] is False and raw["diff"] is False


def test_step_headers_count_the_steps_this_run_takes() -> None:
    from benchmarks.demo.run import active_steps
    from benchmarks.demo.state import STEPS

    assert active_steps(DemoConfig()) == STEPS  # the default demo: six steps, as before
    paper = load_config(REPO / "configs" / "paper_at_cpu_scale.json", {})
    assert active_steps(paper) == (
        "model", "distill", "sae", "score", "server", "study", "report",
        "explain", "steering effects", "diff",
    )  # fmt: skip


def test_interpretation_features_come_from_the_ranked_table_not_the_study_arms() -> None:
    """--explain-top 4 with a 2-feature study still explains the top 4 and 4 random ones."""
    from types import SimpleNamespace

    import torch

    from benchmarks.demo.run import interpret_features

    table = {"features": [{"feature": f} for f in (9, 7, 5, 3, 1)]}
    max_act = torch.zeros(20)
    max_act[[2, 4, 6, 8, 10, 12, 9, 7, 5, 3]] = 1.0  # live features; 0, 11, 13... never fire
    study = SimpleNamespace(table=table, stats={"max_activation": max_act})
    cfg = DemoConfig(n_features=2, explain_top=4, explain_steering=1)
    top, rand = interpret_features(cfg, study)  # type: ignore[arg-type]
    assert top == [9, 7, 5, 3]
    assert len(rand) == 4 and not set(rand) & set(top)
    assert all(max_act[f] > 0 for f in rand)  # live random controls only
    assert interpret_features(cfg, study) == (top, rand)  # type: ignore[arg-type]  # seeded


def test_study_caveat_matches_the_model() -> None:
    """The study report must not call the distilled model 'not a reasoning model' (it
    writes R1-style thinking); the base model's caveat still says so."""
    from benchmarks.demo.study_report import ReportContext, _model_caveat

    def ctx(distilled: bool) -> ReportContext:
        return ReportContext(
            model="m", sae_path="s", sae_summary="", score_summary="", dataset="gsm8k",
            n_prompts=1, max_tokens=8, temperature=0.0, top_p=1.0, seed=0, feature_notes={},
            problems={}, links={}, elapsed={}, distilled=distilled,
        )  # fmt: skip

    assert "not a reasoning model" in _model_caveat(ctx(False))
    distilled = _model_caveat(ctx(True))
    assert "not a reasoning model" not in distilled and "sae-steer distill" in distilled
