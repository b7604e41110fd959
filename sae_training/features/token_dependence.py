"""Token-dependence check: is a high-ReasonScore feature just a detector of the words?

A later study (arXiv 2601.05679) found many "reasoning features" fire on the vocabulary
words themselves, whatever the text around them. The check here: take non-reasoning
answers (GSM8K / short math solutions, rendered as ordinary chat replies), inject the
reasoning words at sentence starts, and compare the feature's mean activation around the
injected words with its mean activation around the same words in genuine reasoning traces.

All numbers are raw SAE activations. Per group j, the feature's mean over the widened
mask M_j (the masks ReasonScore uses) is taken on the injected texts and, from the
statistics file, on the reasoning traces. Both are then averaged with the same weights
w_j = share of group j among the traces' marked positions, so the word mix is held fixed
and only the surroundings differ:

    injection_ratio = sum_j w_j act(M_j | injected non-reasoning)
                      / sum_j w_j act(M_j | reasoning traces)

It is close to 1 (or above) for a token detector and well below 1 for a feature that
needs reasoning context (>= 0.5 is flagged). ``transfer_ratio = (injected - baseline) /
(reasoning - baseline)``, with ``baseline`` the mean over all tokens of the plain
non-reasoning text, is the study's "transfer ratio". Both ratios are invariant to a
per-feature scale, so folding the decoder norm or not makes no difference.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch

from sae_steer_vllm.constants import NONREASONING_CORPUS
from sae_steer_vllm.sae import SAE
from sae_training.corpus import data_file, read_jsonl
from sae_training.errors import FeatureStatsError
from sae_training.features.masks import DEFAULT_WINDOW, VocabPatterns, sequence_masks
from sae_training.lm import ResidReader
from sae_training.tokens import ignore_mask, special_token_ids

# (file, question field, answer field): solutions written without visible deliberation
DEFAULT_NONREASONING: tuple[tuple[str, str, str], ...] = (
    (NONREASONING_CORPUS, "question", "answer"),
    ("gsm8k_train.jsonl", "question", "answer_clean"),
)
TOKEN_DETECTOR_RATIO = 0.5

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


@dataclass(frozen=True)
class TokenDependence:
    feature: int
    injected: float
    baseline: float
    reasoning: float
    injection_ratio: float | None  # None when the feature never fires on reasoning M+
    transfer_ratio: float | None
    n_injected_positions: int

    @property
    def likely_token_detector(self) -> bool:
        return self.injection_ratio is not None and self.injection_ratio >= TOKEN_DETECTOR_RATIO

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["likely_token_detector"] = self.likely_token_detector
        return d


def injection_phrases(patterns: VocabPatterns) -> list[str]:
    """One phrase per group: its sentence-initial form ("Wait", "Let me"), as it would start
    a sentence in a trace; the first surface string if the group has no capitalised form."""
    out = []
    for strings in patterns.strings:
        stripped = [s.strip() for s in strings]
        caps = [s for s in stripped if s[:1].isupper()]
        out.append((caps or stripped)[0])
    return out


def inject(text: str, phrases: list[str], start: int = 0, every: int = 2) -> tuple[str, int]:
    """Put ``phrase + ", "`` before every ``every``-th sentence (the first included),
    cycling through ``phrases`` from index ``start``. Line breaks are kept. Returns the new
    text and the number of phrases used, so a caller can continue the cycle in the next text
    and every group gets injected about equally often."""
    if not phrases:
        return text, 0
    pieces = _SENTENCE_END.split(text)
    seps = _SENTENCE_END.findall(text)
    out = []
    k = start
    for i, piece in enumerate(pieces):
        if piece and i % every == 0:
            piece = f"{phrases[k % len(phrases)]}, {piece}"
            k += 1
        out.append(piece)
        if i < len(seps):
            out.append(seps[i])
    return "".join(out), k - start


def iter_nonreasoning_pairs(
    sources: tuple[tuple[str, str, str], ...] = DEFAULT_NONREASONING,
) -> Iterator[tuple[str, str]]:
    """(question, answer) pairs, alternating between the sources so both kinds appear."""
    iters = [
        (
            (r[q], r[a])
            for r in read_jsonl(data_file(f))
            if isinstance(r.get(q), str) and isinstance(r.get(a), str) and r[a].strip()
        )
        for f, q, a in sources
    ]
    while iters:
        for it in list(iters):
            try:
                yield next(it)
            except StopIteration:
                iters.remove(it)


def render_reply(tokenizer: Any, question: str, answer: str) -> str:
    msgs = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return str(tokenizer.apply_chat_template(msgs, tokenize=False))


@torch.inference_mode()
def measure_token_dependence(
    reader: ResidReader,
    sae: SAE,
    tokenizer: Any,
    patterns: VocabPatterns,
    features: list[int],
    reasoning_group_act: torch.Tensor,
    group_weights: torch.Tensor,
    *,
    n_texts: int = 32,
    ctx: int = 256,
    window: tuple[int, int] = DEFAULT_WINDOW,
    sources: tuple[tuple[str, str, str], ...] = DEFAULT_NONREASONING,
    seed: int = 0,
    progress: bool = True,
) -> dict[int, TokenDependence]:
    """Run the check for ``features``.

    ``reasoning_group_act`` ``[d_sae, G]``: raw per-group means on the reasoning corpus;
    ``group_weights`` ``[G]``: how many marked positions each group had there (both from
    the statistics file, see :func:`reasoning_reference`). ``reader`` reads resid_post
    at the SAE's layer (a single-layer :class:`ResidReader`).
    """
    from tqdm import tqdm

    if not features:
        return {}
    feats = torch.tensor(features, dtype=torch.long)
    G = patterns.n_groups
    phrases = injection_phrases(patterns)
    ignored = special_token_ids(tokenizer)
    next_phrase = random.Random(seed).randrange(len(phrases))
    inj_sum = torch.zeros(G, len(features), dtype=torch.float64)
    inj_n = torch.zeros(G, dtype=torch.float64)
    base_sum = torch.zeros(len(features), dtype=torch.float64)
    base_n = 0
    pairs = iter_nonreasoning_pairs(sources)
    for _ in tqdm(range(n_texts), desc="token dependence", unit="text", disable=not progress):
        try:
            question, answer = next(pairs)
        except StopIteration:
            break
        injected, used = inject(answer, phrases, start=next_phrase)
        next_phrase += used
        for text, is_injected in (
            (render_reply(tokenizer, question, answer), False),
            (render_reply(tokenizer, question, injected), True),
        ):
            ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:ctx])
            ig = ignore_mask(ids, ignored)
            acts = sae.encode(reader.read_one(ids.unsqueeze(0))[0])[:, feats].double()
            if is_injected:
                gm = sequence_masks(ids, patterns, ig, window).groups.double()  # [G, T]
                inj_sum += gm @ acts
                inj_n += gm.sum(dim=1)
            else:
                base_sum += acts[~ig].sum(dim=0)
                base_n += int((~ig).sum())
    w = group_weights.double() * (inj_n > 0)
    if float(w.sum()) <= 0:
        raise FeatureStatsError(
            "no vocabulary group occurs both in the injected texts and in the reasoning corpus"
        )
    w = w / w.sum()
    inj = (w.unsqueeze(1) * inj_sum / inj_n.clamp(min=1).unsqueeze(1)).sum(dim=0)
    reason = (reasoning_group_act[feats].double() * w.unsqueeze(0)).sum(dim=1)
    base = base_sum / max(base_n, 1)
    out: dict[int, TokenDependence] = {}
    for j, f in enumerate(features):
        r, i_, b_ = float(reason[j]), float(inj[j]), float(base[j])
        ratio = i_ / r if r > 0 else None
        transfer = (i_ - b_) / (r - b_) if r - b_ > 1e-12 else None
        out[f] = TokenDependence(f, i_, b_, r, ratio, transfer, int(inj_n.sum()))
    return out


def reasoning_reference(
    stats_tensors: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw per-group means ``[d_sae, G]``, group position counts ``[G]``) from a statistics
    file; its means are folded, so divide the decoder norm back out."""
    norm = stats_tensors["decoder_norm"].double().unsqueeze(1)
    raw = torch.where(norm > 0, stats_tensors["mean_group"].double() / norm.clamp(min=1e-30), 0.0)
    return raw, stats_tensors["count_group"].double()


__all__ = [
    "DEFAULT_NONREASONING",
    "TokenDependence",
    "inject",
    "injection_phrases",
    "measure_token_dependence",
    "reasoning_reference",
]
