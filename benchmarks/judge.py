"""An optional LLM judge for the answers math-verify cannot parse.

The paper's authors graded non-integer answers with an LLM. Here math-verify stays first:
only a sample it graded ``unparsed`` (no math expression in the answer or the gold, so it
could only compare strings: "north pole", ``a \\& b``) or ``error`` (it failed on the
input) goes to the judge, which is any OpenAI-compatible chat endpoint
(``--judge-url``, ``--judge-model``). Its verdict decides that sample (``grade_method:
"judge"``), and the verdict and the judge's reply are logged with the sample
(``judge_verdict``, ``judge_response``). An unclear reply or a failed request leaves the
sample wrong, with the verdict ``unclear`` / ``error`` logged, never a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from benchmarks.client import RetryPolicy, chat_once, make_client
from benchmarks.grading import Grade

Verdict = Literal["yes", "no", "unclear", "error"]

JUDGED_METHODS = frozenset({"unparsed", "error"})
"""The math-verify outcomes the judge may overrule: it could not read the answer."""

JUDGE_PROMPT = """\
You are grading the final answer to a math problem against the reference answer.
Decide whether the two are mathematically equivalent (the same value, set, expression or
statement, allowing trivial rewriting and units). Do not solve the problem again.

Problem:
{problem}

Reference answer: {gold}
Submitted answer: {answer}

Reply with exactly one word on the last line: Yes or No."""

_VERDICT_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


class JudgeConfig(BaseModel):
    """Where the judge is and how it is asked (recorded in ``config.json``, key excluded)."""

    model_config = ConfigDict(frozen=True)

    url: str = Field(min_length=1)
    model: str = Field(min_length=1)
    api_key: str = Field(default="EMPTY", exclude=True)
    max_tokens: int = Field(default=1024, ge=1)
    temperature: float = Field(default=0.0, ge=0)


@dataclass(frozen=True)
class JudgeResult:
    verdict: Verdict
    response: str


def parse_verdict(reply: str) -> Verdict:
    """The last "yes"/"no" word of the reply after any ``</think>``; ``unclear`` if none."""
    i = reply.rfind("</think>")
    tail = reply[i + len("</think>") :] if i >= 0 else reply
    words = _VERDICT_RE.findall(tail)
    if not words:
        return "unclear"
    return "yes" if words[-1].lower() == "yes" else "no"


class Judge:
    """One client for the whole run; :meth:`decide` is safe to call concurrently."""

    def __init__(self, cfg: JudgeConfig, *, retry: RetryPolicy = RetryPolicy()) -> None:
        self.cfg = cfg
        self.retry = retry
        self._client: Any = make_client(cfg.url, api_key=cfg.api_key, timeout_s=600)

    async def ask(self, problem: str, gold: str, answer: str) -> JudgeResult:
        prompt = JUDGE_PROMPT.format(problem=problem, gold=gold, answer=answer)
        out = await chat_once(
            self._client,
            self.cfg.model,
            [{"role": "user", "content": prompt}],
            temperature=self.cfg.temperature,
            top_p=1.0,
            max_tokens=self.cfg.max_tokens,
            seed=None,
            spec=None,
            retry=self.retry,
        )
        if out.error is not None:
            return JudgeResult("error", out.error[:500])
        return JudgeResult(parse_verdict(out.text), out.text[-2000:])

    async def decide(
        self, grade: Grade, problem: str, gold: str
    ) -> tuple[Grade, JudgeResult | None]:
        """``grade`` unchanged unless math-verify could not read it; then the judge's verdict."""
        if grade.method not in JUDGED_METHODS or grade.extracted is None:
            return grade, None
        res = await self.ask(problem, gold, grade.extracted)
        if res.verdict in ("yes", "no"):
            return Grade(grade.extracted, res.verdict == "yes", "judge", grade.detail), res
        return grade, res

    async def close(self) -> None:
        await self._client.close()
