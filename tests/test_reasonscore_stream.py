"""The corpus stream the scorer reads: windows, token budget, same-length batches."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.corpora import write_jsonl

from sae_training.tokens import CorpusSpec, StreamReport, iter_batches, iter_windows


class WordTokenizer:
    """One token per whitespace-separated word, ids = word lengths (enough for the stream)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, Any]:
        ids = [len(w) for w in text.split()]
        return {"input_ids": ([0] if add_special_tokens else []) + ids}


def _corpus(tmp: Path, lengths: list[int]) -> Path:
    return write_jsonl(
        tmp / "c.jsonl",
        [{"text": " ".join(["ab"] * n)} for n in lengths] + [{"text": "   "}, {"other": 1}],
    )


def test_windows_cut_documents_and_respect_the_budget(tmp_path: Path) -> None:
    path = _corpus(tmp_path, [9, 3, 12])  # +1 BOS each: 10, 4, 13 tokens
    report = StreamReport()
    spec = CorpusSpec(path, kind="text", ctx=4, burn_in=0)
    wins = list(iter_windows(WordTokenizer(), spec, report))
    assert [len(w.ids) for w in wins] == [4, 4, 2, 4, 4, 4, 4, 1]
    assert [w.doc_id for w in wins] == [0, 0, 0, 1, 2, 2, 2, 2]
    assert [w.seq_id for w in wins] == list(range(8))
    assert report.n_tokens == 27 and len(report.skipped) == 2  # blank text, missing column
    budget = list(
        iter_windows(
            WordTokenizer(), CorpusSpec(path, kind="text", ctx=4, max_tokens=11, burn_in=0)
        )
    )
    assert [len(w.ids) for w in budget] == [4, 4, 2, 1]


def test_burn_in_windows_overlap_and_count_each_token_once(tmp_path: Path) -> None:
    """With burn-in b, windows of a document step by ctx - b; each counts its positions
    >= b, so every document token from position b on is counted once, after b tokens."""
    path = _corpus(tmp_path, [9, 3, 12])  # 10, 4, 13 tokens
    spec = CorpusSpec(path, kind="text", ctx=6, burn_in=2)
    report = StreamReport()
    wins = list(iter_windows(WordTokenizer(), spec, report))
    # doc 0 needs no window at 8: its 2 tokens would be burn-in only
    assert [(w.doc_id, w.start, len(w.ids)) for w in wins] == [
        (0, 0, 6),
        (0, 4, 6),
        (1, 0, 4),
        (2, 0, 6),
        (2, 4, 6),
        (2, 8, 5),
    ]
    for doc, n in ((0, 10), (1, 4), (2, 13)):
        counted = [
            w.start + p for w in wins if w.doc_id == doc for p in range(w.counted_from, len(w.ids))
        ]
        assert counted == list(range(2, n)), doc  # each once, none before position 2
    assert all(w.counted_from == 2 for w in wins)
    assert report.n_tokens == sum(len(w.ids) for w in wins) and report.n_burn_in == 2 * len(wins)
    # the default: 16 tokens, a quarter of a short window; old metadata means no burn-in
    assert CorpusSpec(path, ctx=1024).burn_in == 16 and CorpusSpec(path, ctx=24).burn_in == 6
    assert CorpusSpec.from_metadata(spec.to_metadata()) == spec
    assert CorpusSpec.from_metadata({"path": str(path), "ctx": 8}).burn_in == 0


def test_batches_hold_one_length_and_every_window_once(tmp_path: Path) -> None:
    path = _corpus(tmp_path, [9, 3, 12, 7, 8])
    spec = CorpusSpec(path, kind="text", ctx=4)
    wins = list(iter_windows(WordTokenizer(), spec))
    batches = list(iter_batches(iter(wins), 3, full_len=4))
    assert sorted(w.seq_id for b in batches for w in b) == [w.seq_id for w in wins]
    for b in batches:
        assert len({len(w.ids) for w in b}) == 1 and len(b) <= 3
        if len(b[0].ids) != 4:
            assert len(b) == 1  # a document's tail goes alone
    assert max(len(b) for b in batches) == 3


def test_bad_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        CorpusSpec(tmp_path / "x.jsonl", kind="html")
    with pytest.raises(ValueError):
        CorpusSpec(tmp_path / "x.jsonl", ctx=1)
    with pytest.raises(ValueError):
        CorpusSpec(tmp_path / "x.jsonl", max_tokens=0)
    with pytest.raises(ValueError, match="burn_in"):
        CorpusSpec(tmp_path / "x.jsonl", ctx=8, burn_in=5)
    with pytest.raises(ValueError):
        list(iter_batches(iter([]), 0, full_len=4))
