"""Does a model write R1-style reasoning? Greedy generations on held-out problems, measured.

Three numbers per model, the same for the base and the distilled model so before/after
compare like for like: the share of completions that close a ``</think>`` span (the
distilled template opens ``<think>`` in the prompt, so the completion starts inside it);
the reasoning-word rate, vocabulary words per 100 completion tokens (the project's
vocabulary and counter, :mod:`sae_training.features.vocabulary`, as in every eval report);
and the mean completion-token loss on held-out traces (how well the model predicts R1
reasoning it never trained on).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_training.corpus import THINK_CLOSE, apply_template, data_file, read_jsonl
from sae_training.errors import CorpusError
from sae_training.features.vocabulary import count_reasoning_words, surface_words

from .data import Example


@dataclass(frozen=True)
class CheckResult:
    n_problems: int
    closed_think_share: float
    """completions containing ``</think>``"""
    reasoning_word_rate: float
    """vocabulary words per 100 completion tokens"""
    reasoning_words: int
    completion_tokens: int
    held_out_loss: float | None
    """mean NLL per completion token on held-out traces (None: none held out)"""
    samples: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def reasoning_word_rate(texts: list[str], completion_tokens: int) -> float:
    """Reasoning-vocabulary words per 100 completion tokens over ``texts``."""
    words = tuple(surface_words())
    n = sum(count_reasoning_words(t, words) for t in texts)
    return 100.0 * n / completion_tokens if completion_tokens else 0.0


def load_problems(path: str | Path, n: int) -> list[str]:
    """The first ``n`` problems of a JSONL (``problem`` or ``question`` field)."""
    out: list[str] = []
    for rec in read_jsonl(data_file(str(path))):
        q = rec.get("problem", rec.get("question"))
        if isinstance(q, str) and q.strip():
            out.append(q)
        if len(out) >= n:
            break
    if not out:
        raise CorpusError(f"{path}: no record with a 'problem' or 'question' text")
    return out


@torch.no_grad()
def generate_greedy(
    model: Any, tok: Any, problems: list[str], max_new_tokens: int
) -> list[tuple[str, int]]:
    """(completion text, completion tokens) per problem: the chat template with the generation
    prompt, greedy, one batch with left padding; tokens up to and including EOS are counted."""
    prompts = [
        apply_template(tok, [{"role": "user", "content": p}], add_generation_prompt=True)
        for p in problems
    ]
    enc = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(e) for e in enc)
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc])
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=model.generation_config.eos_token_id,
    )
    eos = model.generation_config.eos_token_id
    eos_set = set(eos if isinstance(eos, list) else [eos])
    results = []
    for row in out[:, width:].tolist():
        n = len(row)
        for k, t in enumerate(row):
            if t in eos_set:
                n = k + 1
                break
        results.append((tok.decode(row[:n], skip_special_tokens=True), n))
    return results


@torch.no_grad()
def held_out_loss(model: Any, examples: list[Example]) -> float | None:
    """Mean NLL per completion token over ``examples`` (token-weighted)."""
    total, count = 0.0, 0
    for ex in examples:
        ids = torch.tensor([ex.ids])
        logits = model(input_ids=ids).logits[0, :-1].float()
        target = ids[0, 1:]
        nll = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        part = nll[ex.n_prompt - 1 :]
        total += float(part.sum())
        count += part.numel()
    return total / count if count else None


def run_check(
    model: Any, tok: Any, problems: list[str], max_new_tokens: int, held_out: list[Example]
) -> CheckResult:
    was_training = model.training
    model.eval()
    gens = generate_greedy(model, tok, problems, max_new_tokens)
    loss = held_out_loss(model, held_out)
    model.train(was_training)
    texts = [t for t, _ in gens]
    tokens = sum(n for _, n in gens)
    words = tuple(surface_words())
    return CheckResult(
        n_problems=len(problems),
        closed_think_share=sum(THINK_CLOSE in t for t in texts) / len(texts),
        reasoning_word_rate=reasoning_word_rate(texts, tokens),
        reasoning_words=sum(count_reasoning_words(t, words) for t in texts),
        completion_tokens=tokens,
        held_out_loss=None if loss is None or math.isnan(loss) else loss,
        samples=[
            {"problem": p, "completion": t, "tokens": n}
            for p, (t, n) in zip(problems, gens, strict=True)
        ],
    )


__all__ = [
    "CheckResult",
    "generate_greedy",
    "held_out_loss",
    "load_problems",
    "reasoning_word_rate",
    "run_check",
]
