"""The four conditions of a model diff: which model reads which corpus, and what each gives.

One condition is (model, data). Its activations are collected with the project's one
collection path (:func:`~sae_training.collection.collect_to_disk`: packed rows,
special tokens dropped, :class:`~sae_training.lm.ResidReader` at the SAE's layer) into an
activation cache inside the diff's output folder, so a rerun finds it
(:func:`~sae_training.activation_cache.cache_matches`) instead of running the model again.
Each model renders the corpora through its own chat template: what that model reads when it
is used (an R1 distill's template frames reasoning with ``<think>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import DIFF_CONDITIONS_DIR
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.sae import SAE
from sae_training.activation_cache import cache_matches
from sae_training.activation_sources import ActivationSource, DiskCache, MemoryActivations
from sae_training.collection import CollectConfig, collect_to_disk
from sae_training.corpus import TextMix, data_file, trace_format
from sae_training.diffing.classify import DataKind, ModelRole, condition_name
from sae_training.errors import CorpusError


def corpus_path(name: str, what: str) -> Path:
    """A corpus option as an existing file, or a usage error naming the option."""
    p = data_file(name)
    if not p.is_file():
        raise UsageError(
            f"{what} corpus {name} not found ({p}); pass an existing JSONL file "
            "or set SAE_STEER_DATA to the shared data folder"
        )
    return p.resolve()


def condition_dir(out: Path, model: ModelRole, data: DataKind) -> Path:
    return out / DIFF_CONDITIONS_DIR / condition_name(model, data)


def collect_config(
    model_path: Path,
    data: DataKind,
    *,
    layer: int,
    tokens: int,
    context_size: int,
    prepend_bos: bool,
    chat: Path,
    reasoning: Path,
) -> CollectConfig:
    """One condition's collection: only chat documents, or only reasoning traces."""
    mix = TextMix(chat=str(chat), traces=str(reasoning), trace_ratio=0.0 if data == "chat" else 1.0)
    return CollectConfig(
        model=str(model_path),
        layers=(layer,),
        tokens=tokens,
        context_size=context_size,
        prepend_bos=prepend_bos,
        mix=mix,
    )


def ensure_activations(
    cfg: CollectConfig, folder: Path, tokenizer: Any, model: Any, *, progress: bool
) -> Path:
    """The condition's activation cache, collected unless a matching one is there."""
    if not cache_matches(folder, cfg):
        collect_to_disk(cfg, tokenizer, model, folder, progress=progress)
    return folder


def activation_chunks(folder: Path, layer: int) -> Iterator[torch.Tensor]:
    """A condition's cached activations shard by shard (float32), in collection order."""
    cache = DiskCache(folder, layer)
    for i in range(len(cache.meta.shards)):
        yield cache.load_shard(i).float()


def training_source(sae: SAE, folder: Path, layer: int) -> ActivationSource:
    """What the fine-tune reads: the cache itself (memory bounded by the trainer's shuffle
    window), or, for an SAE that normalises each token by its own statistics, those
    normalised inputs in memory."""
    if not sae.cfg.input_dependent_norm:
        return DiskCache(folder, layer)
    with torch.no_grad():
        x = torch.cat([sae.normalize_in(c) for c in activation_chunks(folder, layer)])
    return MemoryActivations(x)


@torch.no_grad()
def feature_activity(
    sae: SAE, chunks: Iterable[torch.Tensor], *, chunk: int = 2048
) -> dict[str, torch.Tensor]:
    """Per-feature ``density`` (share of tokens with a positive activation) and ``mean``
    activation over all tokens, with the SAE's own ``encode``; plus the mean ``l0``."""
    device = sae.W_enc.device
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    total = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    n = 0
    for part in chunks:
        for i in range(0, part.shape[0], chunk):
            f = sae.encode(part[i : i + chunk].to(device))
            fired += (f > 0).sum(0).double().cpu()
            total += f.sum(0).double().cpu()
        n += part.shape[0]
    return {
        "density": (fired / max(n, 1)).float(),
        "mean": (total / max(n, 1)).float(),
        "l0": torch.tensor(float(fired.sum()) / max(n, 1)),
    }


def opens_think(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template opens ``<think>`` in its generation prompt
    (:func:`~sae_training.corpus.trace_format`); a tokenizer without a template does not."""
    try:
        return trace_format(tokenizer).opens_think
    except CorpusError:
        return False


def pick_reasoning_model(choice: str, think_a: bool, think_b: bool) -> ModelRole:
    """``a`` or ``b``: the option, or under ``auto`` the one model whose template opens
    ``<think>``; both or neither is a usage error (the rule cannot tell)."""
    if choice in ("a", "b"):
        return "a" if choice == "a" else "b"
    if think_a != think_b:
        return "a" if think_a else "b"
    which = "both" if think_a else "neither"
    raise UsageError(
        f"--reasoning-model auto: {which} model's chat template opens <think> in its "
        "generation prompt, so which one reasons cannot be told; pass --reasoning-model a or b"
    )
