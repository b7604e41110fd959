"""The optional LLM judge: math-verify first; the judge (a scripted endpoint) decides only the
answers math-verify cannot parse, and every verdict is logged with its sample."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeServer, chat_response

from benchmarks.client import EndpointError
from benchmarks.eval import main as eval_main
from benchmarks.grading import Grader
from benchmarks.judge import JudgeConfig, parse_verdict
from benchmarks.problems import Problem
from benchmarks.results import read_log
from benchmarks.runner import run_sweep
from benchmarks.sweep import BASELINE

# (id, gold, what the model boxes): p0, p1 math-verify decides; p2-p4 it cannot parse
CASES = [
    ("p0", "5", "5"),
    ("p1", "\\text{red}", "\\text{blue}"),
    ("p2", "the North Pole", "north pole"),
    ("p3", "the North Pole", "south pole"),
    ("p4", "a \\& b", "b \\& a"),
]


def _chat(body: dict[str, Any], text: str) -> tuple[int, dict[str, Any]]:
    return 200, chat_response(body["model"], text)


def _model(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    user = body["messages"][-1]["content"]
    pid = re.search(r"\[(p\d)\]", user).group(1)  # type: ignore[union-attr]
    boxed = next(b for i, _, b in CASES if i == pid)
    return _chat(body, f"<think>Thinking.</think>\n\\boxed{{{boxed}}}")


def _judge(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    prompt = body["messages"][-1]["content"]
    sub = re.search(r"Submitted answer: (.*)", prompt).group(1)  # type: ignore[union-attr]
    reply = {
        "north pole": "<think>yes or no? no...</think>Same place.\nYes",
        "south pole": "Opposite ends.\nNo",
    }.get(sub, "I cannot tell.")
    return _chat(body, reply)


def _problems() -> list[Problem]:
    return [Problem(id=i, problem=f"[{i}] Where?", answer=g) for i, g, _ in CASES]


@pytest.fixture(scope="module")
def grader() -> Any:
    with Grader(workers=1) as g:
        yield g


def test_parse_verdict() -> None:
    assert parse_verdict("Yes") == "yes"
    assert parse_verdict("They match.\nNo") == "no"
    assert parse_verdict("<think>No, wait: yes</think>\nYes") == "yes"
    assert parse_verdict("<think>yes</think> hmm") == "unclear"
    assert parse_verdict("Yesterday") == "unclear"


def test_judge_decides_only_what_math_verify_cannot_parse(tmp_path: Path, grader: Grader) -> None:
    with FakeServer(respond=_model) as srv, FakeServer(respond=_judge, model_name="judge") as jd:
        res = run_sweep(
            srv.base_url,
            "fake-model",
            _problems(),
            {BASELINE: None},
            out_dir=tmp_path,
            progress=False,
            think_end_id=None,
            grader=grader,
            judge=JudgeConfig(url=jd.base_url, model="judge"),
        )
        asked = [
            re.search(r"Submitted answer: (.*)", b["messages"][0]["content"]).group(1)  # type: ignore[union-attr]
            for b in jd.requests
        ]
    assert sorted(asked) == ["b \\& a", "north pole", "south pole"]
    recs = {r.problem_id: r for r in read_log(tmp_path / "samples.jsonl").records.values()}
    assert recs["p0"].correct and recs["p0"].grade_method == "string"
    assert not recs["p1"].correct and recs["p1"].grade_method == "math_verify"
    assert recs["p0"].judge_verdict is None and recs["p1"].judge_verdict is None
    assert recs["p2"].correct and recs["p2"].grade_method == "judge"
    assert recs["p2"].judge_verdict == "yes" and recs["p2"].judge_response.endswith("Yes")  # type: ignore[union-attr]
    assert not recs["p3"].correct and recs["p3"].judge_verdict == "no"
    # an unclear judge leaves math-verify's string verdict standing, and says so
    assert recs["p4"].judge_verdict == "unclear" and recs["p4"].grade_method == "unparsed"
    assert not recs["p4"].correct
    assert len(res.records) == 5
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["judge"]["model"] == "judge" and "api_key" not in cfg["judge"]


def test_without_a_judge_nothing_is_asked(tmp_path: Path, grader: Grader) -> None:
    with FakeServer(respond=_model) as srv:
        res = run_sweep(
            srv.base_url,
            "fake-model",
            _problems(),
            {BASELINE: None},
            out_dir=tmp_path,
            progress=False,
            think_end_id=None,
            grader=grader,
        )
    recs = {r.problem_id: r for r in res.records}
    assert recs["p2"].grade_method == "unparsed" and not recs["p2"].correct
    assert all(r.judge_verdict is None for r in res.records)


def test_an_unusable_judge_stops_before_any_request(tmp_path: Path) -> None:
    with FakeServer(respond=_model) as srv, FakeServer(respond=_judge, model_name="judge") as jd:
        with pytest.raises(EndpointError, match="judge"):
            run_sweep(
                srv.base_url,
                "fake-model",
                _problems(),
                {BASELINE: None},
                out_dir=tmp_path,
                progress=False,
                think_end_id=None,
                judge=JudgeConfig(url=jd.base_url, model="no-such-judge"),
            )
        assert srv.requests == []


def test_judge_options_go_together(tmp_path: Path) -> None:
    rc = eval_main(["--judge-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path), "-q"])
    assert rc == 2
