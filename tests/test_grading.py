"""Answer extraction, equivalence and the time-bounded grading pool."""

from __future__ import annotations

import json
import time

import pytest
from helpers.fake_endpoint import sleepy_check

from benchmarks.grading import (
    Grader,
    answer_is_line,
    check_extracted,
    extract_answer,
    grade_completion,
    last_boxed,
    math_verify_equal,
    normalize_for_vote,
    parse_number,
)
from sae_training import data_file


# ------------------------------------------------------------------ extraction
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\boxed {x^{2}}", "x^{2}"),
        ("\\boxed{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        # a truncated last box must not yield half an expression
        ("\\boxed{5} and finally \\boxed{\\frac{1}{", "5"),
        ("no box here", None),
        ("\\boxed{unclosed", None),
    ],
)
def test_last_boxed(text: str, expected: str | None) -> None:
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("blah\nThe answer is 12.", "12"),
        ("The final answer is $\\frac{3}{4}$.", "\\frac{3}{4}"),
        ("Answer: 7", "7"),
        ("the answer is 3\nWait, no.\nSo the answer is 5.", "5"),
        ("nothing to see", None),
    ],
)
def test_answer_is_fallback(text: str, expected: str | None) -> None:
    assert answer_is_line(text) == expected


def test_box_wins_over_answer_line() -> None:
    assert extract_answer("The answer is 3. Actually \\boxed{4}") == "4"
    assert extract_answer("\\boxed{} The answer is 9") == "9"  # empty box is no answer


def test_no_answer_is_wrong_not_an_error() -> None:
    g = grade_completion("I give up.", "3")
    assert (g.extracted, g.correct, g.method) == (None, False, "no_answer")


# --------------------------------------------------------------- equivalence
@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("\\frac12", "0.5", True),
        ("\\dfrac{1}{2}", "\\frac{1}{2}", True),
        ("2\\sqrt{2}", "\\sqrt{8}", True),
        ("\\{1,2\\}", "\\{2,1\\}", True),
        ("x^2+2x+1", "(x+1)^2", True),
        ("x=3", "3", True),
        ("\\text{(C)}", "C", True),
        ("(1,3]", "[1,3)", False),
        ("3", "4", False),
        ("12", "1,2", False),
    ],
)
def test_math_equivalence(pred: str, gold: str, ok: bool) -> None:
    assert check_extracted(pred, gold, "math").correct is ok


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("1,000", "1000", True),
        ("\\$18.00", "18", True),
        ("18 \\text{ dollars}", "18", True),
        ("50\\%", "50", True),
        ("18", "19", False),
        ("\\frac{36}{2}", "18", True),  # not a plain number: math-verify decides
    ],
)
def test_numeric_equivalence(pred: str, gold: str, ok: bool) -> None:
    assert check_extracted(pred, gold, "numeric").correct is ok


def test_parse_number_rejects_lists() -> None:
    assert parse_number("1,2") is None
    assert parse_number("12,345.5") == parse_number("12345.5")
    assert normalize_for_vote("\\dfrac{1}{2}") == normalize_for_vote("\\frac{1}{2}")
    assert normalize_for_vote("18.0") == normalize_for_vote("18")


# ------------------------------------------------------------ gold answers
def _math500() -> list[dict[str, str]]:
    path = data_file("math500.jsonl")
    if not path.is_file():
        pytest.skip(f"{path} not available")
    return [json.loads(line) for line in path.open()]


def test_math500_gold_solutions_grade_correct_through_pool() -> None:
    """All 500 gold solutions, extracted and graded as a model completion would be."""
    recs = _math500()
    assert len(recs) == 500
    with Grader(workers=2) as g:
        grades = g.grade_many([(r["solution"], r["answer"], "math") for r in recs])
    acc = sum(x.correct for x in grades) / len(grades)
    assert acc >= 0.99, [
        (r["answer"], x) for r, x in zip(recs, grades, strict=True) if not x.correct
    ]


def test_math500_gold_agrees_under_math_verify_alone() -> None:
    """Without the string shortcut: math-verify itself accepts >= 99% of boxed gold vs answer."""
    recs = _math500()
    ok = 0
    for r in recs:
        ext = last_boxed(r["solution"])
        assert ext is not None
        ok += math_verify_equal(ext, r["answer"])[0]
    assert ok / len(recs) >= 0.99


def test_gsm8k_gold_answers_compare_numerically() -> None:
    path = data_file("gsm8k_test.jsonl")
    if not path.is_file():
        pytest.skip(f"{path} not available")
    recs = [json.loads(line) for line in path.open()][:300]
    for r in recs:
        # the dataset's own "#### N" line, read back as a model's final answer
        final = r["answer"].split("####")[-1].strip()
        n = parse_number(final)
        assert n is not None and n == parse_number(r["final_answer"]), r["id"]
        g = check_extracted(f"{int(n):,}" if n == int(n) else final, r["final_answer"], "numeric")
        assert g.correct and g.method == "numeric"


# ------------------------------------------------------------- time bounds
def test_pathological_input_is_bounded() -> None:
    with Grader(workers=1, timeout_s=1, hard_timeout_s=10) as g:
        t0 = time.monotonic()
        res = g.grade("\\boxed{9^{9^{9^{9^{9}}}}}", "1")
        assert time.monotonic() - t0 < 10
        assert res.correct is False


def test_hung_check_is_killed_and_pool_recovers() -> None:
    with Grader(workers=1, hard_timeout_s=1.0, check=sleepy_check) as g:
        t0 = time.monotonic()
        res = g.grade("\\boxed{1}", "1")
        assert res.method == "timeout" and not res.correct
        assert time.monotonic() - t0 < 5
        res2 = g.grade("\\boxed{2}", "2")  # a fresh worker took over (and hangs again)
        assert res2.method == "timeout"
    with Grader(workers=1) as g:
        assert g.grade("\\boxed{2}", "2").correct
