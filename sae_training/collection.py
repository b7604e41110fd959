"""Activation collection: text -> packed rows -> resid_post of the kept tokens.

The documents come from a :class:`~sae_training.corpus.TextMix`, are packed into rows by
:func:`~sae_training.tokens.pack_rows`, run through the model by
:class:`~sae_training.lm.ResidReader`, and every position that is not special (nor a
row's first when rows start with BOS) is kept (:func:`~sae_training.tokens.keep_mask`): special tokens' residual
norms are tens of times larger than ordinary tokens' (attention sinks) and would dominate
the reconstruction loss while never being steered. The result goes to memory
(:func:`collect_to_memory`) or to an activation cache on disk (:func:`collect_to_disk`).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm import tqdm

from sae_training.activation_cache import DEFAULT_SHARD_TOKENS, CacheWriter
from sae_training.corpus import BadLine, Split, TextMix
from sae_training.errors import ActivationError
from sae_training.lm import ResidReader
from sae_training.tokens import keep_mask, pack_rows, special_token_ids

CacheDtype = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class CollectConfig:
    """One collection run. ``tokens`` counts kept (non-special) tokens; ``dtype`` is how a
    disk cache stores them (memory collection is always float32)."""

    model: str
    layers: tuple[int, ...]
    tokens: int
    context_size: int = 256
    prepend_bos: bool = True
    """start every packed row with BOS (false: plain stream tokens, SAELens prepend_bos false)"""
    batch_rows: int = 8
    mix: TextMix = field(default_factory=TextMix)
    split: Split = "train"
    dtype: CacheDtype = "float32"

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ActivationError(f"tokens must be positive, got {self.tokens}")
        if self.batch_rows <= 0:
            raise ActivationError(f"batch_rows must be positive, got {self.batch_rows}")


def iter_activations(
    cfg: CollectConfig,
    tokenizer: Any,
    model: torch.nn.Module,
    *,
    progress: bool = True,
    skipped: list[BadLine] | None = None,
) -> Iterator[dict[int, torch.Tensor]]:
    """Yield ``{layer: [n, d]}`` CPU chunks of kept-token activations until ``cfg.tokens``.

    Raises :class:`ActivationError` if the corpus runs out first, naming how
    many tokens it held, so the caller can lower ``tokens`` or add data.
    """
    reader = ResidReader(model, cfg.layers)
    specials = special_token_ids(tokenizer)
    texts = cfg.mix.texts(tokenizer, cfg.split, skipped)
    rows = pack_rows(tokenizer, texts, cfg.context_size, prepend_bos=cfg.prepend_bos)
    done = 0
    bar = tqdm(
        total=cfg.tokens,
        unit="tok",
        unit_scale=True,
        desc=f"collect {cfg.split}",
        disable=not progress,
    )
    try:
        while done < cfg.tokens:
            batch = [r for _, r in zip(range(cfg.batch_rows), rows, strict=False)]
            if not batch:
                raise ActivationError(
                    f"the corpus ran out after {done} of {cfg.tokens} requested tokens "
                    f"({cfg.split} split of {[str(s) for s, _, _ in cfg.mix.sources()]}); "
                    "request fewer tokens or add data"
                )
            ids = torch.stack(batch)
            acts = reader(ids)
            keep = keep_mask(ids, specials, prepend_bos=cfg.prepend_bos).reshape(-1)
            n = min(int(keep.sum()), cfg.tokens - done)
            chunk = {
                layer: a.cpu().reshape(-1, a.shape[-1])[keep][:n].contiguous()
                for layer, a in acts.items()
            }
            done += n
            bar.update(n)
            yield chunk
    finally:
        bar.close()


def collect_to_memory(
    cfg: CollectConfig, tokenizer: Any, model: torch.nn.Module, *, progress: bool = True
) -> dict[int, torch.Tensor]:
    """Collect ``cfg.tokens`` activations per layer into RAM (``[tokens, d]`` each)."""
    skipped: list[BadLine] = []
    parts: dict[int, list[torch.Tensor]] = {layer: [] for layer in cfg.layers}
    for chunk in iter_activations(cfg, tokenizer, model, progress=progress, skipped=skipped):
        for layer, a in chunk.items():
            parts[layer].append(a)
    _report_skipped(skipped)
    return {layer: torch.cat(p) for layer, p in parts.items()}


def collect_to_disk(
    cfg: CollectConfig,
    tokenizer: Any,
    model: torch.nn.Module,
    folder: str | Path,
    *,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    progress: bool = True,
) -> Path:
    """Stream activations into an activation cache; its manifest is written last."""
    skipped: list[BadLine] = []
    writer = CacheWriter(
        folder, cfg.layers, shard_tokens=shard_tokens, dtype=getattr(torch, cfg.dtype)
    )
    t0 = time.perf_counter()
    for chunk in iter_activations(cfg, tokenizer, model, progress=progress, skipped=skipped):
        writer.add(chunk)
    _report_skipped(skipped)
    writer.close(
        model=cfg.model,
        context_size=cfg.context_size,
        prepend_bos=cfg.prepend_bos,
        mix=asdict(cfg.mix),
        split=cfg.split,
        skipped_records=len(skipped),
        seconds=time.perf_counter() - t0,
    )
    return Path(folder)


def _report_skipped(skipped: list[BadLine]) -> None:
    if skipped:
        first = "; ".join(str(b) for b in skipped[:3])
        tqdm.write(
            f"skipped {len(skipped)} empty/malformed record(s), e.g. {first}", file=sys.stderr
        )
