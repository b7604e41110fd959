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
    wins = list(iter_windows(WordTokenizer(), CorpusSpec(path, kind="text", ctx=4), report))
    assert [len(w.ids) for w in wins] == [4, 4, 2, 4, 4, 4, 4, 1]
    assert [w.doc_id for w in wins] == [0, 0, 0, 1, 2, 2, 2, 2]
    assert [w.seq_id for w in wins] == list(range(8))
    assert report.n_tokens == 27 and len(report.skipped) == 2  # blank text, missing column
    budget = list(
        iter_windows(WordTokenizer(), CorpusSpec(path, kind="text", ctx=4, max_tokens=11))
    )
    assert [len(w.ids) for w in budget] == [4, 4, 2, 1]


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
    with pytest.raises(ValueError):
        list(iter_batches(iter([]), 0, full_len=4))
