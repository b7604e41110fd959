"""Metrics: reasoning length, vocabulary rate, pass@1 / maj@n and the paired bootstrap."""

from __future__ import annotations

import math

import pytest

from benchmarks.metrics import (
    GradedSample,
    bootstrap_mean,
    count_reasoning_words,
    estimate_reasoning_tokens,
    majority_correct,
    paired_bootstrap,
    split_reasoning,
    summarize,
)


def s(
    pid: str,
    i: int,
    correct: bool,
    ans: str | None = "1",
    tokens: int = 10,
    reasoning: int = 8,
    words: int = 1,
) -> GradedSample:
    return GradedSample(
        problem_id=pid,
        sample_index=i,
        correct=correct,
        extracted_answer=ans,
        completion_tokens=tokens,
        reasoning_tokens=reasoning,
        reasoning_words=words,
    )


def test_reasoning_split_and_token_estimate() -> None:
    text = "a" * 75 + "</think>" + "b" * 17
    before, found = split_reasoning(text)
    assert found and before == "a" * 75
    assert estimate_reasoning_tokens(text, 100) == 75
    # no </think>: every token is reasoning (truncated trace or a non-reasoning model)
    assert estimate_reasoning_tokens("just text", 42) == 42
    # the paper counts up to the *first* </think> (a later one is answer text quoting it)
    assert split_reasoning("x</think>y</think>z")[0] == "x"


def test_reasoning_word_count_uses_vocabulary_forms() -> None:
    text = "Wait, let me see. Hmm... but But Another Waiting awaits Therefore, Let me; perhaps."
    # Wait, let me, Hmm, But, Another, Therefore, Let me, perhaps ("but" is not in the list;
    # "Waiting"/"awaits" are other words)
    assert count_reasoning_words(text) == 8
    assert count_reasoning_words("Maybe maybe MAYBE", ["maybe"]) == 1


def test_majority_vote() -> None:
    assert majority_correct([s("p", 0, False, "2"), s("p", 1, True, "1"), s("p", 2, True, "1.0")])
    # tie: the answer seen first wins
    assert not majority_correct([s("p", 0, False, "2"), s("p", 1, True, "1")])
    # samples without an answer do not vote
    assert majority_correct([s("p", 0, False, None), s("p", 1, False, None), s("p", 2, True, "1")])
    assert not majority_correct([s("p", 0, False, None)])


def test_summarize_hand_computed() -> None:
    samples = [
        s("a", 0, True, tokens=10, reasoning=5, words=1),
        s("a", 1, False, "9", tokens=30, reasoning=30, words=2),
        s("b", 0, False, None, tokens=20, reasoning=20, words=0),
        s("b", 1, False, None, tokens=40, reasoning=40, words=1),
    ]
    m = summarize("ds", "x", samples, n_errors=3)
    assert m.n_problems == 2 and m.n_samples == 4 and m.n_errors == 3
    assert m.pass_at_1 == pytest.approx((0.5 + 0.0) / 2)
    assert m.maj_at_n == pytest.approx(0.5)  # a: tie "1" first -> correct; b: no votes
    assert m.mean_completion_tokens == pytest.approx(25)
    assert m.mean_reasoning_tokens == pytest.approx(23.75)
    assert m.reasoning_word_rate == pytest.approx(100 * 4 / 100)
    assert m.no_answer_rate == pytest.approx(0.5)
    empty = summarize("ds", "y", [], n_errors=2)
    assert math.isnan(empty.pass_at_1) and empty.n_problems == 0


def test_bootstrap_mean_does_not_depend_on_the_order_of_the_values() -> None:
    """A report rebuilt from the log (file order) must equal the run's (completion order)."""
    values = [float((7 * i) % 11) for i in range(40)]
    est = bootstrap_mean(values, seed=3)
    assert bootstrap_mean(list(reversed(values)), seed=3) == est
    assert est.mean == pytest.approx(sum(values) / 40) and est.lo < est.mean < est.hi


def test_paired_bootstrap() -> None:
    base = {f"p{i}": float(i % 2) for i in range(40)}
    same = paired_bootstrap(base, base)
    assert same is not None and (same.diff, same.lo, same.hi) == (0.0, 0.0, 0.0)

    # treated is better on 10 of 40 problems, never worse: diff 0.25, CI excludes 0
    treated = dict(base)
    for i in range(0, 20, 2):
        treated[f"p{i}"] = 1.0
    ci = paired_bootstrap(treated, base, seed=1)
    assert ci is not None and ci.n_problems == 40
    assert ci.diff == pytest.approx(0.25)
    assert 0 < ci.lo < 0.25 < ci.hi <= 0.5
    assert paired_bootstrap(treated, base, seed=1) == ci  # fixed seed: reproducible
    # pairing: only shared problems count
    ci2 = paired_bootstrap({"p0": 1.0, "zz": 0.0}, base)
    assert ci2 is not None and ci2.n_problems == 1 and ci2.diff == 1.0
    assert paired_bootstrap({"x": 1.0}, base) is None


def test_summarize_degeneration_is_a_mean_over_problems() -> None:
    def d(pid: str, i: int, share: float | None, looped: bool | None) -> GradedSample:
        return s(pid, i, True).model_copy(update={"repeated_ngram_share": share, "looped": looped})

    # a: (0.2 + 0.6) / 2 = 0.4; b: 1.0 (its unmeasured sample is left out, not read as 0)
    samples = [d("a", 0, 0.2, False), d("a", 1, 0.6, False), d("b", 0, 1.0, True)]
    m = summarize("ds", "x", [*samples, d("b", 1, None, None)], seed=3)
    e = m.repeated_ngram_share
    assert e is not None and e.n == 2 and e.mean == pytest.approx(0.7)
    assert 0.4 <= e.lo <= e.mean <= e.hi <= 1.0
    assert m.looped_rate == pytest.approx(1 / 3)
    none = summarize("ds", "y", [d("a", 0, None, None)])
    assert none.repeated_ngram_share is not None and none.repeated_ngram_share.n == 0
    assert math.isnan(none.repeated_ngram_share.mean) and math.isnan(none.looped_rate)
