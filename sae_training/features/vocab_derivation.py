"""Re-derive a reasoning vocabulary from two corpora, as the paper did (``sae-steer vocab``).

The paper compared word frequencies in R1 reasoning traces against ground-truth math
solutions, kept the words whose frequency rises most, dropped those very common in
general English and picked 10 by hand. Here:

* reasoning text: ``reasoning_traces.jsonl`` ``reasoning``;
* non-reasoning text: ``math_nonreasoning.jsonl`` ``answer`` + ``gsm8k_train.jsonl``
  ``answer_clean`` (solutions written without visible deliberation);
* general text: ``chat.jsonl`` (all message contents), standing in for Google Books Ngram.

Words (lower-cased letters, apostrophes inside) and, by default, word pairs ("let me")
are counted. The ratio uses add-one smoothing so words absent from the non-reasoning
text get a finite ratio: ``((c_r + 1) / (N_r + V)) / ((c_n + 1) / (N_n + V))``. Words with
fewer than ``--min-count`` reasoning occurrences are skipped (rare words have noisy
ratios), and words whose general-text rate exceeds ``--max-general-rate`` are dropped
(function words such as "so" or "but" rise in traces too but say nothing specific).
The result is a ranked candidate list to choose from by hand; ``--out`` writes it in the
vocabulary JSON format (four surface forms per word) for ``sae-steer score --vocab``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sae_steer_vllm.constants import CHAT_CORPUS, NONREASONING_CORPUS, TRACE_CORPUS
from sae_training.corpus import data_file, read_jsonl
from sae_training.errors import CorpusError

WORD_RE = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")

DEFAULT_REASONING = [f"{TRACE_CORPUS}:reasoning"]
DEFAULT_NONREASONING = [f"{NONREASONING_CORPUS}:answer", "gsm8k_train.jsonl:answer_clean"]
DEFAULT_GENERAL = [f"{CHAT_CORPUS}:messages"]


@dataclass(frozen=True)
class Source:
    """A JSONL file and the field holding its text (``messages``: all message contents)."""

    path: Path
    field: str

    @classmethod
    def parse(cls, spec: str) -> Source:
        path, sep, fld = spec.rpartition(":")
        if not sep or not path or not fld:
            raise CorpusError(f"source {spec!r} must look like FILE.jsonl:FIELD")
        return cls(data_file(path), fld)


@dataclass(frozen=True)
class Candidate:
    word: str
    ratio: float
    count_reasoning: int
    count_nonreasoning: int
    count_general: int
    rate_general: float


def iter_texts(src: Source, max_docs: int | None = None) -> Iterator[str]:
    for n, rec in enumerate(read_jsonl(src.path)):
        if max_docs is not None and n >= max_docs:
            return
        v = rec.get(src.field)
        if isinstance(v, str):
            yield v
        elif isinstance(v, list):  # chat messages
            for m in v:
                if isinstance(m, dict) and isinstance(m.get("content"), str):
                    yield m["content"]


def count_terms(texts: Iterator[str], ngram: int = 2) -> tuple[Counter[str], int]:
    """(counts of words and word n-grams up to ``ngram``, number of words)."""
    counts: Counter[str] = Counter()
    n_words = 0
    for text in texts:
        words = [w.lower() for w in WORD_RE.findall(text)]
        n_words += len(words)
        counts.update(words)
        for n in range(2, ngram + 1):
            counts.update(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))
    return counts, n_words


def derive_vocabulary(
    reasoning: list[Source],
    nonreasoning: list[Source],
    general: list[Source],
    *,
    top: int = 30,
    min_count: int = 20,
    max_general_rate: float = 1e-3,
    ngram: int = 2,
    max_docs: int | None = None,
) -> list[Candidate]:
    """Candidates ranked by frequency ratio (reasoning / non-reasoning), common words dropped."""

    def counted(sources: list[Source]) -> tuple[Counter[str], int]:
        total: Counter[str] = Counter()
        n = 0
        for s in sources:
            c, k = count_terms(iter_texts(s, max_docs), ngram)
            total.update(c)
            n += k
        return total, n

    c_r, n_r = counted(reasoning)
    c_n, n_n = counted(nonreasoning)
    c_g, n_g = counted(general)
    if n_r == 0 or n_n == 0:
        raise CorpusError("the reasoning and non-reasoning corpora must both contain words")
    V = len(set(c_r) | set(c_n))
    out = []
    for w, cr in c_r.items():
        if cr < min_count:
            continue
        rate_g = c_g.get(w, 0) / max(n_g, 1)
        if rate_g > max_general_rate:
            continue
        ratio = ((cr + 1) / (n_r + V)) / ((c_n.get(w, 0) + 1) / (n_n + V))
        out.append(Candidate(w, ratio, cr, c_n.get(w, 0), c_g.get(w, 0), rate_g))
    out.sort(key=lambda c: (-c.ratio, c.word))
    return out[:top]


def to_vocab_json(words: list[str]) -> dict[str, object]:
    """The reasoning_vocab.json format: four surface forms per word (lower, " lower",
    Capitalised, " Capitalised"), grouped by ``s.lstrip().lower()``."""
    groups: dict[str, list[str]] = {}
    for w in words:
        cap = w[:1].upper() + w[1:]
        groups[w] = [w, f" {w}", cap, f" {cap}"]
    return {"source": "sae-steer vocab (derived)", "groups": groups}
