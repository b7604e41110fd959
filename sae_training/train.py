"""``sae-steer train``: collect (if needed) -> train -> evaluate -> save a SAELens folder.

Also the Python entry points the end-to-end pipeline calls:
:func:`run_training` (any configuration) and :func:`train_default_sae` (the
default recipe for the default model, with overrides for tiny test runs).

Output folder::

    cfg.json, sae_weights.safetensors   SAELens v6 layout (normalisation folded in)
    metrics.json                         config, training curve, held-out metrics
    checkpoint.pt                        last checkpoint (for --resume)
    activations/                         collected activation cache (when collected here)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from pydantic import ValidationError

from sae_steer_vllm.sae import SAE, resid_post_hook_name
from sae_training.activations import (
    META_FILE,
    ActivationError,
    ActivationSource,
    CollectConfig,
    DiskCache,
    MemoryActivations,
    ResidCapture,
    TextMix,
    collect_to_disk,
    collect_to_memory,
    keep_mask,
    load_model,
    pack_rows,
    special_ids,
)
from sae_training.corpus import CorpusError
from sae_training.evaluation import lm_metrics, reconstruction_metrics
from sae_training.trainer import (
    CHECKPOINT_FILE,
    METRICS_FILE,
    RunOptions,
    TrainConfig,
    Trainer,
    TrainingError,
    export_sae,
    init_distributed_from_env,
    world,
)

DEFAULT_LAYER = 18
DEFAULT_OUT = Path("runs") / "default-sae"

#: The default recipe for SmolLM2-135M-Instruct on a 2-core CPU (see docs/training.md).
DEFAULT_RECIPE: dict[str, Any] = {
    "layer": DEFAULT_LAYER,
    "collect_tokens": 240_000,
    "context_size": 256,
    "train": {
        # BatchTopK rather than the paper's standard ReLU+L1: on this budget (well under
        # 1M tokens) the standard SAE stays below EV 0.6 at L0 <= 100 (docs/training.md),
        # and the k-sparse kernels train ~2x faster per token. BatchTopK rather than TopK
        # because it is saved as JumpReLU, whose features the server can clamp exactly
        # (the paper's intervention); a TopK feature's value depends on all the others.
        "architecture": "batchtopk",
        "k": 64,
        "d_sae": 9216,
        "lr": 1e-3,
        "lr_decay": 0.2,
        "batch_size": 1024,
        "train_tokens": 360_000,
    },
}


@dataclass
class TrainJob:
    """One training run end to end. Exactly one of ``activations`` / ``model`` supplies data."""

    out_dir: Path
    train: TrainConfig
    layer: int
    model: str | None = None
    activations: Path | None = None
    collect_tokens: int = 0
    context_size: int = 256
    mix: TextMix = field(default_factory=TextMix)
    in_memory: bool = False
    eval_rows: int = 16
    lm_eval: bool = True
    resume: bool = False
    options: RunOptions = field(default_factory=RunOptions)


def _log(msg: str) -> None:
    if world()[0] == 0:
        print(msg, file=sys.stderr, flush=True)


def _prepare_source(
    job: TrainJob, tokenizer: Any, model: Any
) -> tuple[ActivationSource, dict[str, Any]]:
    """The training activations and the cache metadata (model name, context)."""
    if job.activations is not None:
        cache = DiskCache(job.activations, job.layer)
        return cache, {"model": cache.meta.model, "context_size": cache.meta.context_size}
    assert job.model is not None
    ccfg = CollectConfig(
        model=job.model,
        layers=(job.layer,),
        tokens=job.collect_tokens,
        context_size=job.context_size,
        mix=job.mix,
    )
    meta = {"model": job.model, "context_size": job.context_size}
    if job.in_memory:
        acts = collect_to_memory(ccfg, tokenizer, model, progress=job.options.progress)
        return MemoryActivations(acts[job.layer]), meta
    folder = job.out_dir / "activations"
    rank, n = world()
    if rank == 0 and not _cache_matches(folder, ccfg):
        collect_to_disk(ccfg, tokenizer, model, folder, progress=job.options.progress)
    if n > 1:
        dist.barrier()
    return DiskCache(folder, job.layer), meta


def _cache_matches(folder: Path, ccfg: CollectConfig) -> bool:
    """Reuse a finished cache of the same request (a resumed run does not collect again)."""
    try:
        meta = DiskCache(folder).meta
    except ActivationError:
        return False
    return (
        meta.model == str(ccfg.model)
        and meta.layers == list(ccfg.layers)
        and meta.tokens == ccfg.tokens
        and meta.context_size == ccfg.context_size
        and meta.mix == asdict(ccfg.mix)
        and meta.split == ccfg.split
    )


def _print_record(rec: dict[str, Any]) -> None:
    keys = ("step", "loss", "mse", "explained_variance", "l0", "dead_fraction", "lr")
    _log("train " + " ".join(f"{k}={rec[k]:.4g}" for k in keys if k in rec))


def _eval_rows(job: TrainJob, tokenizer: Any, context_size: int) -> torch.Tensor:
    rows = []
    for r in pack_rows(tokenizer, job.mix.texts(tokenizer, "eval"), context_size):
        rows.append(r)
        if len(rows) == job.eval_rows:
            break
    if not rows:
        raise ActivationError("the held-out split is empty: not enough documents for evaluation")
    return torch.stack(rows)


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
        cache_meta = DiskCache(job.activations, job.layer).meta
        model_path = cache_meta.model if Path(cache_meta.model, "config.json").is_file() else None
        if cache_meta.mix:  # evaluate on the held-out documents of the cache's own mix
            job = replace(job, mix=TextMix(**cache_meta.mix))
    tokenizer = model = None
    if model_path is not None:
        tokenizer, model = load_model(model_path)
        ResidCapture(model, [job.layer])  # validates the layer index before any work
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
        ).cpu()
        sae.save(out)
        if result.history:
            metrics["final_train"] = result.history[-1]
        if model is not None and tokenizer is not None:
            metrics["eval"] = _evaluate(job, sae, tokenizer, model, meta["context_size"])
        metrics["total_seconds"] = round(time.perf_counter() - t_start, 2)
        tmp = out / (METRICS_FILE + ".tmp")
        tmp.write_text(json.dumps(metrics, indent=2))
        tmp.replace(out / METRICS_FILE)
    if n_proc > 1:
        dist.barrier()
    return metrics


def _evaluate(
    job: TrainJob, sae: SAE, tokenizer: Any, model: Any, context_size: int
) -> dict[str, float]:
    rows = _eval_rows(job, tokenizer, context_size)
    keep = keep_mask(rows, special_ids(tokenizer))
    acts = ResidCapture(model, [job.layer])(rows)[job.layer]
    res = reconstruction_metrics(sae, acts.reshape(-1, acts.shape[-1])[keep.reshape(-1)])
    if job.lm_eval:
        res.update(lm_metrics(model, rows, keep, sae, job.layer))
    return res


# ------------------------------------------------------------------ default recipe
def default_job(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    model_path: str | Path | None = None,
    tokens: int | None = None,
    train_tokens: int | None = None,
    d_sae: int | None = None,
    batch_size: int | None = None,
    layer: int | None = None,
    eval_rows: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **train_overrides: Any,
) -> TrainJob:
    """The default recipe as a :class:`TrainJob`; ``tokens`` shrinks collection (and training)."""
    if model_path is None:
        from sae_steer_vllm.default_model import prepare_default_model

        model_path = prepare_default_model()
    tcfg = dict(DEFAULT_RECIPE["train"])
    collect = int(DEFAULT_RECIPE["collect_tokens"])
    if tokens is not None:
        # keep the recipe's epochs-over-the-data ratio for a smaller collection
        ratio = tcfg["train_tokens"] / collect
        collect = tokens
        tcfg["train_tokens"] = int(tokens * ratio)
    if train_tokens is not None:
        tcfg["train_tokens"] = train_tokens
    if d_sae is not None:
        tcfg["d_sae"] = d_sae
    if batch_size is not None:
        tcfg["batch_size"] = batch_size
    tcfg.update(train_overrides)
    tcfg["batch_size"] = min(tcfg["batch_size"], collect)
    tcfg["train_tokens"] = max(tcfg["train_tokens"], tcfg["batch_size"])
    tcfg["norm_tokens"] = min(32768, collect)
    if eval_rows is None:
        # a tiny run gets a tiny evaluation (3 full forwards per row)
        eval_rows = 16 if collect >= 50_000 else 2
    return TrainJob(
        out_dir=Path(out_dir),
        train=TrainConfig(**tcfg),
        layer=int(DEFAULT_RECIPE["layer"]) if layer is None else layer,
        eval_rows=eval_rows,
        model=str(model_path),
        collect_tokens=collect,
        context_size=int(DEFAULT_RECIPE["context_size"]),
        resume=resume,
        options=RunOptions(progress=progress),
    )


def train_default_sae(
    out_dir: str | Path = DEFAULT_OUT,
    *,
    model_path: str | Path | None = None,
    tokens: int | None = None,
    train_tokens: int | None = None,
    d_sae: int | None = None,
    layer: int | None = None,
    resume: bool = False,
    progress: bool = True,
    **train_overrides: Any,
) -> Path:
    """Train the default-recipe SAE into ``out_dir`` and return that folder.

    ``tokens`` (collected activations; training tokens scale with it) and
    ``d_sae`` make a tiny run for tests, e.g. ``tokens=4096, d_sae=256`` takes
    well under a minute. The folder loads with ``SAE.load`` and ``sae-steer serve --sae``.
    """
    job = default_job(
        out_dir,
        model_path=model_path,
        tokens=tokens,
        train_tokens=train_tokens,
        d_sae=d_sae,
        layer=layer,
        resume=resume,
        progress=progress,
        **train_overrides,
    )
    run_training(job)
    return Path(out_dir)


# ------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sae-steer train",
        description=(
            "Train a sparse autoencoder on residual-stream activations (resid_post of one layer) "
            "and save it as a SAELens folder (cfg.json + sae_weights.safetensors) plus metrics.json. "
            "Data comes from an activation cache (sae-steer collect) or is collected here from "
            "--model. `sae-steer train --recipe default` does everything for the default model."
        ),
        epilog=(
            "examples:\n"
            "  sae-steer train --recipe default                       # runs/default-sae, <= 20 min on 2 cores\n"
            "  sae-steer train --activations runs/acts --out runs/sae --arch topk --k 64\n"
            "  torchrun --nproc-per-node 2 -m sae_training.train --activations runs/acts --out runs/sae"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("data")
    src.add_argument(
        "--recipe", choices=["default"], help="the default recipe (defaults for every option below)"
    )
    src.add_argument(
        "--activations", type=Path, help="activation cache folder written by `sae-steer collect`"
    )
    src.add_argument(
        "--model", help="HF model folder to collect activations from (default model with --recipe)"
    )
    src.add_argument(
        "--layer",
        type=int,
        help=f"decoder layer whose resid_post to train on (recipe: {DEFAULT_LAYER})",
    )
    src.add_argument("--collect-tokens", type=int, help="tokens to collect when --model is given")
    src.add_argument(
        "--context-size", type=int, help="tokens per packed row when collecting (recipe: 256)"
    )
    src.add_argument(
        "--trace-ratio",
        type=float,
        default=0.5,
        help="fraction of documents from reasoning traces (default 0.5)",
    )
    src.add_argument(
        "--chat", default="chat.jsonl", help="chat JSONL (name in the shared data dir, or a path)"
    )
    src.add_argument("--traces", default="reasoning_traces.jsonl", help="reasoning-trace JSONL")
    src.add_argument(
        "--in-memory",
        action="store_true",
        help="keep collected activations in RAM instead of a disk cache",
    )
    t = p.add_argument_group("training")
    t.add_argument("--out", type=Path, help=f"output folder (recipe: {DEFAULT_OUT})")
    t.add_argument(
        "--arch",
        dest="architecture",
        choices=["standard", "topk", "batchtopk"],
        help="SAE architecture (batchtopk saves as jumprelu)",
    )
    t.add_argument("--d-sae", type=int, help="number of features (default 16 x d_in)")
    t.add_argument("--k", type=int, help="active features per token for topk/batchtopk")
    t.add_argument("--l1-coeff", type=float, help="L1 coefficient for standard (paper: 5)")
    t.add_argument(
        "--l1-warmup", type=float, help="fraction of training over which L1 ramps up (paper: 0.05)"
    )
    t.add_argument("--lr", type=float, help="Adam learning rate (paper: 5e-5)")
    t.add_argument("--lr-warmup", type=float, help="fraction of training with linear lr warm-up")
    t.add_argument(
        "--lr-decay", type=float, help="fraction of training with linear lr decay to 0 (paper: 0.2)"
    )
    t.add_argument(
        "--batch-size", type=int, help="tokens per optimizer step over all processes (paper: 4096)"
    )
    t.add_argument(
        "--train-tokens", type=int, help="total training tokens (epochs over the data if larger)"
    )
    t.add_argument(
        "--grad-clip",
        type=float,
        help="clip the gradient norm (default: 1.0 for standard, as SAELens; off for topk and "
        "batchtopk; 0 = off)",
    )
    t.add_argument("--seed", type=int, help="seed for init and batch order")
    t.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its checkpoint"
    )
    o = p.add_argument_group("output")
    o.add_argument(
        "--eval-rows", type=int, default=16, help="held-out rows for the final evaluation"
    )
    o.add_argument(
        "--no-lm-eval", action="store_true", help="skip the CE-recovered / KL evaluation"
    )
    o.add_argument("--log-every", type=int, default=50, help="steps between log records")
    o.add_argument("--checkpoint-every", type=int, default=200, help="steps between checkpoints")
    o.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


_TRAIN_FIELDS = (
    "architecture",
    "d_sae",
    "k",
    "l1_coeff",
    "l1_warmup",
    "lr",
    "lr_warmup",
    "lr_decay",
    "batch_size",
    "train_tokens",
    "grad_clip",
    "seed",
)


def job_from_args(args: argparse.Namespace) -> TrainJob:
    overrides = {f: getattr(args, f) for f in _TRAIN_FIELDS if getattr(args, f) is not None}
    mix = TextMix(chat=args.chat, traces=args.traces, trace_ratio=args.trace_ratio)
    opts = RunOptions(
        log_every=args.log_every,
        checkpoint_every=args.checkpoint_every,
        progress=not args.no_progress,
    )
    if args.recipe == "default":
        if args.activations is not None:
            raise ValueError("--recipe default collects its own activations; drop --activations")
        job = default_job(
            args.out or DEFAULT_OUT,
            model_path=args.model,
            tokens=args.collect_tokens,
            resume=args.resume,
            progress=not args.no_progress,
            **overrides,
        )
        if args.layer is not None:
            job.layer = args.layer
        if args.context_size is not None:
            job.context_size = args.context_size
        return replace(
            job,
            mix=mix,
            options=opts,
            in_memory=args.in_memory,
            eval_rows=args.eval_rows,
            lm_eval=not args.no_lm_eval,
        )
    if (args.activations is None) == (args.model is None):
        raise ValueError(
            "give exactly one of --activations CACHE or --model PATH (or use --recipe default)"
        )
    if args.out is None:
        raise ValueError("--out is required (where the SAE folder goes)")
    layer = args.layer
    d_in = None
    if args.activations is not None:
        if not (args.activations / META_FILE).is_file():
            raise ActivationError(
                f"{args.activations}: not an activation cache (no {META_FILE}); run `sae-steer collect` first"
            )
        cache = DiskCache(args.activations, layer)
        layer, d_in = cache.layer, cache.d_in
        overrides.setdefault("train_tokens", cache.num_tokens)
    else:
        if layer is None:
            raise ValueError("--layer is required with --model")
        if not args.collect_tokens:
            raise ValueError("--collect-tokens is required with --model")
        overrides.setdefault("train_tokens", args.collect_tokens)
        d_in = (
            int(json.loads((Path(args.model) / "config.json").read_text()).get("hidden_size", 0))
            if (Path(args.model) / "config.json").is_file()
            else None
        )
    if "d_sae" not in overrides and d_in:
        overrides["d_sae"] = 16 * d_in
    overrides.setdefault("batch_size", min(4096, overrides["train_tokens"]))
    return TrainJob(
        out_dir=args.out,
        train=TrainConfig(**overrides),
        layer=int(layer),
        model=args.model,
        activations=args.activations,
        collect_tokens=args.collect_tokens or 0,
        context_size=args.context_size or 256,
        mix=mix,
        in_memory=args.in_memory,
        eval_rows=args.eval_rows,
        lm_eval=not args.no_lm_eval,
        resume=args.resume,
        options=opts,
    )


def _summary(metrics: dict[str, Any]) -> str:
    lines = [
        f"trained {metrics['config']['architecture']} d_sae={metrics['config']['d_sae']} on layer {metrics['layer']}"
    ]
    ev = metrics.get("eval") or {}
    for key in (
        "explained_variance",
        "l0",
        "dead_fraction",
        "mse",
        "ce_clean",
        "ce_sae",
        "ce_zero_ablation",
        "ce_recovered",
        "kl_to_clean",
    ):
        if key in ev:
            lines.append(f"  held-out {key:<20} {ev[key]:.4f}")
    lines.append(
        f"  collect {metrics['collect_seconds']:.0f}s, train {metrics['train_seconds']:.0f}s ({metrics['train_tokens_per_second']:.0f} tok/s), total {metrics.get('total_seconds', 0):.0f}s"
    )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        job = job_from_args(args)
        metrics = run_training(job)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        print(f"sae-steer train: bad configuration: {msgs}", file=sys.stderr)
        return 2
    except (TrainingError, ActivationError, CorpusError, ValueError, OSError) as e:
        print(f"sae-steer train: {e}", file=sys.stderr)
        return 1
    if world()[0] == 0:
        print(_summary(metrics))
        print(job.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
