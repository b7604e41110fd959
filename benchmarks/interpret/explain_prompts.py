"""What the explainer and the judge are shown, and how their answers are read.

Contexts become text with the model's own tokenizer; tokens are marked ``<<like this>>``
(consecutive marked tokens share one pair of marks, decoded together so multi-byte
characters survive). Answers are read leniently but never guessed: a reasoning model's
``<think>`` part is dropped, the explanation is the last ``Explanation:`` line (or a lone
short line), and a judge's verdicts are the last ``[1, 0, ...]`` list of the right length;
anything else is "unclear" (:func:`parse_verdicts` returns None) and the caller counts it
as wrong.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

from sae_training.features.contexts import Context

Decode = Callable[[Sequence[int]], str]
"""token ids -> text (the tokenizer's ``decode``)."""

OPEN, CLOSE = "<<", ">>"
MAX_EXPLANATION_CHARS = 300
TOP_TOKENS_SHOWN = 5


def firing_positions(ctx: Context) -> list[int]:
    """Positions where the feature is active (activation > 0)."""
    return [i for i, a in enumerate(ctx.acts) if a > 0]


def render(ctx: Context, decode: Decode, marked: Iterable[int] = ()) -> str:
    """The context as text, with the tokens at ``marked`` positions inside ``<<`` ``>>``.

    Marks already in the text are defused (``<<`` -> ``< <``) so only ours are seen."""
    mark = set(marked)
    parts: list[str] = []
    run: list[int] = []
    run_marked = False
    for i, tid in enumerate(ctx.token_ids):
        m = i in mark
        if run and m != run_marked:
            parts.append(_piece(decode(run), run_marked))
            run = []
        run.append(tid)
        run_marked = m
    if run:
        parts.append(_piece(decode(run), run_marked))
    return "".join(parts)


def _piece(text: str, marked: bool) -> str:
    text = text.replace(OPEN, "< <").replace(CLOSE, "> >")
    if not marked:
        return text
    core = text.strip()  # marks hug the word; the spacing stays outside them
    if not core:
        return text
    lead = text[: len(text) - len(text.lstrip())]
    trail = text[len(text.rstrip()) :]
    return f"{lead}{OPEN}{core}{CLOSE}{trail}"


def _top_tokens(ctx: Context, decode: Decode) -> str:
    order = sorted(firing_positions(ctx), key=lambda i: -ctx.acts[i])[:TOP_TOKENS_SHOWN]
    return ", ".join(f"{decode([ctx.token_ids[i]]).strip()!r} ({ctx.acts[i]:.2f})" for i in order)


def explain_prompt(contexts: Sequence[Context], decode: Decode) -> str:
    """The explainer's prompt: every context with its firing tokens marked, strongest first."""
    lines = [
        "We are studying one feature of a language model's internal representation. Below "
        "are text excerpts where the feature is active. In each excerpt the tokens on which "
        f"it fires are marked with {OPEN} and {CLOSE}; after each excerpt its strongest "
        "tokens are listed with their activation.",
        "",
        "Write a short explanation (one sentence, at most 20 words) of what the feature "
        "detects: the concept, word, or pattern that the marked tokens and their contexts "
        "have in common. Do not list the examples.",
        "",
    ]
    for n, ctx in enumerate(contexts, 1):
        lines.append(f"Example {n}: {render(ctx, decode, firing_positions(ctx))}")
        lines.append(f"Strongest tokens: {_top_tokens(ctx, decode)}")
        lines.append("")
    lines.append("End your answer with one line of the form:")
    lines.append("Explanation: <your explanation>")
    return "\n".join(lines)


def _numbered(texts: Sequence[str]) -> str:
    return "\n\n".join(f"Excerpt {n}: {t}" for n, t in enumerate(texts, 1))


def _answer_format(n: int) -> str:
    example = ", ".join(["1", "0"] * n)[: 3 * n - 2]
    return (
        f"Answer with a list of exactly {n} numbers in square brackets, one per excerpt in "
        f"order: 1 if it fits, 0 if it does not (for example [{example}]). Nothing else."
    )


def detection_prompt(explanation: str, texts: Sequence[str]) -> str:
    """Judge: which of these (unmarked) excerpts would the explained feature fire on?"""
    return "\n".join(
        [
            "A feature of a language model has been explained as follows:",
            f'"{explanation}"',
            "",
            f"Below are {len(texts)} text excerpts. For each one, decide from the explanation "
            "alone whether the feature is active somewhere in the excerpt.",
            "",
            _numbered(texts),
            "",
            _answer_format(len(texts)),
        ]
    )


def fuzzing_prompt(explanation: str, texts: Sequence[str]) -> str:
    """Judge: are the marked tokens of each excerpt the ones the explanation describes?"""
    return "\n".join(
        [
            "A feature of a language model has been explained as follows:",
            f'"{explanation}"',
            "",
            f"In each of the {len(texts)} excerpts below some tokens are marked with {OPEN} "
            f"and {CLOSE}. For each excerpt, decide whether the marked tokens are ones on "
            "which the explained feature would fire.",
            "",
            _numbered(texts),
            "",
            _answer_format(len(texts)),
        ]
    )


def final_text(answer: str) -> str:
    """The answer without a reasoning model's thinking (everything up to the last
    ``</think>``; :mod:`benchmarks.client` puts a parsed-off trace back in front)."""
    return answer.rsplit("</think>", 1)[-1].strip()


EXPLANATION_REGEX = r"Explanation: [^\n<>]{8,200}"
"""The explainer's answer as a constrained endpoint must write it (one line, read by
:func:`parse_explanation`; no ``<`` so the template's placeholder cannot be echoed)."""


def verdicts_regex(n: int) -> str:
    """The judge's answer as a constrained endpoint must write it: ``[1, 0, ...]`` with
    exactly ``n`` entries (read by :func:`parse_verdicts`)."""
    if n <= 0:
        raise ValueError("a judge prompt has at least one excerpt")
    return r"\[[01]" + "".join([r", [01]"] * (n - 1)) + r"\]"


_EXPLANATION = re.compile(r"^[\s>*_#-]*explanation[\s*_]*[:：]\s*(.*)$", re.I | re.M)


def parse_explanation(answer: str) -> str | None:
    """The explanation in an explainer's answer, or None when there is none."""
    text = final_text(answer)
    found = [m.group(1) for m in _EXPLANATION.finditer(text) if m.group(1).strip(" *_\"'`")]
    if found:
        exp = found[-1]
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        if len(lines) != 1 or len(lines[0]) > MAX_EXPLANATION_CHARS:
            return None
        exp = lines[0]
    exp = exp.strip().strip("*_`").strip()
    if len(exp) >= 2 and (exp[0], exp[-1]) in (('"', '"'), ("'", "'"), ("“", "”")):
        exp = exp[1:-1].strip()  # quoted as a whole
    if not exp or exp.startswith("<"):  # empty, or the template's placeholder echoed
        return None
    if exp.endswith(":") or len(re.findall(r"\w+", exp)) < 2:  # a label, not an explanation
        return None
    if _normal(exp) in _INSTRUCTION:  # the instruction sentence copied back
        return None
    return exp[:MAX_EXPLANATION_CHARS]


def _normal(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


_INSTRUCTION = _normal(
    "the feature detects the concept, word, or pattern that the marked tokens and their "
    "contexts have in common"
)
"""What a weak explainer echoes from :func:`explain_prompt`'s instruction (seen from
SmolLM2-135M): never an explanation of a feature."""


_LIST = re.compile(r"\[([^\[\]]*)\]")


def parse_verdicts(answer: str, n: int) -> list[int] | None:
    """The judge's ``n`` verdicts (0/1) from its answer: the last bracketed list of exactly
    ``n`` zeros and ones (or a bare answer that is just that list); None when unreadable."""
    text = final_text(answer)
    candidates = [m.group(1) for m in _LIST.finditer(text)] or [text]
    for body in reversed(candidates):
        items = [t for t in re.split(r"[\s,;]+", body.strip()) if t]
        if len(items) == n and all(t in ("0", "1") for t in items):
            return [int(t) for t in items]
    return None
