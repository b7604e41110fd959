"""One SAE training run end to end: data -> train -> evaluate -> save a SAELens folder.

:func:`run_training` is what ``sae-steer train`` and the demo call, for any
:class:`TrainJob`; :mod:`sae_training.recipe` builds the default one.

Output folder::

    cfg.json, sae_weights.safetensors   SAELens v6 layout (normalisation folded in)
    metrics.json                         config, training curve, held-out metrics
    checkpoint.pt                        last checkpoint (for --resume)
    activations/                         collected activation cache (when collected here)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sae_steer_vllm.constants import ACTIVATIONS_DIR, CHECKPOINT_FILE, TRAIN_METRICS_FILE
from sae_steer_vllm.files import atomic_write_json
from sae_steer_vllm.sae import SAE, resid_post_hook_name
from sae_training.activation_cache import cache_matches, read_cache_meta
from sae_training.activation_sources import ActivationSource, DiskCache, MemoryActivations
from sae_training.collection import CollectConfig, collect_to_disk, collect_to_memory
from sae_training.corpus import TextMix
from sae_training.errors import ActivationError, TrainingError
from sae_training.evaluation import lm_metrics, reconstruction_metrics
from sae_training.lm import ResidReader, load_model
from sae_training.tokens import keep_mask, pack_rows, special_token_ids
from sae_training.trainer import (
    RunOptions,
    TrainConfig,
    Trainer,
    export_sae,
    init_distributed_from_env,
    world,
)


@dataclass(frozen=True)
class TrainJob:
    """One training run end to end. Exactly one of ``activations`` / ``model`` supplies data."""

    out_dir: Path
    train: TrainConfig
    layer: int
    model: str | None = None
    activations: Path | None = None
    collect_tokens: int = 0
    context_size: int = CollectConfig.context_size
    prepend_bos: bool = CollectConfig.prepend_bos
    """rows start with BOS when collecting (a cache's own setting wins when reading one)"""
    mix: TextMix = field(default_factory=TextMix)
    in_memory: bool = False
    eval_rows: int = 16
    lm_eval: bool = True
    resume: bool = False
    options: RunOptions = field(default_factory=RunOptions)

    def collect_config(self) -> CollectConfig:
        """What this job collects when it has a model and no cache (the cache's identity)."""
        if self.model is None:
            raise ActivationError("a job that reads an activation cache collects nothing")
        return CollectConfig(
            model=self.model,
            layers=(self.layer,),
            tokens=self.collect_tokens,
            context_size=self.context_size,
            prepend_bos=self.prepend_bos,
            mix=self.mix,
        )


def _log(msg: str) -> None:
    if world()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def _prepare_source(
    job: TrainJob, tokenizer: Any, model: Any
) -> tuple[ActivationSource, dict[str, Any]]:
    """The training activations and the cache metadata (model name, context, row start)."""
    if job.activations is not None:
        cache = DiskCache(job.activations, job.layer)
        m = cache.meta
        return cache, {
            "model": m.model,
            "context_size": m.context_size,
            "prepend_bos": m.prepend_bos,
        }
    ccfg = job.collect_config()
    meta = {
        "model": ccfg.model,
        "context_size": ccfg.context_size,
        "prepend_bos": ccfg.prepend_bos,
    }
    if job.in_memory:
        acts = collect_to_memory(ccfg, tokenizer, model, progress=job.options.progress)
        return MemoryActivations(acts[job.layer]), meta
    folder = job.out_dir / ACTIVATIONS_DIR
    rank, n = world()
    if rank == 0 and not cache_matches(folder, ccfg):  # a resumed run does not collect again
        collect_to_disk(ccfg, tokenizer, model, folder, progress=job.options.progress)
    if n > 1:
        dist.barrier()
    return DiskCache(folder, job.layer), meta


def _print_record(rec: dict[str, Any]) -> None:
    keys = ("step", "loss", "mse", "explained_variance", "l0", "dead_fraction", "lr")
    _log("train " + " ".join(f"{k}={rec[k]:.4g}" for k in keys if k in rec))


def run_training(job: TrainJob) -> dict[str, Any]:
    """Train, evaluate, save. Returns the metrics dict also written to metrics.json."""
    init_distributed_from_env()
    rank, n_proc = world()
    out = Path(job.out_dir)
    ckpt = out / CHECKPOINT_FILE
    if ckpt.is_file() and not job.resume:
        raise TrainingError(
            f"{out} already holds a run ({CHECKPOINT_FILE}); pass --resume to continue it, or choose another --out"
        )
    t_start = time.perf_counter()
    model_path = job.model
    if model_path is None and job.activations is not None:
        cache_meta = read_cache_meta(job.activations)
        model_path = cache_meta.model if Path(cache_meta.model, "config.json").is_file() else None
        if cache_meta.mix:  # evaluate on the held-out documents of the cache's own mix
            job = replace(job, mix=TextMix(**cache_meta.mix))
        job = replace(job, prepend_bos=cache_meta.prepend_bos)  # ... cut as its rows were
    tokenizer = model = None
    if model_path is not None:
        model, tokenizer = load_model(model_path)
        ResidReader(model, job.layer)  # validates the layer index before any work
    source, meta = _prepare_source(job, tokenizer, model)
    t_collected = time.perf_counter()
    trainer = Trainer(job.train, source, out, job.options)
    if job.resume and trainer.resume():
        _log(f"resumed from {ckpt} at step {trainer.step}/{job.train.total_steps}")
    result = trainer.train(on_log=None if job.options.progress else _print_record)
    t_trained = time.perf_counter()
    metrics: dict[str, Any] = {
        "config": job.train.model_dump(),
        "layer": job.layer,
        "model": meta["model"],
        "prepend_bos": meta["prepend_bos"],
        "processes": n_proc,
        "normalisation_scale": result.scale,
        "train_tokens_per_second": result.tokens_per_second,
        "collect_seconds": round(t_collected - t_start, 2),
        "train_seconds": round(t_trained - t_collected, 2),
        "history": result.history,
        "finalized": result.finalized,
    }
    if rank == 0:
        sae = export_sae(
            result,
            hook_layer=job.layer,
            hook_name=resid_post_hook_name(job.layer),
            model_name=Path(meta["model"]).name,
            context_size=meta["context_size"],
            prepend_bos=meta["prepend_bos"],  # how the training rows started
        ).cpu()
        sae.save(out)
        if result.history:
            metrics["final_train"] = result.history[-1]
        if model is not None and tokenizer is not None:
            metrics["eval"] = _evaluate(job, sae, tokenizer, model, meta["context_size"])
        metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
        atomic_write_json(out / TRAIN_METRICS_FILE, metrics)
    if n_proc > 1:
        dist.barrier()
    return metrics


def _eval_rows(job: TrainJob, tokenizer: Any, context_size: int) -> torch.Tensor:
    rows = []
    texts = job.mix.texts(tokenizer, "eval")
    for r in pack_rows(tokenizer, texts, context_size, prepend_bos=job.prepend_bos):
        rows.append(r)
        if len(rows) == job.eval_rows:
            break
    if not rows:
        raise ActivationError("the held-out split is empty: not enough documents for evaluation")
    return torch.stack(rows)


def _evaluate(
    job: TrainJob, sae: SAE, tokenizer: Any, model: Any, context_size: int
) -> dict[str, float]:
    rows = _eval_rows(job, tokenizer, context_size)
    keep = keep_mask(rows, special_token_ids(tokenizer), prepend_bos=job.prepend_bos)
    acts = ResidReader(model, job.layer).read_one(rows).cpu()
    res = reconstruction_metrics(sae, acts.reshape(-1, acts.shape[-1])[keep.reshape(-1)])
    if job.lm_eval:
        res.update(lm_metrics(model, rows, keep, sae, job.layer))
    return res
