"""``sae-steer diff`` end to end on tiny random models: outputs, identical models, resume,
and clear errors for bad input. The rule itself is tested on hand-made numbers in
``test_diffing_rule.py``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import write_corpus
from helpers.models import tiny_causal_lm
from helpers.saes import make_sae

from sae_steer_vllm.constants import (
    DIFF_CONDITIONS_DIR,
    DIFF_PLOT_FILE,
    DIFF_REPORT_FILE,
    DIFF_RESULT_FILE,
)
from sae_steer_vllm.errors import UsageError
from sae_training.diffing import CLASSES, DiffConfig, diff_models
from sae_training.diffing import run as diff_run
from sae_training.diffing.cli import main as diff_main
from sae_training.errors import ModelLoadError
from sae_training.features.feature_stats import FeatureStats, sae_weights_digest

D_IN, D_SAE, LAYER = 32, 64, 1


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diff")
    model_a = tiny_causal_lm(root / "model-a", layers=3, hidden=D_IN, max_positions=512)
    model_b = tiny_causal_lm(root / "model-b", layers=3, hidden=D_IN, max_positions=512, seed=1)
    chat, traces = write_corpus(root / "data", n_chat=40, n_trace=30)
    sae_dir = root / "sae"
    # encoder scaled up: the tiny model's residual is small, and features should fire
    sae = make_sae(d_in=D_IN, d_sae=D_SAE, layer=LAYER, dead=(3,))
    sae.cfg = replace(sae.cfg, context_size=64)
    sae.save(sae_dir)
    g = torch.Generator().manual_seed(0)
    FeatureStats(
        {"max_activation": torch.ones(D_SAE), "reasonscore": torch.rand(D_SAE, generator=g)},
        {"sae_weights_sha256": sae_weights_digest(sae_dir)},
    ).save(sae_dir)
    return {"a": model_a, "b": model_b, "chat": chat, "traces": traces, "sae": sae_dir}


def _cfg(s: dict[str, Path], out: Path, **kw: Any) -> DiffConfig:
    base: dict[str, Any] = {
        "sae": s["sae"],
        "model_a": str(s["a"]),
        "model_b": str(s["b"]),
        "reasoning_model": "b",
        "chat": str(s["chat"]),
        "reasoning": str(s["traces"]),
        "tokens": 600,
        "steps": 4,
        "batch_size": 128,
        "lr": 1e-3,
        "top_k": 8,
        "min_density": 1e-3,
        "out": out,
        "device": "cpu",
        "progress": False,
    }
    base.update(kw)
    return DiffConfig(**base)


def test_end_to_end_outputs_and_resume(
    setup: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    res = diff_models(_cfg(setup, tmp_path))
    assert len(res.classes) == D_SAE
    assert set(res.classes) <= set(CLASSES)
    assert sum(res.counts.values()) == D_SAE
    assert res.classes[3] == "dead"  # the feature no input can fire
    for name in (DIFF_RESULT_FILE, DIFF_REPORT_FILE, DIFF_PLOT_FILE):
        assert (tmp_path / name).stat().st_size > 0
    doc = json.loads((tmp_path / DIFF_RESULT_FILE).read_text())
    assert doc["feature_class"] == res.classes
    assert doc["meta"]["finetune"]["architecture"] == "standard"
    rs = doc["reasonscore"]
    assert rs["top"] == FeatureStats.load(setup["sae"]).ranking()[:8].tolist()
    assert len(rs["random"]) == 8 and not set(rs["random"]) & set(rs["top"])
    assert all(res.classes[i] != "dead" for i in rs["random"])
    assert sum(r["top"] for r in rs["per_class"].values()) == 8
    md = (tmp_path / DIFF_REPORT_FILE).read_text()
    assert "needs the reasoning model" in md and "Fisher" in md
    conds = sorted(p.name for p in (tmp_path / DIFF_CONDITIONS_DIR).iterdir())
    assert conds == ["a-chat", "a-reasoning", "b-chat", "b-reasoning"]

    # a rerun reuses every condition: no model is loaded, nothing is fine-tuned
    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("recomputed a cached condition")

    monkeypatch.setattr(diff_run, "load_model", refuse)
    monkeypatch.setattr(diff_run, "finetune_cosines", refuse)
    # through the command, with another threshold: classification only, no recomputation
    given = _cfg(setup, tmp_path).model_dump(exclude_none=True, exclude={"progress"})
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in given.items()]
    assert diff_main([*argv, "--no-progress", "--min-decoder-cos=0.5"]) == 0
    again = json.loads((tmp_path / DIFF_RESULT_FILE).read_text())
    assert again["meta"]["thresholds"]["min_decoder_cos"] == 0.5
    assert len(again["feature_class"]) == D_SAE


def test_identical_models_need_no_model(setup: dict[str, Path], tmp_path: Path) -> None:
    """A == B: the B conditions repeat the A ones exactly, so no feature needs a model."""
    res = diff_models(_cfg(setup, tmp_path, model_b=str(setup["a"]), min_decoder_cos=0.999))
    assert res.counts["reasoning_model"] == 0 and res.counts["both"] == 0
    doc = json.loads((tmp_path / DIFF_RESULT_FILE).read_text())
    for row in doc["reasonscore"]["top_rows"] + doc["reasonscore"]["random_rows"]:
        for k in ("density", "cos_dec", "cos_enc"):
            assert row[k]["a-chat"] == row[k]["b-chat"]
            assert row[k]["a-reasoning"] == row[k]["b-reasoning"]


def test_bad_inputs_are_clear_errors(setup: dict[str, Path], tmp_path: Path) -> None:
    wide = tiny_causal_lm(tmp_path / "wide", layers=3, hidden=48, max_positions=512)
    with pytest.raises(UsageError, match="d_model 48"):
        diff_models(_cfg(setup, tmp_path / "o1", model_b=str(wide)))
    with pytest.raises(UsageError, match="reasoning corpus"):
        diff_models(_cfg(setup, tmp_path / "o2", reasoning=str(tmp_path / "missing.jsonl")))
    with pytest.raises(UsageError, match="not a Hugging Face model folder"):
        diff_models(_cfg(setup, tmp_path / "o3", model_b=str(tmp_path)))
    deep = tmp_path / "deep-sae"
    make_sae(d_in=D_IN, d_sae=D_SAE, layer=7).save(deep)
    with pytest.raises(ModelLoadError, match="layer 7 out of range"):
        diff_models(_cfg(setup, tmp_path / "o4", sae=deep))
    with pytest.raises(UsageError, match="cannot be told"):
        diff_models(_cfg(setup, tmp_path / "o5", reasoning_model="auto"))
    # the command: a usage error is exit 2 with one line, not a traceback
    argv = ["--sae", str(setup["sae"]), "--model-a", str(setup["a"]), "--model-b"]
    argv += [str(setup["b"]), "--chat", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]
    assert diff_main(argv) == 2
