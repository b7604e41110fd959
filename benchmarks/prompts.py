"""What a problem looks like to the model: the prompt styles and their stop strings.

Two styles for open-answer problems (``--prompt``), each a user-message template plus the
stop strings that belong to it, because a prompt and its stop are one protocol:

- ``paper``: the authors' harness for arXiv 2503.18878 (the instruction, then
  ``Problem: ...`` and ``Answer:``), sent as the user message through the chat template,
  generation stopped at ``Problem:`` (the completion-style scaffold would otherwise invite
  the model to write the next problem).
- ``default``: DeepSeek-R1's usage-note instruction, a newline, the problem; no stop. It
  is the default because it carries no completion-style scaffold whose stop string can cut
  a trace that restates the problem, it is what every run before the paper protocol used
  (their ``config.json`` stays resumable), and the demo's recorded numbers were made with it.

Multiple-choice problems (:mod:`benchmarks.multiple_choice`) always use simple-evals' query
(``MULTICHOICE_TEMPLATE``) and no stop: that prompt is part of the GPQA protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PromptStyle = Literal["paper", "default"]

DEFAULT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_PROMPT_TEMPLATE = DEFAULT_INSTRUCTION + "\n{problem}"
PAPER_PROMPT_TEMPLATE = DEFAULT_INSTRUCTION + "\nProblem: {problem}\nAnswer:"
PAPER_STOP = ("Problem:",)

MULTICHOICE_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should "
    "be of the following format: 'Answer: $LETTER' (without quotes) where LETTER is one of "
    "{letters}. Think step by step before answering.\n\n{question}\n\n{options}"
)
"""openai/simple-evals ``common.QUERY_TEMPLATE_MULTICHOICE``, with the letters and option lines
filled in for the number of choices (for four choices the text is simple-evals', byte for byte;
``tests/test_eval_multiple_choice.py`` checks it)."""


@dataclass(frozen=True)
class PromptPreset:
    """A user-message template (``{problem}`` is replaced) and the stop strings sent with it."""

    template: str
    stop: tuple[str, ...] = ()


PROMPT_STYLES: dict[str, PromptPreset] = {
    "paper": PromptPreset(PAPER_PROMPT_TEMPLATE, PAPER_STOP),
    "default": PromptPreset(DEFAULT_PROMPT_TEMPLATE, ()),
}


def fill_template(template: str, problem: str) -> str:
    """``{problem}`` replaced by the problem text (nothing else in the template is touched)."""
    return template.replace("{problem}", problem)


def choice_letters(n: int) -> str:
    """``"ABCD"`` for 4 choices; up to 26."""
    if not 2 <= n <= 26:
        raise ValueError(f"a multiple-choice item needs 2 to 26 choices, not {n}")
    return "".join(chr(ord("A") + i) for i in range(n))


def format_multichoice(question: str, choices: list[str]) -> str:
    """simple-evals' multiple-choice query for ``choices`` in the order shown."""
    letters = choice_letters(len(choices))
    options = "\n".join(f"{letter}) {c}" for letter, c in zip(letters, choices, strict=True))
    return MULTICHOICE_TEMPLATE.format(letters=letters, question=question, options=options)
