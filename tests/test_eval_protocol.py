"""The paper's evaluation protocol: prompt and stop on the wire, through an R1 chat template,
reasoning length from the completion's token ids (and the labelled fallback), config files,
and old run folders that still resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeServer, make_problems
from helpers.r1_tokenizer import THINK_CLOSE, make_r1_tokenizer

from benchmarks.eval import load_config_file
from benchmarks.eval import main as eval_main
from benchmarks.grading import Grader
from benchmarks.report import write_report
from benchmarks.runner import SweepConfigError, run_sweep
from benchmarks.sampling import SamplingConfig
from benchmarks.sweep import BASELINE
from sae_steer_vllm.errors import UsageError

REPO = Path(__file__).resolve().parents[1]
PAPER_CONFIG = REPO / "configs" / "paper_r1_llama8b_eval.json"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@pytest.fixture(scope="module")
def grader() -> Any:
    with Grader(workers=1) as g:
        yield g


def _sweep(srv: FakeServer, tmp: Path, grader: Grader, cfg: SamplingConfig, **kw: Any) -> Any:
    return run_sweep(
        srv.base_url,
        "fake-model",
        make_problems(2),
        {BASELINE: None},
        out_dir=tmp,
        sampling=cfg,
        grader=grader,
        progress=False,
        **kw,
    )


def test_paper_prompt_and_stop_are_sent(tmp_path: Path, grader: Grader) -> None:
    with FakeServer() as srv:
        res = _sweep(srv, tmp_path / "paper", grader, SamplingConfig(prompt="paper"))
        paper = list(srv.requests)
        srv.requests.clear()
        _sweep(srv, tmp_path / "default", grader, SamplingConfig())
        default = list(srv.requests)
    assert all(r.correct for r in res.records)
    bodies = {b["messages"][0]["content"]: b for b in paper}
    want = f"{INSTRUCTION}\nProblem: P0: what is 0 + 1?\nAnswer:"
    assert want in bodies
    b = bodies[want]
    assert [m["role"] for m in b["messages"]] == ["user"]
    assert b["stop"] == ["Problem:"]
    assert (b["temperature"], b["top_p"]) == (0.6, 0.95)
    # today's prompt stays as the named alternative: instruction, newline, problem, no stop
    assert {d["messages"][0]["content"] for d in default} == {
        f"{INSTRUCTION}\nP0: what is 0 + 1?",
        f"{INSTRUCTION}\nP1: what is 1 + 2?",
    }
    assert all("stop" not in d for d in default)
    cfg = json.loads((tmp_path / "paper" / "config.json").read_text())
    assert cfg["prompt"] == "paper" and cfg["stop"] == ["Problem:"]
    assert cfg["prompt_template"].endswith("\nProblem: {problem}\nAnswer:")


@pytest.mark.parametrize("opens_think", [False, True])
def test_paper_prompt_through_the_r1_template(tmp_path: Path, opens_think: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        make_r1_tokenizer(tmp_path / "tok", opens_think=opens_think)
    )
    msgs = SamplingConfig(prompt="paper").messages(make_problems(1)[0])
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    tail = "<｜Assistant｜><think>\n" if opens_think else "<｜Assistant｜>"
    assert text.endswith(f"<｜User｜>{INSTRUCTION}\nProblem: P0: what is 0 + 1?\nAnswer:{tail}")


def _token_server(tok: Any, opens_think: bool) -> FakeServer:
    """A fake vLLM: /tokenize with the stand-in R1 tokenizer, completions with token ids."""

    def tokenize(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        ids = tok.encode(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
        return 200, {"count": len(ids), "max_model_len": 4096, "tokens": ids}

    def respond(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        user = body["messages"][-1]["content"]
        head = "" if opens_think else "<think>\n"
        if "P1:" in user:  # the budget ran out inside the reasoning
            text = head + "Hmm. Wait, let me check the sum again, and again"
        else:
            text = head + "Hmm, 0 + 1. Wait, let me check: 1.\n</think>\n\nSo \\boxed{1}"
        ids = tok.encode(text, add_special_tokens=False)
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "finish_reason": "stop",
        }
        if body.get("return_token_ids"):
            choice["token_ids"] = ids
        usage = {"prompt_tokens": 9, "completion_tokens": len(ids), "total_tokens": 9 + len(ids)}
        return 200, {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [choice],
            "usage": usage,
        }

    srv = FakeServer(respond=respond)
    srv.routes["/tokenize"] = tokenize
    return srv


@pytest.mark.parametrize("opens_think", [False, True])
def test_reasoning_tokens_from_token_ids(tmp_path: Path, grader: Grader, opens_think: bool) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        make_r1_tokenizer(tmp_path / "tok", opens_think=opens_think)
    )
    end_id = tok.convert_tokens_to_ids(THINK_CLOSE)
    with _token_server(tok, opens_think) as srv:
        res = _sweep(srv, tmp_path / "run", grader, SamplingConfig(prompt="paper"))
        assert all(b.get("return_token_ids") is True for b in srv.requests)
    recs = {r.problem_id: r for r in res.records}
    ids = tok.encode(recs["p0"].completion, add_special_tokens=False)
    assert ids.index(end_id) > 5
    assert recs["p0"].reasoning_tokens == ids.index(end_id)  # before the first </think> id
    assert recs["p0"].has_think_end and recs["p0"].reasoning_source == "token_ids"
    assert recs["p0"].correct
    # no </think>: truncated, every token counts, and the sample says so
    n1 = len(tok.encode(recs["p1"].completion, add_special_tokens=False))
    assert recs["p1"].reasoning_tokens == n1 and not recs["p1"].has_think_end
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["think_end_id"] == end_id
    summary = write_report(tmp_path / "run", plots=False).summary_md.read_text()
    assert f"id {end_id}" in summary and "estimated" not in summary
    assert "1 sample(s) have no `</think>`" in summary


def test_character_estimate_is_the_labelled_fallback(tmp_path: Path, grader: Grader) -> None:
    with FakeServer() as srv:  # no /tokenize, no token ids: a non-vLLM endpoint
        res = _sweep(srv, tmp_path / "run", grader, SamplingConfig())
        assert all("return_token_ids" not in b for b in srv.requests)
    assert {r.reasoning_source for r in res.records} == {"chars"}
    rep = write_report(tmp_path / "run", plots=False)
    summary = rep.summary_md.read_text()
    assert "**estimated from characters**" in summary
    assert "| ≈" in summary  # the reasoning-token cell is marked
    assert rep.metrics[0].reasoning_estimated == 2


def test_think_end_id_by_hand_needs_no_tokenize(tmp_path: Path, grader: Grader) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(make_r1_tokenizer(tmp_path / "tok", opens_think=False))
    end_id = tok.convert_tokens_to_ids(THINK_CLOSE)
    with _token_server(tok, False) as srv:
        srv.routes.clear()
        res = _sweep(srv, tmp_path / "run", grader, SamplingConfig(), think_end_id=end_id)
    assert {r.reasoning_source for r in res.records} == {"token_ids"}


def test_an_old_run_folder_still_resumes(tmp_path: Path, grader: Grader) -> None:
    """A config.json written before the protocol keys existed means the default prompt."""
    out = tmp_path / "run"
    out.mkdir()
    old = {
        "model": "fake-model",
        "temperature": 0.6,
        "top_p": 0.95,
        "max_tokens": 4096,
        "samples": 1,
        "seed": None,
        "system_prompt": None,
        "extra_body": {},
        "prompt_template": f"{INSTRUCTION}\n{{problem}}",
    }
    (out / "config.json").write_text(json.dumps(old))
    with FakeServer() as srv:
        _sweep(srv, out, grader, SamplingConfig(), resume=True, think_end_id=None)
        with pytest.raises(SweepConfigError, match="Problem:"):
            _sweep(srv, out, grader, SamplingConfig(prompt="paper"), resume=True, think_end_id=None)


def test_recipe_config_file_sets_the_paper_protocol(tmp_path: Path) -> None:
    opts = load_config_file(PAPER_CONFIG)
    s = SamplingConfig.model_validate(
        {k: v for k, v in opts.items() if k in SamplingConfig.model_fields}
    )
    assert (s.prompt, s.temperature, s.top_p, s.max_tokens) == ("paper", 0.6, 0.95, 32768)
    assert s.stop_strings == ["Problem:"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"max_tokenz": 5}))
    with pytest.raises(UsageError, match="max_tokenz"):
        load_config_file(bad)


def test_eval_cli_reads_config_and_the_command_line_wins(tmp_path: Path) -> None:
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p.model_dump()) + "\n" for p in make_problems(2)))
    with FakeServer() as srv:
        rc = eval_main(
            [
                "--config",
                str(PAPER_CONFIG),
                "--base-url",
                srv.base_url,
                "--model",
                "fake-model",
                "--dataset",
                str(data),
                "--max-tokens",
                "64",
                "--concurrency",
                "2",
                "--out",
                str(tmp_path / "out"),
                "-q",
                "--no-plots",
            ]
        )
        bodies = list(srv.requests)
    assert rc == 0
    assert len(bodies) == 2
    assert all(b["stop"] == ["Problem:"] and b["max_tokens"] == 64 for b in bodies)
    assert all(b["messages"][0]["content"].endswith("\nAnswer:") for b in bodies)
