"""The reasoning vocabulary, stored as package data (``sae_training/data/reasoning_vocab.json``).

Groups are keyed by ``surface.lstrip().lower()``, as the paper does; every
group lists its surface strings. ReasonScore, the eval harness's
reasoning-word rate and the vocabulary tool all read it from here.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

from sae_steer_vllm.constants import VOCAB_FILE
from sae_training.errors import VocabularyError

DEFAULT_VOCAB_PATH = Path(__file__).resolve().parent.parent / "data" / VOCAB_FILE


def load_vocabulary(path: str | Path | None = None) -> dict[str, list[str]]:
    """Group name -> surface strings. Default: the paper's 10 groups, 34 strings."""
    p = Path(path) if path else DEFAULT_VOCAB_PATH
    try:
        raw = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VocabularyError(f"{p}: cannot read vocabulary ({e})") from None
    groups = raw.get("groups") if isinstance(raw, dict) else None
    if not isinstance(groups, dict) or not groups:
        raise VocabularyError(f"{p}: expected {{'groups': {{name: [strings]}}}}")
    out: dict[str, list[str]] = {}
    for name, strings in groups.items():
        if not isinstance(strings, list) or not all(isinstance(s, str) and s for s in strings):
            raise VocabularyError(f"{p}: group {name!r} must be a list of non-empty strings")
        out[str(name)] = list(strings)
    return out


def surface_words(vocab: dict[str, list[str]] | None = None) -> list[str]:
    """Distinct stripped words (case kept), for counting in plain text."""
    vocab = vocab or load_vocabulary()
    return sorted({s.strip() for strings in vocab.values() for s in strings})


def count_reasoning_words(text: str, words: list[str] | tuple[str, ...] | None = None) -> int:
    """Occurrences of vocabulary words in ``text``: case as listed, whole words only (a word
    inside a longer one, "maybe" in "maybes", does not count). The one counter behind every
    reasoning-word rate (the eval's per-sample counts, ``sae-steer distill``'s check)."""
    ws = tuple(words) if words is not None else tuple(surface_words())
    return len(_vocab_regex(ws).findall(text))


@lru_cache(maxsize=4)
def _vocab_regex(words: tuple[str, ...]) -> re.Pattern[str]:
    alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z])(?:{alts})(?![A-Za-z])")
