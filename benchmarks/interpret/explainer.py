"""Explain features and score the explanations: the work of ``sae-steer explain``.

Per feature: one explainer request on its top-activating contexts
(:func:`~benchmarks.interpret.explain_prompts.explain_prompt`), then the judge's detection
and fuzzing batches on held-out contexts (:mod:`~benchmarks.interpret.scoring`), all
features concurrently under the LLM's semaphore. Every answer goes through the log
(:class:`~benchmarks.interpret.explain_log.ExplainLog`) first, so a resumed run asks only
what is missing and reaches the same result as an uninterrupted one.

The run stops cleanly, keeping every finished feature, when the request budget is spent
(those features are "remaining") or the endpoint goes away (:class:`EndpointError`: the
features not finished are "failed" with its message, and the caller exits 3).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from benchmarks.client import EndpointError
from benchmarks.interpret.explain_log import ExplainLog
from benchmarks.interpret.explain_prompts import (
    EXPLANATION_REGEX,
    Decode,
    detection_prompt,
    explain_prompt,
    fuzzing_prompt,
    parse_explanation,
    parse_verdicts,
    verdicts_regex,
)
from benchmarks.interpret.llm import LLM, LLMBudgetExhausted, LLMRequestError
from benchmarks.interpret.scoring import (
    JudgeItem,
    batches,
    detection_items,
    fuzzing_items,
    score_verdicts,
)
from sae_training.features.contexts import FeatureContexts
from sae_training.features.explanations import ExplanationScore, FeatureExplanation

Status = Literal["done", "no_contexts", "no_explanation", "remaining", "failed"]


@dataclass(frozen=True)
class ExplainSettings:
    """How the prompts are built (the LLM's own settings live in its config)."""

    seed: int = 0
    """shuffles the judge's contexts and picks the fuzzing decoys"""
    batch_size: int = 5
    """contexts per judge prompt"""
    explain_max_tokens: int | None = None
    """answer budget of the explainer (None: the LLM config's)"""
    judge_max_tokens: int | None = None


@dataclass(frozen=True)
class FeatureOutcome:
    feature: int
    status: Status
    result: FeatureExplanation | None = None
    error: str | None = None


@dataclass
class ExplainRun:
    """What a run produced: every feature's outcome, in the order asked."""

    outcomes: list[FeatureOutcome]
    requests_made: int = 0
    answers_reused: int = 0
    endpoint_error: str | None = None

    def with_status(self, status: Status) -> list[FeatureOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def done(self) -> list[FeatureExplanation]:
        return [o.result for o in self.outcomes if o.result is not None]

    @property
    def budget_exhausted(self) -> bool:
        return bool(self.with_status("remaining"))


@dataclass
class _Asker:
    """The LLM behind the log: a logged answer to the same prompt is never asked again."""

    llm: LLM
    log: ExplainLog
    reused: int = 0
    stopped: list[str] = field(default_factory=list)

    async def ask(
        self, key: tuple[str, int, str], prompt: str, max_tokens: int | None, regex: str
    ) -> str:
        cached = self.log.get(key, prompt)
        if cached is not None:
            self.reused += 1
            return cached
        if self.stopped:  # the endpoint went away: fail fast instead of retrying each
            raise EndpointError(self.stopped[0])
        try:
            answer = await self.llm.ask(prompt, max_tokens=max_tokens, regex=regex)
        except EndpointError as e:
            self.stopped.append(str(e))
            raise
        self.log.put(key, prompt, answer)
        return answer


async def _judge(
    asker: _Asker,
    kind: Literal["detection", "fuzzing"],
    feature: int,
    explanation: str,
    groups: list[list[JudgeItem]],
    max_tokens: int | None,
) -> list[list[int] | None]:
    build = detection_prompt if kind == "detection" else fuzzing_prompt
    prompts = [build(explanation, [it.text for it in g]) for g in groups]
    answers = await asyncio.gather(
        *(
            asker.ask((kind, feature, str(j)), p, max_tokens, verdicts_regex(len(g)))
            for j, (p, g) in enumerate(zip(prompts, groups, strict=True))
        ),
        return_exceptions=True,
    )
    for a in answers:  # every request ran to its end (and was logged) before we raise
        if isinstance(a, BaseException):
            raise a
    return [parse_verdicts(str(a), len(g)) for a, g in zip(answers, groups, strict=True)]


async def explain_feature(
    asker: _Asker, fc: FeatureContexts, decode: Decode, settings: ExplainSettings
) -> FeatureOutcome:
    """One feature: explanation, then detection and fuzzing scores."""
    f = fc.feature
    if not fc.explain:
        return FeatureOutcome(f, "no_contexts", error="the feature never fired in the corpus")
    try:
        prompt = explain_prompt(fc.explain, decode)
        answer = await asker.ask(
            ("explain", f, "0"), prompt, settings.explain_max_tokens, EXPLANATION_REGEX
        )
        explanation = parse_explanation(answer)
        if explanation is None:
            return FeatureOutcome(f, "no_explanation", error=f"unreadable answer: {answer[:200]!r}")
        det = batches(detection_items(fc, decode, settings.seed), settings.batch_size)
        fuzz = batches(fuzzing_items(fc, decode, settings.seed), settings.batch_size)
        jt = settings.judge_max_tokens
        det_v, fuzz_v = await asyncio.gather(
            _judge(asker, "detection", f, explanation, det, jt),
            _judge(asker, "fuzzing", f, explanation, fuzz, jt),
            return_exceptions=True,
        )
        for r in (det_v, fuzz_v):
            if isinstance(r, BaseException):
                raise r
    except LLMBudgetExhausted:
        return FeatureOutcome(f, "remaining")
    except (LLMRequestError, EndpointError) as e:
        return FeatureOutcome(f, "failed", error=str(e))
    assert not isinstance(det_v, BaseException) and not isinstance(fuzz_v, BaseException)
    detection: ExplanationScore | None = score_verdicts(det, det_v)
    fuzzing = score_verdicts(fuzz, fuzz_v)
    result = FeatureExplanation(
        feature=f, explanation=explanation, detection=detection, fuzzing=fuzzing
    )
    return FeatureOutcome(f, "done", result=result)


async def explain_features(
    llm: LLM,
    log: ExplainLog,
    contexts: Sequence[FeatureContexts],
    decode: Decode,
    settings: ExplainSettings = ExplainSettings(),
    *,
    progress: bool = False,
) -> ExplainRun:
    """Explain and score every feature in ``contexts`` (see the module docstring)."""
    from tqdm import tqdm

    asker = _Asker(llm, log)
    made0 = llm.requests_made
    bar = tqdm(total=len(contexts), desc="explain", unit="feature", disable=not progress)

    async def one(fc: FeatureContexts) -> FeatureOutcome:
        out = await explain_feature(asker, fc, decode, settings)
        bar.update(1)
        return out

    try:
        outcomes = await asyncio.gather(*(one(fc) for fc in contexts))
    finally:
        bar.close()
    return ExplainRun(
        outcomes=list(outcomes),
        requests_made=llm.requests_made - made0,
        answers_reused=asker.reused,
        endpoint_error=asker.stopped[0] if asker.stopped else None,
    )
