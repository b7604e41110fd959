"""A scripted explainer and judge for ``sae-steer explain`` tests, whose scores are exact.

Every feature of the test data fires on exactly one word (``WORDS[f]``) and nowhere else.
The explainer names the word it sees marked; the judge checks each excerpt against the
word in the explanation, answering correctly for words at even positions of ``WORDS`` and
the opposite for odd ones, so the balanced accuracies are exactly 1.0 and 0.0. Two words
script failures: the judge's detection answers about ``UNCLEAR_WORD`` are unreadable, and
the explainer's answer about ``NO_EXPLANATION_WORD`` has no explanation in it.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from helpers.fake_endpoint import Reply, chat_response

WORDS = ["apple", "river", "green", "music", "house", "seven"]
FILLERS = ["the", "and", "of", "to", "a", "in", "is", "was"]
UNCLEAR_WORD = "house"
NO_EXPLANATION_WORD = "seven"

_EXCERPT = re.compile(r"^Excerpt \d+: (.*?)(?=\n\nExcerpt \d+: |\n\nAnswer with)", re.S | re.M)


def expected_accuracy(word: str) -> float:
    return 1.0 if WORDS.index(word) % 2 == 0 else 0.0


def judge(body: dict[str, Any]) -> Reply:
    """The scripted model (a ``FakeServer`` ``respond``)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    model = body["model"]
    if user.startswith("We are studying"):
        examples = "\n".join(ln for ln in user.splitlines() if ln.startswith("Example "))
        marked = Counter(m.strip() for m in re.findall(r"<<(.*?)>>", examples))
        word = marked.most_common(1)[0][0]
        if word == NO_EXPLANATION_WORD:
            return 200, chat_response(model, "These examples are hard to describe.\nSorry.")
        text = f'<think>All marks are on one word.</think>\nExplanation: the word "{word}"'
        return 200, chat_response(model, text)
    found = re.search(r'the word "(\w+)"', user)
    assert found, user
    word = found.group(1)
    excerpts = _EXCERPT.findall(user)
    assert excerpts, user
    if "are marked with" in user:  # fuzzing
        fits = [
            bool(marks := re.findall(r"<<(.*?)>>", e)) and all(m.strip() == word for m in marks)
            for e in excerpts
        ]
    else:
        if word == UNCLEAR_WORD:
            return 200, chat_response(model, "It depends on the context, I cannot say.")
        fits = [re.search(rf"\b{word}\b", e) is not None for e in excerpts]
    invert = expected_accuracy(word) == 0.0
    verdicts = ", ".join(str(int(f != invert)) for f in fits)
    return 200, chat_response(model, f"Judging each excerpt.\n[{verdicts}]")
