"""``sae-steer vocab``: rank candidate reasoning words (:mod:`~sae_training.features.vocab_derivation`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sae_steer_vllm.command import CommandConfig, run_model_command
from sae_steer_vllm.files import atomic_write_json
from sae_training.features.vocab_derivation import (
    DEFAULT_GENERAL,
    DEFAULT_NONREASONING,
    DEFAULT_REASONING,
    Source,
    derive_vocabulary,
    to_vocab_json,
)
from sae_training.features.vocabulary import load_vocabulary

PROG = "sae-steer vocab"
_SOURCES: dict[str, Any] = {"cli": {"metavar": "FILE:FIELD"}}


class VocabCommand(CommandConfig):
    """Rank words (and word pairs) by how much more often they occur in reasoning traces than
    in non-reasoning solutions, drop words common in general text, and print the top
    candidates with their counts. '*' marks the paper's vocabulary.
    """

    reasoning: list[str] = Field(DEFAULT_REASONING, json_schema_extra=_SOURCES)
    """reasoning text"""
    nonreasoning: list[str] = Field(DEFAULT_NONREASONING, json_schema_extra=_SOURCES)
    """non-reasoning text"""
    general: list[str] = Field(DEFAULT_GENERAL, json_schema_extra=_SOURCES)
    """general text (common words are dropped)"""
    top: int = Field(30, gt=0)
    """candidates to print"""
    min_count: int = Field(20, ge=1)
    """min occurrences in reasoning text"""
    max_general_rate: float = Field(1e-3, gt=0)
    """drop words more frequent than this (per word) in the general corpus"""
    ngram: Literal[1, 2, 3] = 2
    """longest word n-gram"""
    max_docs: int | None = None
    """read at most this many records per file"""
    out: Path | None = None
    """write the candidates as a vocabulary JSON"""


def _run(cmd: VocabCommand) -> int:
    cands = derive_vocabulary(
        [Source.parse(s) for s in cmd.reasoning],
        [Source.parse(s) for s in cmd.nonreasoning],
        [Source.parse(s) for s in cmd.general],
        top=cmd.top,
        min_count=cmd.min_count,
        max_general_rate=cmd.max_general_rate,
        ngram=cmd.ngram,
        max_docs=cmd.max_docs,
    )
    paper = set(load_vocabulary())
    print(
        f"{'rank':>4}  {'word':<22} {'ratio':>8} {'reasoning':>10} {'non-reas.':>10} {'general':>9}"
    )
    for i, c in enumerate(cands, 1):
        mark = "*" if c.word in paper else " "
        print(
            f"{i:>4} {mark}{c.word:<22} {c.ratio:>8.2f} {c.count_reasoning:>10} "
            f"{c.count_nonreasoning:>10} {c.count_general:>9}"
        )
    found = sorted(paper & {c.word for c in cands})
    print(f"\npaper's groups among the top {len(cands)}: {', '.join(found) or 'none'}")
    if cmd.out:
        atomic_write_json(cmd.out, to_vocab_json([c.word for c in cands]))
        print(f"wrote {cmd.out}")
    return 0


def main(argv: list[str]) -> int:
    """``sae-steer vocab [options]``: options are the fields of :class:`VocabCommand`."""
    return run_model_command(PROG, VocabCommand, _run, argv)
