"""Multiple choice (GPQA-Diamond's format) on a synthetic set: simple-evals' query, shuffle and
letter, per-line errors, the ``gpqa`` preset, and a sweep against the scripted endpoint."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeServer, chat_response

from benchmarks.grading import grade_choice
from benchmarks.multiple_choice import extract_letter, load_choice_file
from benchmarks.problems import ProblemSetError, load_problems
from benchmarks.prompts import format_multichoice
from benchmarks.runner import run_sweep
from benchmarks.sampling import SamplingConfig
from benchmarks.sweep import BASELINE

# openai/simple-evals common.py QUERY_TEMPLATE_MULTICHOICE, filled in by hand
SIMPLE_EVALS_QUERY = (
    "Answer the following multiple choice question. The last line of your response should be "
    "of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. "
    "Think step by step before answering.\n\nWhat is 2+2?\n\nA) 4\nB) 3\nC) 5\nD) 22"
)


def _items(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"q{i}",
            "question": f"Q{i}: which is right?",
            "choices": [f"RIGHT{i}", f"wrong{i}a", f"wrong{i}b", f"wrong{i}c"],
            "correct": 0,
        }
        for i in range(n)
    ]


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_query_is_simple_evals_text() -> None:
    assert format_multichoice("What is 2+2?", ["4", "3", "5", "22"]) == SIMPLE_EVALS_QUERY


def test_shuffle_is_simple_evals_and_reproducible(tmp_path: Path) -> None:
    f = _write(tmp_path / "mc.jsonl", _items(20))
    a = load_choice_file(f, seed=0).items
    # simple-evals: one random.Random(seed), rng.sample(range(4), 4) per item in file order
    rng = random.Random(0)
    assert [it.order for it in a] == [tuple(rng.sample(range(4), 4)) for _ in range(20)]
    for i, it in enumerate(a):  # the right letter points at the right text
        line = next(x for x in it.query.splitlines() if x.startswith(f"{it.answer}) "))
        assert line == f"{it.answer}) RIGHT{i}"
    assert [it.order for it in load_choice_file(f, seed=0).items] == [it.order for it in a]
    other = [it.order for it in load_choice_file(f, seed=1).items]
    assert other != [it.order for it in a]
    assert len({it.answer for it in a}) > 1  # the right answer is not always A


def test_bad_lines_are_named_and_skipped(tmp_path: Path) -> None:
    good = _items(3)
    rows: list[Any] = [
        good[0],
        "{not json",
        {"question": "q", "choices": ["a", "b"], "correct": 2},
        {"choices": ["a", "b"], "correct": 0},
        {"question": "q", "choices": ["a", "a"], "correct": 0},
        good[1],
        ["a list"],
        good[2],
    ]
    f = _write(tmp_path / "mc.jsonl", rows)
    got = load_choice_file(f)
    assert [it.id for it in got.items] == ["q0", "q1", "q2"]
    assert len(got.errors) == 5
    assert got.errors[0].startswith(f"{f}:2: invalid JSON")
    assert got.errors[1].startswith(f"{f}:3:") and "correct=2" in got.errors[1]
    assert got.errors[2].startswith(f"{f}:4: question:")
    assert got.errors[3].startswith(f"{f}:5:") and "distinct" in got.errors[3]
    assert got.errors[4] == f"{f}:7: expected a JSON object"
    # bad lines take no draw: the good items are shuffled as in a clean file
    clean = load_choice_file(_write(tmp_path / "clean.jsonl", good)).items
    assert [it.order for it in got.items] == [it.order for it in clean]
    lp = load_problems(str(f), kind="choice")
    assert len(lp.problems) == 3 and lp.skipped == 5
    assert any(":3:" in w for w in lp.warnings())


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("Reasoning...\nAnswer: B", "B"),
        ("answer:$C$", "C"),
        ("Answer : \tD", "D"),
        ("Answer: b", "b"),  # simple-evals keeps the case: graded wrong against "B"
        ("<think>Answer: A? no...</think>\nThe last line.\nAnswer: C", "C"),
        ("<think>Maybe Answer: A, running out of", "A"),  # no </think>: the whole text
        ("The answer is (B)", None),
        ("Answer: E", None),  # not a letter of a 4-choice question
    ],
)
def test_letter_extraction(text: str, letter: str | None) -> None:
    assert extract_letter(text, 4) == letter


def test_letter_grading_and_more_choices() -> None:
    assert grade_choice("Answer: B", "B").correct
    assert not grade_choice("Answer: b", "B").correct
    g = grade_choice("nothing", "B")
    assert g.method == "no_answer" and g.extracted is None
    assert extract_letter("Answer: E", 5) == "E"
    assert "one of ABCDE." in format_multichoice("q", ["1", "2", "3", "4", "5"])


def test_gpqa_preset_reads_the_users_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_STEER_DATA", str(tmp_path))
    with pytest.raises(ProblemSetError, match="gated"):
        load_problems("gpqa")
    _write(tmp_path / "gpqa_diamond.jsonl", _items(5))
    lp = load_problems("gpqa", limit=3)
    assert [p.id for p in lp.problems] == ["q0", "q1", "q2"]
    assert all(p.kind == "choice" and p.answer in "ABCD" for p in lp.problems)
    assert lp.problems[0].problem.startswith("Answer the following multiple choice question.")


def _mc_reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """Finds the RIGHT option; says a wrong letter while thinking, the right one after."""
    q = body["messages"][-1]["content"]
    right = re.search(r"^([A-D])\) RIGHT", q, re.M)
    assert right is not None
    wrong = "A" if right.group(1) != "A" else "B"
    text = f"<think>Perhaps Answer: {wrong}. Wait, no.</think>\n\nAnswer: {right.group(1)}"
    return 200, chat_response(body["model"], text, completion_tokens=9)


def test_gpqa_sweep_records_the_shuffle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAE_STEER_DATA", str(tmp_path))
    _write(tmp_path / "gpqa_diamond.jsonl", _items(4))
    problems = load_problems("gpqa", choice_seed=3).problems
    with FakeServer(respond=_mc_reply) as srv:
        res = run_sweep(
            srv.base_url,
            "fake-model",
            problems,
            {BASELINE: None},
            out_dir=tmp_path / "out",
            dataset="gpqa",
            sampling=SamplingConfig(prompt="paper"),
            progress=False,
            think_end_id=None,
            extra_config={"choice_seed": 3},
        )
        bodies = list(srv.requests)
    # simple-evals' query as the only user message, no stop even under the paper prompt
    assert all("stop" not in b for b in bodies)
    assert {b["messages"][0]["content"] for b in bodies} == {p.problem for p in problems}
    rng = random.Random(3)
    orders = {f"q{i}": rng.sample(range(4), 4) for i in range(4)}
    for r in res.records:
        assert r.correct and r.grade_method == "letter" and r.extracted_answer == r.gold_answer
        assert r.choice_order == orders[r.problem_id]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["choice_seed"] == 3
