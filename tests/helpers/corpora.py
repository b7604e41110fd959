"""Corpora for the tests: JSONL writers, synthetic traces and chats, and documents that hit
the edge cases of ReasonScore's masks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# Plain-text documents built to hit the edge cases of the mask definition.
EDGE_TEXTS: list[str] = [
    # word at position 0 and at the very last position: windows clipped at both ends
    "Wait, the sum is 12 and the product is 35 so the answer is 7 hmm",
    # multi-token strings: 'alternatively' -> altern+atively, 'let me', 'therefore' -> there+fore
    "alternatively let me check therefore the value; Let me see. Alternatively x=3.",
    # adjacent / overlapping windows of different groups, and one group twice in a row
    "Maybe wait maybe Hmm Wait Wait But Another approach is needed, maybe not.",
    # no vocabulary word at all
    "The quick brown fox jumps over the lazy dog near the river bank at noon.",
    # a long one so windows split it (ctx is small in the tests) and words sit on cuts
    " ".join(["Wait the number of apples is 4 and maybe more."] * 12),
]


def trace_records(n: int = 3) -> list[dict[str, Any]]:
    """Short synthetic reasoning traces (rendered through the chat template: special tokens)."""
    out = []
    for i in range(n):
        out.append(
            {
                "problem": f"What is {i + 2} times {i + 3}?",
                "reasoning": (
                    f"Okay, let me think. {i + 2} times {i + 3}. Hmm, maybe I should add "
                    f"{i + 2} to itself {i + 3} times. Wait, that is {(i + 2) * (i + 3)}. "
                    "Alternatively, use the table. Therefore the answer follows."
                ),
                "answer": f"The answer is {(i + 2) * (i + 3)}.",
            }
        )
    return out


def write_corpus(
    folder: Path, n_chat: int = 60, n_trace: int = 30, bad_lines: bool = False
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    chat, traces = folder / "chat.jsonl", folder / "traces.jsonl"
    with chat.open("w") as f:
        for i in range(n_chat):
            msgs = [
                {
                    "role": "user",
                    "content": f"Question {i}: what is {i} plus {i + 1}? Explain briefly.",
                },
                {
                    "role": "assistant",
                    "content": f"It is {2 * i + 1}, because adding one more to {i} twice gives that.",
                },
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
            if bad_lines and i % 20 == 5:
                f.write("{not json\n\n")
    with traces.open("w") as f:
        for i in range(n_trace):
            rec = {
                "problem": f"Compute {i} squared.",
                "reasoning": f"Hmm, {i} times {i}. Wait, let me check: it is {i * i}.",
                "answer": str(i * i),
            }
            f.write(json.dumps(rec) + "\n")
            if bad_lines and i % 10 == 3:
                f.write(json.dumps({"problem": "no reasoning field"}) + "\n")
    return chat, traces
