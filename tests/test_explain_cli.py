"""``sae-steer explain`` end to end: a statistics file from the real one-pass accumulator
(hand-built activations: each feature fires on one word only, tokens of the default
model's tokenizer), a scripted judge whose scores are exact (:mod:`helpers.explain_judge`),
the budget stop and resume, endpoint and input errors, the ``--steering`` dispatch, and
one run against the suite's real vLLM server."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.explain_judge import FILLERS, UNCLEAR_WORD, WORDS, expected_accuracy, judge
from helpers.fake_endpoint import FakeServer
from helpers.models import default_tokenizer_dir

from benchmarks.interpret import explain_cli
from benchmarks.interpret.explain_prompts import EXPLANATION_REGEX
from benchmarks.server_process import free_port
from sae_steer_vllm.cli import main as cli_main
from sae_steer_vllm.constants import (
    EXPLAIN_DIR,
    EXPLAIN_LOG_FILE,
    EXPLANATIONS_FILE,
    STEERING_EFFECTS_FILE,
    SUMMARY_FILE,
)
from sae_steer_vllm.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE
from sae_training.features.context_sample import CONTEXT_TENSORS
from sae_training.features.explanations import read_explanations
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.stats_accumulator import FeatureStatsAccumulator, StatsConfig

N_SEQ, T, BURN = 30, 40, 4
FIRES_AT = [6 + 5 * f for f in range(len(WORDS))]  # windows of different features never meet


def _ids(words: list[str]) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    out = [tok.encode(" " + w, add_special_tokens=False) for w in words]
    assert all(len(i) == 1 for i in out)
    return [i[0] for i in out]


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An SAE folder holding only statistics: feature ``f`` fires on ``WORDS[f]`` (in every
    third sequence, once) and that word appears nowhere else."""
    fillers, words = _ids(FILLERS), _ids(WORDS)
    d = len(WORDS)
    ids = torch.tensor(
        [[fillers[(s * 7 + p * 3) % len(fillers)] for p in range(T)] for s in range(N_SEQ)]
    )
    acts = torch.zeros(N_SEQ, T, d)
    for f in range(d):
        for s in range(N_SEQ):
            if (s + f) % 3 == 0:
                ids[s, FIRES_AT[f]] = words[f]
                acts[s, FIRES_AT[f], f] = 1.0 + s / 10
    cfg = StatsConfig(n_examples=3, ctx_before=2, ctx_after=1, n_sample=8, n_random_windows=24)
    acc = FeatureStatsAccumulator(d, 1, cfg)
    valid = torch.ones(N_SEQ, T, dtype=torch.bool)
    valid[:, :BURN] = False
    for lo in range(0, N_SEQ, 10):
        sl = slice(lo, lo + 10)
        groups = torch.zeros(10, 1, T, dtype=torch.bool)
        acc.update(acts[sl], ids[sl], groups, valid[sl], torch.arange(lo, lo + 10))
    stats = acc.finalize(torch.ones(d), ("g",))
    stats.meta["model"] = str(default_tokenizer_dir())
    out = tmp_path_factory.mktemp("explain") / "sae"
    out.mkdir()
    stats.save(out)
    return out


def _argv(srv: FakeServer, sae: Path, *extra: str) -> list[str]:
    return ["--sae", str(sae), "--llm-url", srv.base_url, "--no-progress", *extra]


ALL = ",".join(str(f) for f in range(len(WORDS)))


def test_explains_and_scores_exactly(
    sae_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    with FakeServer(respond=judge) as srv:
        assert explain_cli.main(_argv(srv, sae_dir, "--features", ALL, "--batch-size", "4")) == 0
        assert all(r["model"] == "fake-model" for r in srv.requests)
    data = read_explanations(sae_dir)
    assert data is not None and data.meta["explainer"] == "fake-model"
    by = data.by_feature()
    assert sorted(by) == [0, 1, 2, 3, 4]  # "seven" (5) got no explanation: not written
    for f in by:
        e = by[f]
        word = WORDS[f]
        assert e.explanation == f'the word "{word}"'
        assert e.detection is not None and e.fuzzing is not None
        assert e.detection.n_positive > 0 and e.detection.n_negative > 0
        assert e.fuzzing.n_positive == e.fuzzing.n_negative == e.detection.n_positive
        assert e.fuzzing.balanced_accuracy == expected_accuracy(word)
        want_det = 0.0 if word == UNCLEAR_WORD else expected_accuracy(word)
        assert e.detection.balanced_accuracy == want_det
        assert (e.detection.n_unclear > 0) == (word == UNCLEAR_WORD)
    out = capsys.readouterr().out
    assert "5 of 6 features" in out and "fuzzing" in out
    folder = sae_dir / EXPLAIN_DIR
    summary = (folder / SUMMARY_FILE).read_text()
    assert "feature 5: no_explanation" in summary
    for p in [sae_dir / EXPLANATIONS_FILE, *folder.iterdir()]:
        if p.suffix != ".png":
            assert "sk-very-secret" not in p.read_text()
    log = [json.loads(x) for x in (folder / EXPLAIN_LOG_FILE).read_text().splitlines()]
    assert len(log) == len(srv.requests)
    # the same command again must not silently mix two runs in one log
    with FakeServer(respond=judge) as srv:
        assert explain_cli.main(_argv(srv, sae_dir, "--features", ALL)) == EXIT_USAGE
    assert "--resume" in capsys.readouterr().err


def test_budget_stop_then_resume_equals_an_uninterrupted_run(
    sae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeServer(respond=judge) as srv:
        whole = _argv(srv, sae_dir, "--features", ALL, "--out", str(tmp_path / "whole"))
        assert explain_cli.main(whole) == 0
        n_whole = len(srv.requests)
        part = _argv(srv, sae_dir, "--features", ALL, "--out", str(tmp_path / "part"))
        assert explain_cli.main([*part, "--max-requests", "7", "--concurrency", "2"]) == 0
        assert len(srv.requests) == n_whole + 7
        out = capsys.readouterr().out
        assert "budget of 7 requests spent" in out and "features remain" in out
        stopped = read_explanations(tmp_path / "part")
        assert stopped is not None and len(stopped.features) < 5
        cmd = explain_cli.ExplainConfig.model_validate(
            {"sae": sae_dir, "llm_url": srv.base_url, "features": ALL, "resume": True}
            | {"out": tmp_path / "part", "progress": False}
        )
        paths = explain_cli.run_explain(cmd)  # the library verb the demo calls
        assert paths == (tmp_path / "part" / EXPLANATIONS_FILE, tmp_path / "part" / SUMMARY_FILE)
        assert len(srv.requests) == 2 * n_whole  # nothing asked twice
    a, b = read_explanations(tmp_path / "whole"), read_explanations(tmp_path / "part")
    assert a is not None and b is not None and len(a.features) == 5
    assert a.features == b.features


def test_unreachable_or_refusing_endpoint_exits_3_before_any_work(
    sae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "o"
    url = f"http://127.0.0.1:{free_port()}/v1"
    argv = ["--sae", str(sae_dir), "--out", str(out), "--features", "0", "--llm-url", url]
    assert explain_cli.main(argv) == EXIT_UNREACHABLE
    assert "cannot reach" in capsys.readouterr().err and not out.exists()
    with FakeServer(respond=judge) as srv:
        srv.refuse_status = 401
        argv = _argv(srv, sae_dir, "--out", str(out), "--features", "0", "--llm-model", "m")
        assert explain_cli.main(argv) == EXIT_UNREACHABLE
        assert "HTTP 401" in capsys.readouterr().err
        srv.refuse_status = None
        assert explain_cli.main([*argv[:-1], "other-model"]) == EXIT_UNREACHABLE
        assert "not served" in capsys.readouterr().err and not srv.requests
    assert not out.exists()


def test_bad_input_is_refused_with_a_clear_message(
    sae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with FakeServer(respond=judge) as srv:
        out = ["--out", str(tmp_path / "o")]
        cases: list[tuple[list[str], int, str]] = [
            (["--features", "99"], EXIT_USAGE, "the SAE has 6 features"),
            (["--features", "1", "--top-k", "2"], EXIT_USAGE, "give one of"),
            (["--features", "1", "--model", str(tmp_path)], EXIT_USAGE, "cannot load"),
            (["--batch-size", "0"], EXIT_USAGE, "--batch-size"),
        ]
        for extra, code, msg in cases:
            assert explain_cli.main(_argv(srv, sae_dir, *out, *extra)) == code, extra
            assert msg in capsys.readouterr().err, extra
        assert explain_cli.main(_argv(srv, tmp_path / "nope", *out)) == EXIT_USAGE
        assert "not found" in capsys.readouterr().err
        empty = tmp_path / "empty"
        empty.mkdir()
        assert explain_cli.main(_argv(srv, empty, *out)) == EXIT_FAILED
        assert "sae-steer score" in capsys.readouterr().err
        old = tmp_path / "old"
        old.mkdir()
        stats = FeatureStats.load(sae_dir)
        for name in CONTEXT_TENSORS:
            del stats.tensors[name]
        stats.save(old)
        assert explain_cli.main(_argv(srv, old, *out, "--features", "1")) == EXIT_FAILED
        assert "re-run `sae-steer score`" in capsys.readouterr().err
        assert not srv.requests and not (tmp_path / "o").exists()


def test_steering_mode_dispatches_with_its_options(
    sae_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.interpret import steering_effects

    seen: dict[str, Any] = {}

    async def fake(opts: Any, llm: Any, features: list[int], out_dir: Path, resume: bool) -> Path:
        seen.update(opts=opts, model=llm.cfg.model, features=features, out=out_dir, resume=resume)
        seen.setdefault("first_features", features)
        return out_dir / "table.md"

    monkeypatch.setattr(steering_effects, "run_steering_explain_async", fake)
    with FakeServer(respond=judge) as srv:
        argv = _argv(srv, sae_dir, "--out", str(tmp_path), "--features", "3,1", "--steering")
        argv += ["--strengths=-1,0.5", "--steer-sae", "s", "--n-steer-prompts", "2"]
        assert explain_cli.main([*argv, "--resume"]) == 0
        assert not srv.requests  # the steering mode asked nothing itself
        opts = seen["opts"]
        cmd = {"sae": sae_dir, "llm_url": srv.base_url, "features": [2], "steering": True}
        paths = explain_cli.run_explain(
            explain_cli.ExplainConfig.model_validate(cmd | {"out": tmp_path, "resume": True})
        )
        assert paths == (tmp_path / "table.md", tmp_path / STEERING_EFFECTS_FILE)
        assert seen["features"] == [2]
    assert (opts.steer_url, opts.steer_sae, opts.strengths) == (srv.base_url, "s", [-1.0, 0.5])
    assert (opts.n_steer_prompts, opts.steer_max_tokens, opts.steer_model) == (2, 128, None)
    assert seen["first_features"] == [3, 1] and seen["out"] == tmp_path and seen["resume"]
    assert seen["model"] == "fake-model"


def test_registered_as_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(["explain", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--max-requests" in text and "--steering" in text and "--llm-api-key-env" in text


@pytest.mark.server
def test_explain_against_the_real_server(
    steer_server: Any, sae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The suite's vLLM server (the small default model) as explainer and judge: the run
    completes, every prompt and real answer is logged, and the file is written. On a vLLM
    endpoint the answers are constrained (structured outputs), so every one is readable:
    each explanation is an ``Explanation:`` line and no judge answer is unclear. A 135M
    model's explanations are poor; the scores are whatever they are (checked in range by
    the file's own model)."""
    out = tmp_path / "real"
    argv = ["--sae", str(sae_dir), "--out", str(out), "--llm-url", steer_server.base_url]
    argv += ["--features", "0,1", "--n-explain", "2", "--n-held-out", "2"]
    argv += ["--n-non-activating", "2", "--max-tokens", "48", "--no-progress"]
    assert explain_cli.main(argv) == 0
    log = [json.loads(x) for x in (out / EXPLAIN_LOG_FILE).read_text().splitlines()]
    assert {x["kind"] for x in log} >= {"explain"} and all(x["answer"] for x in log)
    assert sum(x["kind"] == "explain" for x in log) == 2
    for x in log:
        if x["kind"] == "explain":
            assert re.fullmatch(EXPLANATION_REGEX, x["answer"]), x["answer"]
        else:
            assert re.fullmatch(r"\[[01](, [01])*\]", x["answer"]), x["answer"]
    data = read_explanations(out)
    assert data is not None and data.meta["explainer"] == steer_server.model
    assert data.meta["constrained"] is True
    summary = (out / SUMMARY_FILE).read_text()
    explained = {e.feature for e in data.features}
    for f in (0, 1):
        assert f in explained or f"feature {f}: no_explanation" in summary
    for e in data.features:
        assert all(s is None or s.n_unclear == 0 for s in (e.detection, e.fuzzing))
    print(capsys.readouterr().out, summary)  # with -s: what the small model scored
