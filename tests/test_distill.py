"""``sae-steer distill`` end to end on a random tiny Llama with the default model's tokenizer:
the output folder is an R1-style HF model, training lowers the loss, a stopped run continues
to the same weights, a finished folder is reused, and bad input is a clear error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import trace_records, write_jsonl
from helpers.models import make_tiny_llama
from safetensors.torch import load_file

from sae_steer_vllm.constants import (
    DISTILL_CHECK_FILE,
    DISTILL_CHECKPOINT_FILE,
    DISTILL_STATE_FILE,
)
from sae_steer_vllm.errors import UsageError
from sae_training.corpus import THINK_CLOSE, THINK_OPEN
from sae_training.distill import DistillConfig, distill_model, read_check
from sae_training.distill.cli import main as distill_main
from sae_training.distill.distill import is_complete, read_state
from sae_training.errors import CorpusError, TrainingError


def _traces(n: int = 10) -> list[dict[str, Any]]:
    recs = trace_records(n)
    for i, r in enumerate(recs):
        r["id"] = f"t{i}"
    return recs


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distill")
    return {
        "root": root,
        "base": make_tiny_llama(root / "tiny"),
        "traces": write_jsonl(root / "traces.jsonl", _traces()),
        "problems": write_jsonl(
            root / "problems.jsonl", [{"question": f"What is {i} times 3?"} for i in range(2)]
        ),
    }


def _cfg(files: dict[str, Path], out: Path, **kw: Any) -> DistillConfig:
    args: dict[str, Any] = {
        "base": files["base"],
        "traces": str(files["traces"]),
        "check_problems": str(files["problems"]),
        "out": out,
        "max_len": 256,
        "max_examples": 1000,
        "epochs": 2,
        "grad_accum": 2,
        "lr": 1e-2,
        "warmup": 1,
        "holdout_every": 5,
        "checkpoint_every": 3,
        "n_check": 2,
        "check_max_tokens": 6,
        "threads": 1,
        "progress": False,
    }
    args.update(kw)
    return DistillConfig(**args)


@pytest.fixture(scope="module")
def done(files: dict[str, Path]) -> Path:
    return distill_model(_cfg(files, files["root"] / "full"))


def test_output_is_an_r1_style_hf_model(done: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(done))
    model: Any = AutoModelForCausalLM.from_pretrained(str(done))
    for marker in (THINK_OPEN, THINK_CLOSE):
        assert len(tok(marker, add_special_tokens=False)["input_ids"]) == 1
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜><think>\n"
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # BOS on plain text survives saving
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<｜end▁of▁sentence｜>")
    assert model.config.bos_token_id == tok.bos_token_id
    assert model.config.tie_word_embeddings
    assert (
        model.get_input_embeddings().weight.data_ptr()
        == model.get_output_embeddings().weight.data_ptr()
    )
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    for name in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors"):
        assert (done / name).is_file(), name
    assert not (done / DISTILL_CHECKPOINT_FILE).exists()  # removed once complete


def test_loss_goes_down_and_the_check_is_written(done: Path) -> None:
    state = json.loads((done / DISTILL_STATE_FILE).read_text())
    assert (
        state["complete"] and state["step"] == state["steps_total"] == 8
    )  # 8 traces x 2 epochs / 2
    losses = state["losses"]
    # from ln(vocab) ~ 10.8 for the random model; measured ~8.2 after 8 steps
    assert sum(losses[-2:]) / 2 < 0.85 * sum(losses[:2]) / 2
    report = read_check(done)
    assert report is not None
    assert report == json.loads((done / DISTILL_CHECK_FILE).read_text())
    assert report["data"]["train"] == 8 and report["data"]["held_out"] == 2
    assert report["held_out_loss_after"] < report["held_out_loss_before"]
    for side in ("before", "after"):
        r = report[side]
        assert r["n_problems"] == 2 and len(r["samples"]) == 2
        assert 0 < r["completion_tokens"] <= 12
        assert 0.0 <= r["closed_think_share"] <= 1.0


def test_a_stopped_run_continues_to_the_same_weights(files: dict[str, Path], done: Path) -> None:
    out = files["root"] / "resumed"
    distill_model(_cfg(files, out, stop_after=4))
    state = read_state(out)
    assert state is not None and state["step"] == 4 and not is_complete(out)
    assert (out / DISTILL_CHECKPOINT_FILE).is_file()
    assert not (out / "model.safetensors").exists()
    distill_model(_cfg(files, out))
    assert is_complete(out)
    a, b = load_file(str(done / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)
    assert read_state(out)["losses"] == read_state(done)["losses"]  # type: ignore[index]


def test_a_finished_folder_is_reused_a_started_one_forced_over(
    files: dict[str, Path], done: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sae_training.distill.distill as mod

    started = tmp_path / "started"
    distill_model(_cfg(files, started, stop_after=1))
    assert (started / DISTILL_CHECKPOINT_FILE).is_file()

    def boom(*a: Any, **k: Any) -> Path:
        raise AssertionError("trained")

    monkeypatch.setattr(mod, "_run", boom)
    # run-control fields (stop_after, progress) are not settings: the folder is reused
    assert distill_model(_cfg(files, done, stop_after=1, progress=True)) == done
    with pytest.raises(UsageError, match="other settings"):
        distill_model(_cfg(files, done, lr=1e-3))
    with pytest.raises(AssertionError, match="trained"):
        distill_model(_cfg(files, started, force=True))
    assert not started.exists()  # wiped before starting over


def test_the_cli_prints_the_check(done: Path, files: dict[str, Path], capsys: Any) -> None:
    argv = [
        "--base", str(files["base"]), "--traces", str(files["traces"]),
        "--check-problems", str(files["problems"]), "--out", str(done), "--max-len", "256",
        "--epochs", "2", "--lr", "0.01", "--warmup", "1", "--holdout-every", "5",
        "--checkpoint-every", "3", "--n-check", "2", "--check-max-tokens", "6",
        "--threads", "1", "--no-progress",
    ]  # fmt: skip
    assert distill_main([*argv, "--max-examples", "1000"]) == 0
    out = capsys.readouterr().out
    assert f"model      : {done}" in out
    assert "8 traces trained on" in out and "8 steps" in out
    assert out.splitlines()[-2].startswith("before") and out.splitlines()[-1].startswith("after")
    assert distill_main([*argv, "--max-examples", "5"]) == 2  # other settings: usage error
    assert "other settings" in capsys.readouterr().err


def test_missing_inputs_are_usage_errors(files: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such file"):
        distill_model(_cfg(files, tmp_path / "o", traces=str(tmp_path / "nope.jsonl")))
    with pytest.raises(UsageError, match="not an HF model folder"):
        distill_model(_cfg(files, tmp_path / "o", base=tmp_path))
    with pytest.raises(UsageError, match="check problems"):
        distill_model(_cfg(files, tmp_path / "o", check_problems=str(tmp_path / "p.jsonl")))
    assert distill_main(["--traces", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path)]) == 2
    assert distill_main(["--max-len", "0"]) == 2


def test_unusable_traces_are_corpus_errors(files: dict[str, Path], tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"problem": "x"}, {"reasoning": "y"}])
    with pytest.raises(CorpusError, match="no usable trace"):
        distill_model(_cfg(files, tmp_path / "a", traces=str(bad)))
    with pytest.raises(CorpusError, match="raise --max-len"):
        distill_model(_cfg(files, tmp_path / "b", max_len=20))


def test_a_foreign_checkpoint_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / DISTILL_CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match="cannot read the checkpoint"):
        distill_model(_cfg(files, out))
