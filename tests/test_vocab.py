"""The stored vocabulary and `sae-steer vocab` (re-deriving a vocabulary from two corpora)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.corpora import write_jsonl

from sae_training.features.masks import build_patterns, group_key
from sae_training.features.vocab_cli import main
from sae_training.features.vocab_derivation import Source, derive_vocabulary, to_vocab_json
from sae_training.features.vocabulary import load_vocabulary


def test_paper_vocabulary_is_ten_groups_of_34_strings() -> None:
    v = load_vocabulary()
    assert len(v) == 10 and sum(len(s) for s in v.values()) == 34
    assert v["but"] == ["But"] and v["another"] == ["Another"]
    for g, strings in v.items():
        assert all(group_key(s) == g for s in strings)
        if g not in ("but", "another"):
            cap = g[0].upper() + g[1:]
            assert sorted(strings) == sorted([g, " " + g, cap, " " + cap])


def _corpora(tmp: Path) -> tuple[Path, Path, Path]:
    reasoning = write_jsonl(
        tmp / "r.jsonl",
        [
            {
                "reasoning": "Hmm, wait. Let me check the sum. Wait, maybe the sum is 5. The total is 5."
            }
        ]
        * 10,
    )
    nonreasoning = write_jsonl(
        tmp / "n.jsonl", [{"answer": "The sum is 5. The total is 5, so check it."}] * 10
    )
    general = write_jsonl(
        tmp / "g.jsonl",
        [{"messages": [{"role": "user", "content": "the the the maybe maybe wait"}]}] * 10,
    )
    return reasoning, nonreasoning, general


def test_derive_ranks_by_smoothed_ratio_and_drops_common_words(tmp_path: Path) -> None:
    r, n, g = _corpora(tmp_path)
    cands = derive_vocabulary(
        [Source(r, "reasoning")],
        [Source(n, "answer")],
        [Source(g, "messages")],
        top=50,
        min_count=5,
        max_general_rate=0.25,
        ngram=2,
    )
    words = [c.word for c in cands]
    # 'maybe' is half of the general corpus: dropped; 'wait' (1/6 of it) stays
    assert "maybe" not in words and "wait" in words and "let me" in words
    assert "the" not in words  # no more frequent in reasoning than in the solutions
    top = cands[0]
    assert top.word == "wait" and top.count_reasoning == 20 and top.count_nonreasoning == 0
    # add-one smoothing over the union vocabulary of the two corpora
    n_r = 15 * 10  # words per reasoning record x records (numbers are not words)
    n_n = 9 * 10
    vocab_size = len(
        {"hmm", "wait", "let", "me", "check", "the", "sum", "maybe", "is", "total", "so", "it"}
        | {"hmm wait", "wait let", "let me", "me check", "check the", "the sum", "sum wait"}
        | {"wait maybe", "maybe the", "sum is", "is the", "the total", "total is"}
        | {"is so", "so check", "check it"}  # pairs never span two records
    )
    expected = ((20 + 1) / (n_r + vocab_size)) / (1 / (n_n + vocab_size))
    assert top.ratio == pytest.approx(expected)
    ratios = [c.ratio for c in cands]
    assert ratios == sorted(ratios, reverse=True)


def test_vocab_cli_prints_and_writes_a_usable_vocabulary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    r, n, g = _corpora(tmp_path)
    out = tmp_path / "derived.json"
    rc = main(
        [
            "--reasoning", f"{r}:reasoning",
            "--nonreasoning", f"{n}:answer",
            "--general", f"{g}:messages",
            "--min-count", "5",
            "--max-general-rate", "0.25",
            "--top", "5",
            "--out", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    text = capsys.readouterr().out
    assert "*wait" in text and "20" in text
    vocab = load_vocabulary(out)
    assert len(vocab) == 5 and vocab["wait"] == ["wait", " wait", "Wait", " Wait"]
    assert json.loads(out.read_text())["groups"] == to_vocab_json(list(vocab))["groups"]

    class Tok:  # a whitespace tokenizer is enough to check the file feeds build_patterns
        def encode(self, s: str, add_special_tokens: bool = False) -> list[int]:
            return [hash(w) % 1000 for w in s.split()]

    assert build_patterns(Tok(), vocab).n_groups == 5


def test_vocab_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--reasoning", "no_colon_here"]) == 1
    assert "FILE.jsonl:FIELD" in capsys.readouterr().err
    assert main(["--reasoning", f"{tmp_path / 'missing.jsonl'}:x"]) == 1
    assert main(["--top", "0"]) == 2
