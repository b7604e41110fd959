"""``sae-steer explain``'s parts: prompts and answer parsing, scoring and its interval, the
log, the LLM client's budget and concurrency, and a whole run against a scripted judge
whose answers make every score exact (:mod:`helpers.explain_judge`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from helpers.explain_judge import FILLERS, NO_EXPLANATION_WORD, UNCLEAR_WORD, WORDS, judge
from helpers.fake_endpoint import FakeModel, FakeServer, chat_response

from benchmarks.client import RetryPolicy
from benchmarks.interpret.explain_log import ExplainLog
from benchmarks.interpret.explain_prompts import (
    EXPLANATION_REGEX,
    parse_explanation,
    parse_verdicts,
    render,
    verdicts_regex,
)
from benchmarks.interpret.explain_report import distribution, write_summary
from benchmarks.interpret.explainer import ExplainRun, ExplainSettings, explain_features
from benchmarks.interpret.llm import LLM, LLMBudgetExhausted, LLMConfig, LLMRequestError
from benchmarks.interpret.scoring import (
    JudgeItem,
    balanced_accuracy_ci,
    fuzzing_items,
    score_verdicts,
)
from sae_steer_vllm.constants import EXPLAIN_SCORES_PLOT
from sae_steer_vllm.errors import UsageError
from sae_training.features.contexts import Context, FeatureContexts

VOCAB = FILLERS + WORDS  # token id -> word
WORD_ID = {w: len(FILLERS) + i for i, w in enumerate(WORDS)}


def decode(ids: Sequence[int]) -> str:
    return "".join(" " + VOCAB[i] for i in ids)


def _ctx(word: str | None, at: int, salt: int, n: int = 6) -> Context:
    ids = [(salt * 3 + p) % len(FILLERS) for p in range(n)]
    acts = [0.0] * n
    if word is not None:
        ids[at] = WORD_ID[word]
        acts[at] = 1.0 + salt / 10
    return Context(tuple(ids), tuple(acts))


def contexts_for(feature: int, word: str | None) -> FeatureContexts:
    """Feature ``feature`` fires on ``word`` only: 3 explain, 6 held-out, 5 silent contexts
    (``word`` None: a feature that never fired)."""
    if word is None:
        return FeatureContexts(feature, (), (), ())
    return FeatureContexts(
        feature,
        tuple(_ctx(word, 2, s) for s in range(3)),
        tuple(_ctx(word, 1 + s % 4, 10 + s) for s in range(6)),
        tuple(_ctx(None, 0, 20 + s) for s in range(5)),
    )


def test_render_marks_runs_and_defuses_marks_in_the_text() -> None:
    ctx = Context((0, 8, 9, 1), (0.0, 1.0, 2.0, 0.0))
    assert render(ctx, decode, [1, 2]) == " the <<apple river>> and"
    hostile = Context((0,), (0.0,))
    assert render(hostile, lambda ids: "a<<b>>c") == "a< <b> >c"


def test_parse_explanation_is_lenient_but_never_guesses() -> None:
    assert parse_explanation("<think>Explanation: no</think>\nExplanation: the word 'x'") == (
        "the word 'x'"
    )
    assert parse_explanation("**Explanation:** Numbers in a sum.") == "Numbers in a sum."
    assert parse_explanation("Commas between clauses") == "Commas between clauses"
    # what SmolLM2-135M answered on a real run: a bare label, and the instruction copied back
    assert parse_explanation("Answer:") is None
    assert parse_explanation("Explanation: Answer:") is None
    assert parse_explanation("Numbers") is None
    echo = "The feature detects the concept, word, or pattern that the marked tokens and their "
    assert parse_explanation(f"Explanation: {echo}contexts have in common.") is None
    assert parse_explanation('Explanation: "Negation words"') == "Negation words"
    assert parse_explanation("Explanation: <your explanation>") is None
    assert parse_explanation("I looked.\nHard to say.") is None
    assert parse_explanation("") is None


def test_parse_verdicts_takes_the_last_list_of_the_right_length() -> None:
    assert parse_verdicts("[1, 0]\nfinal: [0, 1, 1]", 3) == [0, 1, 1]
    assert parse_verdicts("<think>[1,1,1]</think> [0,0,0]", 3) == [0, 0, 0]
    assert parse_verdicts("1 0 1", 3) == [1, 0, 1]
    assert parse_verdicts("[1, 0]", 3) is None
    assert parse_verdicts("[1, 2, 0]", 3) is None
    assert parse_verdicts("yes, no, yes", 3) is None


def test_balanced_accuracy_and_its_interval() -> None:
    ba, lo, hi = balanced_accuracy_ci(6, 6, 5, 5)
    p, q = 7 / 8, 6 / 7  # one success and one failure added per class
    half = 1.959963984540054 * 0.5 * math.sqrt(p * (1 - p) / 8 + q * (1 - q) / 7)
    assert ba == 1.0 and hi == 1.0 and lo == pytest.approx((p + q) / 2 - half)
    ba, lo, hi = balanced_accuracy_ci(3, 4, 1, 2)
    assert ba == pytest.approx((0.75 + 0.5) / 2) and lo < ba < hi
    with pytest.raises(ValueError):
        balanced_accuracy_ci(1, 1, 0, 0)


def test_interval_covers_the_true_balanced_accuracy() -> None:
    """Seeded simulation at the sizes used (10 per class): the 95% interval covers the
    true value at least ~95% of the time."""
    rng = random.Random(0)
    for tpr, tnr in ((0.8, 0.7), (0.95, 0.9), (0.5, 0.5)):
        hits = 0
        for _ in range(2000):
            a = sum(rng.random() < tpr for _ in range(10))
            b = sum(rng.random() < tnr for _ in range(10))
            _, lo, hi = balanced_accuracy_ci(a, 10, b, 10)
            hits += lo <= (tpr + tnr) / 2 <= hi
        assert hits / 2000 >= 0.94, (tpr, tnr, hits)


def test_unreadable_answers_count_wrong_and_are_counted() -> None:
    items = [JudgeItem("a", True, "p"), JudgeItem("b", False, "n")]
    both = [items, items]
    s = score_verdicts(both, [[1, 0], None])
    assert s is not None
    assert (s.n_positive, s.n_negative, s.n_unclear) == (2, 2, 1)
    assert s.balanced_accuracy == 0.5
    assert score_verdicts([items[:1]], [[1]]) is None  # one class only: nothing to balance


def test_fuzzing_decoys_mark_as_many_silent_tokens() -> None:
    fc = contexts_for(0, "apple")
    items = fuzzing_items(fc, decode, seed=0)
    assert sum(i.fits for i in items) == 6 and sum(not i.fits for i in items) == 6
    for it in items:
        marks = [m for m in it.text.split() if m.startswith("<<")]
        assert len(marks) == 1 and (marks[0] == "<<apple>>") == it.fits
    assert items == fuzzing_items(fc, decode, seed=0)
    assert items != fuzzing_items(fc, decode, seed=1)


def test_log_resumes_by_key_and_prompt(tmp_path: Path) -> None:
    path = tmp_path / "log.jsonl"
    log = ExplainLog(path, resume=False)
    log.put(("explain", 3, 0), "prompt", "answer")
    with path.open("a") as f:
        f.write('{"kind": "explain", "feature": 4, "ite')  # a line cut short by a crash
    again = ExplainLog(path)
    assert again.get(("explain", 3, "0")) == "answer"
    assert again.get(("explain", 3, 0), "prompt") == "answer"
    assert again.get(("explain", 3, 0), "another prompt") is None
    assert again.get(("detection", 3, 0)) is None and again.n_bad_lines == 1
    with pytest.raises(UsageError, match="--resume"):
        ExplainLog(path, resume=False)


def _cfg(srv: FakeServer, **kw: object) -> LLMConfig:
    return LLMConfig.model_validate({"url": srv.base_url, "model": srv.model_name, **kw})


def test_budget_counts_requests_not_retries_and_concurrency_is_bounded() -> None:
    fast = RetryPolicy(max_attempts=4, base_delay_s=0.01, max_delay_s=0.02)

    async def go(srv: FakeServer) -> list[str]:
        llm = LLM(_cfg(srv, max_requests=3, concurrency=2, api_key="secret"), retry=fast)
        assert "secret" not in repr(llm.cfg) and "api_key" not in llm.cfg.model_dump()
        try:
            first = await llm.ask("P0: what is 0 + 1?")  # 503 twice, then answered
            rest = await asyncio.gather(*(llm.ask(f"P{i}: what is 1 + 1?") for i in (1, 2)))
            with pytest.raises(LLMBudgetExhausted):
                await llm.ask("P3: what is 1 + 1?")
            assert llm.requests_made == 3
            return [first, *rest]
        finally:
            await llm.close()

    model = FakeModel(fail_first={"P0": 2}, delay_s=0.2)
    with FakeServer(model) as srv:
        answers = asyncio.run(go(srv))
        assert len(srv.requests) == 5 and srv.max_in_flight <= 2
    assert all("boxed" in a for a in answers)


@pytest.mark.parametrize(
    ("owner", "constrain", "expect"),
    [("vllm", "auto", True), (None, "auto", False), ("vllm", "off", False), (None, "on", True)],
)
def test_answers_are_constrained_on_a_vllm_endpoint_only(
    owner: str | None, constrain: str, expect: bool
) -> None:
    """auto sends vLLM's structured outputs only to a server that lists itself as vLLM;
    the regex / schema sent is the one given, and a call without one sends none."""

    async def go(srv: FakeServer) -> bool:
        llm = LLM(_cfg(srv, constrain=constrain))
        try:
            await llm.check()
            await llm.ask("P0: what is 0 + 1?", regex=verdicts_regex(3))
            await llm.ask("P1: what is 1 + 1?", json_schema={"type": "object"})
            await llm.ask("P2: what is 2 + 1?")
            return llm.constrained
        finally:
            await llm.close()

    with FakeServer() as srv:
        srv.owned_by = owner
        assert asyncio.run(go(srv)) is expect
        sent = [r.get("structured_outputs") for r in srv.requests]
    if expect:
        assert sent == [{"regex": r"\[[01], [01], [01]\]"}, {"json": {"type": "object"}}, None]
    else:
        assert sent == [None, None, None]


def test_a_constrained_answer_cut_at_the_token_limit_is_an_error_not_an_answer() -> None:
    """A structured answer that stopped at max_tokens (or the context length) is unfinished
    JSON / an unfinished list: the caller gets the reason, never a silently unreadable text."""

    def cut(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        out = chat_response("fake-model", '{"weakening": "2.')
        out["choices"][0]["finish_reason"] = "length"
        return 200, out

    async def go(srv: FakeServer, constrain: str) -> str:
        llm = LLM(_cfg(srv, constrain=constrain))
        try:
            return await llm.ask("describe", json_schema={"type": "object"})
        finally:
            await llm.close()

    with FakeServer(respond=cut) as srv:
        with pytest.raises(LLMRequestError, match="cut at the token limit"):
            asyncio.run(go(srv, "on"))
        assert asyncio.run(go(srv, "off")) == '{"weakening": "2.'  # free text: parsed later


def test_the_constraints_match_what_the_parsers_read() -> None:
    """Every answer the verdict regex allows is read back exactly; the explanation regex
    allows only lines :func:`parse_explanation` reads (or rejects as an echo or a label)."""
    for n in (1, 2, 5):
        for bits in itertools.product((0, 1), repeat=n):
            answer = "[" + ", ".join(map(str, bits)) + "]"
            assert re.fullmatch(verdicts_regex(n), answer)
            assert parse_verdicts(answer, n) == list(bits)
        assert not re.fullmatch(verdicts_regex(n), "[" + ", ".join(["1"] * (n + 1)) + "]")
    line = "Explanation: the word 'wait' when the writer doubts a step"
    assert re.fullmatch(EXPLANATION_REGEX, line)
    assert parse_explanation(line) == "the word 'wait' when the writer doubts a step"
    assert not re.fullmatch(EXPLANATION_REGEX, "Explanation: <your explanation>")
    with pytest.raises(ValueError):
        verdicts_regex(0)


def _run(srv: FakeServer, log: ExplainLog, feats: list[FeatureContexts], **kw: int) -> ExplainRun:
    async def go() -> ExplainRun:
        llm = LLM(_cfg(srv, **kw))
        try:
            return await explain_features(llm, log, feats, decode, ExplainSettings(batch_size=4))
        finally:
            await llm.close()

    return asyncio.run(go())


FEATURES = [contexts_for(f, w) for f, w in enumerate(WORDS)] + [contexts_for(9, None)]


def test_scores_are_exact_against_the_scripted_judge(tmp_path: Path) -> None:
    with FakeServer(respond=judge) as srv:
        run = _run(srv, ExplainLog(tmp_path / "log.jsonl"), FEATURES)
        n_requests = len(srv.requests)
    status = {o.feature: o.status for o in run.outcomes}
    assert status == {0: "done", 1: "done", 2: "done", 3: "done", 4: "done"} | {
        5: "no_explanation",
        9: "no_contexts",
    }
    by = {e.feature: e for e in run.done}
    for f, word in enumerate(WORDS[:5]):
        e = by[f]
        assert e.explanation == f'the word "{word}"'
        assert e.detection is not None and e.fuzzing is not None
        assert (e.detection.n_positive, e.detection.n_negative) == (6, 5)
        assert (e.fuzzing.n_positive, e.fuzzing.n_negative) == (6, 6)
        want = 1.0 if f % 2 == 0 else 0.0
        assert e.fuzzing.balanced_accuracy == want and e.fuzzing.n_unclear == 0
        if word == UNCLEAR_WORD:  # every detection answer unreadable: all counted wrong
            assert e.detection.balanced_accuracy == 0.0 and e.detection.n_unclear == 3
        else:
            assert e.detection.balanced_accuracy == want and e.detection.n_unclear == 0
        assert e.detection.ci_low <= e.detection.balanced_accuracy <= e.detection.ci_high
    # 5 features x (1 explanation + 3 detection + 3 fuzzing prompts) + 1 explanation
    assert run.requests_made == n_requests == 36
    assert WORDS[5] == NO_EXPLANATION_WORD
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(lines) == 36 and {x["kind"] for x in lines} == {"explain", "detection", "fuzzing"}
    summary = write_summary(tmp_path, run, {"explainer": "fake"}, tmp_path / "e.json")
    text = summary.read_text()
    assert 'the word \\"' not in text and '| 0 | the word "apple" | 1.00 [' in text
    assert "feature 5: no_explanation" in text and "feature 9: no_contexts" in text
    assert (tmp_path / EXPLAIN_SCORES_PLOT).stat().st_size > 1000
    d = distribution([e.fuzzing.balanced_accuracy for e in run.done if e.fuzzing])
    assert d is not None and d.mean == pytest.approx(3 / 5) and d.median == 1.0
    assert 0.0 <= d.ci_low <= d.mean <= d.ci_high <= 1.0
    two = distribution([0.0, 0.5])  # two features: the interval stays inside [0, 1]
    assert two is not None and 0.0 <= two.ci_low <= two.ci_high <= 0.5


def test_budget_stop_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    with FakeServer(respond=judge) as srv:
        whole = _run(srv, ExplainLog(tmp_path / "whole.jsonl"), FEATURES)
        log = tmp_path / "parts.jsonl"
        part = _run(srv, ExplainLog(log), FEATURES, max_requests=10, concurrency=3)
        assert part.requests_made == 10 and part.budget_exhausted
        assert len(part.done) < len(whole.done)
        n_before = len(srv.requests)
        rest = _run(srv, ExplainLog(log), FEATURES)
        assert rest.requests_made == len(srv.requests) - n_before == 36 - 10
        assert rest.answers_reused == 10
    assert rest.done == whole.done and not rest.budget_exhausted
