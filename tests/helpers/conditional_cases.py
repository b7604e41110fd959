"""The conditional-steering cases the engine checks run, with their reference results.

Each case is a prompt (an R1 chat prompt that opened ``<think>``, one that did not, or one
that opened and closed it), a spec template and a marker plan. :func:`build_cases` resolves
each template against the reference (:mod:`helpers.conditional_reference`):

* condition thresholds (``"$name"`` placeholders) are put in the widest gap of the condition
  feature's own values near a quantile, so that a gate is never within 1e-3 of a tie;
* ``logit_bias`` on ``</think>`` (and, for ``"start"`` plans, first on ``<think>``) makes the
  first marker appear mid-stream, with margins of 1e-3;
* the reference generation is kept only if every greedy choice wins by ``MIN_MARGIN``
  (else vLLM's float32 rounding could pick the other token); otherwise the next prompt is
  tried.

The result is plain JSON (``Case.to_json``), so one reference serves several engine runs.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from functools import cache
from typing import Any

from .conditional_reference import ConditionalReference, Generation, with_marker_at
from .r1_tokenizer import THINK_CLOSE, THINK_OPEN, r1_tokenizer

MIN_MARGIN = 2e-4
"""Smallest top-1 minus top-2 logit gap accepted at any reference step."""
COND_MARGIN = 1e-3
"""Smallest distance of a condition feature to its threshold accepted at any position."""

MESSAGES = [
    "What is 17 times 3? Think it through.",
    "Name three primary colours and explain why.",
    "Write a haiku about rain on a tin roof.",
    "Is 221 a prime number?",
    "Sort the words pear, apple, fig alphabetically.",
    "How many legs do two spiders have?",
]
LONG_MESSAGE = " ".join(MESSAGES) * 4
"""A user message whose prompt spans several KV blocks (the prefix-cache check)."""
REASONING = "Let me think. Seventeen times three is fifty-one."


@dataclass
class Case:
    """One request and what the reference generated for it."""

    name: str
    prompt: list[int]
    spec: dict[str, Any]
    bias: dict[int, float]
    ids: list[int]
    logprobs: list[float]
    margins: list[float]
    min_margin: float
    cond_margin: float
    first_start: int | None
    first_end: int | None
    gates_on: list[int]
    gates_off: list[int]
    never_on: list[int]
    steer_shift: float
    gate_shift: float

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["bias"] = {str(k): v for k, v in self.bias.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Case:
        return cls(**{**d, "bias": {int(k): v for k, v in d["bias"].items()}})


@cache
def _tokenizer(opens_think: bool) -> Any:
    return r1_tokenizer(opens_think=opens_think)


def prompt_ids(kind: str, message: str) -> list[int]:
    """``open``: the R1 template whose generation prompt opens ``<think>``; ``plain``: the
    January-2025 one (no opening); ``closed``: ``open`` plus reasoning and ``</think>``."""
    tok = _tokenizer(kind != "plain")
    text = tok.apply_chat_template(
        [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
    )
    if kind == "closed":
        text += REASONING + THINK_CLOSE + "\n\n"
    return list(tok(text, add_special_tokens=False)["input_ids"])


def marker_ids() -> tuple[int, int]:
    tok = _tokenizer(True)
    return int(tok.convert_tokens_to_ids(THINK_OPEN)), int(tok.convert_tokens_to_ids(THINK_CLOSE))


def templates(layer: int, d_model: int) -> list[dict[str, Any]]:
    """The cases: name, prompt kind, marker plan (``end``, ``start+end`` or none), spec
    template with ``"$t"`` thresholds, ``quantiles`` of each threshold (intervention index,
    quantile) and the interventions that must never fire (``never_on``)."""
    s_clamp = {"sae": "s", "feature": 3, "value": 6.0}
    s_add = {"sae": "s", "feature": 5, "value": 4.0, "mode": "add"}
    vec = [((i * 37) % 11 - 5) / 5.0 * 0.3 for i in range(d_model)]
    return [
        {
            "name": "thinking_opened_prompt",
            "kind": "open",
            "plan": "end",
            "spec": {"positions": "thinking", "interventions": [s_clamp]},
        },
        {
            "name": "answer_with_vector",
            "kind": "open",
            "plan": "end",
            "spec": {
                "positions": "answer",
                "interventions": [s_add, {"layer": max(layer - 1, 0), "vector": vec}],
            },
        },
        {
            "name": "per_intervention_positions_generated_think",
            "kind": "plain",
            "plan": "start+end",
            "spec": {
                "positions": "prompt",
                "interventions": [
                    {**s_clamp, "positions": "thinking"},
                    {**s_add, "positions": "answer"},
                    {"sae": "s", "feature": 7, "mode": "scale", "factor": 3.0, "positions": "all"},
                    {"sae": "s", "feature": 9, "value": 3.0},  # the request's: prompt only
                ],
            },
        },
        {
            "name": "window_and_conditions",
            "kind": "open",
            "plan": "end",
            "spec": {
                "positions": "generated",
                "interventions": [
                    {**s_add, "window": [2, 12], "when": {"sae": "c", "feature": 2, "above": "$a"}},
                    {**s_clamp, "when": {"sae": "s", "feature": 7, "below": "$b"}},
                ],
            },
            "quantiles": {"$a": (0, 0.5), "$b": (1, 0.5)},
        },
        {
            "name": "scale_band_no_opening",
            "kind": "plain",
            "plan": "end",
            "spec": {
                "interventions": [
                    {
                        "sae": "s",
                        "feature": 7,
                        "mode": "scale",
                        "factor": 0.0,
                        "positions": "answer",
                    },
                    {
                        "sae": "s",
                        "feature": 3,
                        "mode": "scale",
                        "factor": 3.0,
                        "when": {"sae": "c", "feature": 4, "above": "$lo", "below": "$hi"},
                    },
                    {**s_add, "positions": "thinking"},  # nothing opened: never fires
                ],
            },
            "quantiles": {"$lo": (1, 0.3), "$hi": (1, 0.7)},
            "never_on": [2],
        },
        {
            "name": "prompt_closed_reasoning",
            "kind": "closed",
            "plan": "",
            "spec": {
                "interventions": [
                    {**s_clamp, "positions": "answer", "window": [None, 8]},
                    {**s_add, "positions": "thinking"},
                ],
            },
        },
        {
            "name": "window_open_end",
            "kind": "open",
            "plan": "end",
            "spec": {"interventions": [{**s_add, "window": [5, None]}]},
        },
        {
            "name": "answer_scale_up",
            "kind": "open",
            "plan": "end",
            "spec": {
                "positions": "answer",
                "interventions": [{"sae": "s", "feature": 7, "mode": "scale", "factor": 3.0}],
            },
        },
    ]


def _fill(obj: Any, thr: dict[str, float]) -> Any:
    if isinstance(obj, str) and obj.startswith("$"):
        return thr[obj]
    if isinstance(obj, dict):
        return {k: _fill(v, thr) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, thr) for v in obj]
    return obj


def _thresholds(gen: Generation, quantiles: dict[str, tuple[int, float]]) -> dict[str, float]:
    """Each threshold in the widest gap (of at least twice the margin) between the sorted
    condition values near its quantile, searching wider if there is none; a band's upper
    bound stays above its lower one. No gap at all: the quantile itself (the run fails)."""
    out: dict[str, float] = {}
    floor: dict[int, float] = {}
    for name, (k, q) in quantiles.items():
        v = sorted(gen.trace.cond_values[k])
        n = len(v)
        out[name] = q + floor.get(k, 0.0)
        for width in (0.2, 0.45):
            lo, hi = max(int((q - width) * n), 0), min(int((q + width) * n), n - 1)
            ok = [
                j
                for j in range(lo, hi)
                if v[j + 1] - v[j] >= 2 * COND_MARGIN and v[j] > floor.get(k, -float("inf"))
            ]
            if ok:
                j = max(ok, key=lambda i: v[i + 1] - v[i])
                out[name] = (v[j] + v[j + 1]) / 2
                floor[k] = out[name]
                break
    return out


def _generate(
    ref: ConditionalReference, t: dict[str, Any], prompt: list[int], spec: Any, n: int
) -> Generation:
    start, end = marker_ids()
    if t["plan"] == "end":
        return with_marker_at(ref, prompt, spec, n, end, 2, min(10, n - 3), watch=[start])
    if t["plan"] == "start+end":
        first = with_marker_at(ref, prompt, spec, n, start, 1, 4, watch=[end])
        k = first.first(start)
        assert k is not None
        return with_marker_at(
            ref, prompt, spec, n, end, k + 2, min(12, n - 3), base_bias=first.bias
        )
    return ref.generate(prompt, spec, n)


def build_case(
    ref: ConditionalReference, t: dict[str, Any], max_tokens: int, messages: list[str] = MESSAGES
) -> Case:
    """The first prompt (of ``messages``) on which ``t`` resolves with safe margins."""
    from sae_steer_vllm.spec import SteeringSpec

    failures = []
    quantiles: dict[str, tuple[int, float]] = t.get("quantiles", {})
    for message in messages:
        prompt = prompt_ids(t["kind"], message)
        thr = {name: q for name, (_k, q) in quantiles.items()}  # valid guesses
        if quantiles:  # a plain run to see the condition features' values
            probe = ref.generate(prompt, SteeringSpec.from_obj(_fill(t["spec"], thr)), max_tokens)
            thr = _thresholds(probe, quantiles)
        gen = None
        for _attempt in range(2):
            try:
                spec = SteeringSpec.from_obj(_fill(copy.deepcopy(t["spec"]), thr))
                run = _generate(ref, t, prompt, spec, max_tokens)
            except (ValueError, AssertionError) as e:
                failures.append(f"{message[:20]}: {e}")
                break
            if run.trace.cond_margin >= COND_MARGIN:
                gen = run
                break
            thr = _thresholds(run, quantiles)
        if gen is None:
            failures.append(f"{message[:20]}: no prompt/threshold fits (margin {COND_MARGIN})")
            continue
        if min(gen.margins) < MIN_MARGIN:
            failures.append(f"{message[:20]}: greedy margin {min(gen.margins)}")
            continue
        start, end = marker_ids()
        plain = ref.teacher_forced(gen, None)
        free = ref.teacher_forced(gen, spec, ignore_gates=True)
        return Case(
            name=t["name"],
            prompt=prompt,
            spec=spec.model_dump(mode="json", exclude_none=True),
            bias=gen.bias,
            ids=gen.ids,
            logprobs=gen.logprobs,
            margins=gen.margins,
            min_margin=min(gen.margins),
            cond_margin=gen.trace.cond_margin,
            first_start=gen.first(start),
            first_end=gen.first(end),
            gates_on=gen.trace.on,
            gates_off=gen.trace.off,
            never_on=t.get("never_on", []),
            steer_shift=max(abs(a - b) for a, b in zip(plain, gen.logprobs)),
            gate_shift=max(abs(a - b) for a, b in zip(free, gen.logprobs)),
        )
    raise ValueError(f"case {t['name']}: no prompt fits: {failures}")


def build_cases(ref: ConditionalReference, layer: int, d_model: int, max_tokens: int) -> list[Case]:
    return [build_case(ref, t, max_tokens) for t in templates(layer, d_model)]


__all__ = [
    "COND_MARGIN",
    "LONG_MESSAGE",
    "MESSAGES",
    "MIN_MARGIN",
    "Case",
    "build_case",
    "build_cases",
    "marker_ids",
    "prompt_ids",
    "templates",
]
