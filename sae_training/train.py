"""``sae-steer train``: collect (if needed) -> train -> evaluate -> save a SAELens folder.

The command only turns options into a :class:`~sae_training.train_job.TrainJob` and runs
it (:func:`~sae_training.train_job.run_training`). Training options are the fields of
:class:`~sae_training.trainer.TrainConfig`, with its docstrings as help; their defaults
are TrainConfig's, or a named recipe's with ``--recipe default|paper-r1``
(:data:`~sae_training.recipe.RECIPES`). Under torchrun, ``python -m
sae_training.train`` runs data-parallel.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, create_model

from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_training.activation_sources import DiskCache
from sae_training.corpus import TextMix
from sae_training.errors import TrainingError
from sae_training.lm import hidden_size, model_or_default
from sae_training.recipe import DEFAULT_EXPANSION, DEFAULT_OUT, RECIPES, Recipe
from sae_training.train_job import TrainJob, run_training
from sae_training.trainer import RunOptions, TrainConfig, world

PROG = "sae-steer train"


class TrainCommand(CommandConfig):
    """Data and output options of ``sae-steer train`` (training options: :data:`TrainOptions`)."""

    recipe: Literal["default", "paper-r1"] | None = None
    """a named recipe, defaults for every option below: default (the default model, about
    11 min on 2 cores) or paper-r1 (the paper's released SAE: DeepSeek-R1-Distill-Llama-8B
    layer 19, SAELens 5.5 settings; needs --model; see docs/training.md)"""
    activations: Path | None = None
    """activation cache folder written by `sae-steer collect`"""
    model: str | None = None
    """HF model folder to collect activations from (default model with --recipe)"""
    layer: int | None = None
    """decoder layer whose resid_post to train on (recipe: 18)"""
    collect_tokens: int | None = None
    """tokens to collect when --model is given"""
    context_size: int | None = None
    """tokens per packed row when collecting (recipe: 256)"""
    prepend_bos: bool = True
    """start every packed row with BOS when collecting; --no-prepend-bos packs plain
    stream tokens (SAELens prepend_bos false; the paper-r1 recipe's setting)"""
    trace_ratio: float = TextMix.trace_ratio
    """fraction of documents from reasoning traces"""
    chat: str = TextMix.chat
    """chat JSONL (name in the shared data dir, or a path)"""
    traces: str = TextMix.traces
    """reasoning-trace JSONL"""
    in_memory: bool = False
    """keep collected activations in RAM instead of a disk cache"""
    out: Path | None = None
    """output folder (recipe: runs/default-sae)"""
    resume: bool = False
    """continue the run in --out from its checkpoint"""
    eval_rows: int = TrainJob.eval_rows
    """held-out rows for the final evaluation"""
    lm_eval: bool = True
    """run the CE-recovered / KL evaluation"""
    log_every: int = RunOptions.log_every
    """steps between log records"""
    checkpoint_every: int = RunOptions.checkpoint_every
    """steps between checkpoints"""
    progress: bool = True
    """show progress bars"""


def _optional_training_fields() -> dict[str, Any]:
    """TrainConfig's fields, each optional (None = not given), help = docstring + defaults."""
    fields: dict[str, Any] = {}
    for name, f in TrainConfig.model_fields.items():
        shown = [] if f.is_required() else [f"default {f.default}"]
        shown += [f"recipe {key} {r.train[name]}" for key, r in RECIPES.items() if name in r.train]
        help_text = (f.description or "") + (f" ({'; '.join(shown)})" if shown else "")
        # A flag (bool) keeps its default, so the parser offers --x or --no-x; it counts
        # as given only when typed (the options are dumped with exclude_unset).
        default = f.default if f.annotation is bool else None
        annotation = f.annotation if f.annotation is bool else f.annotation | None  # type: ignore[operator]
        fields[name] = (
            annotation,
            Field(default, description=help_text, json_schema_extra=f.json_schema_extra),
        )
    return fields


TrainOptions: type[BaseModel] = create_model("TrainOptions", **_optional_training_fields())
"""The ``training`` options: one per :class:`TrainConfig` field."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
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
    add_model_options(p, TrainCommand)
    add_model_options(p, TrainOptions, group="training")
    return p


def job_from_command(cmd: TrainCommand, overrides: dict[str, Any]) -> TrainJob:
    """The job the options describe; ``overrides`` are the TrainConfig fields given."""
    common: dict[str, Any] = {
        "mix": TextMix(chat=cmd.chat, traces=cmd.traces, trace_ratio=cmd.trace_ratio),
        "options": RunOptions(
            log_every=cmd.log_every, checkpoint_every=cmd.checkpoint_every, progress=cmd.progress
        ),
        "in_memory": cmd.in_memory,
        "eval_rows": cmd.eval_rows,
        "lm_eval": cmd.lm_eval,
    }
    if cmd.recipe is not None:
        return replace(_recipe_job(cmd, RECIPES[cmd.recipe], overrides), **common)
    if (cmd.activations is None) == (cmd.model is None):
        raise TrainingError(
            "give exactly one of --activations CACHE or --model PATH (or use --recipe default)"
        )
    if cmd.out is None:
        raise TrainingError("--out is required (where the SAE folder goes)")
    overrides = dict(overrides)
    d_in: int | None
    if cmd.activations is not None:
        cache = DiskCache(cmd.activations, cmd.layer)
        layer, d_in = cache.layer, cache.d_in
        overrides.setdefault("train_tokens", cache.num_tokens)
    else:
        if cmd.layer is None:
            raise TrainingError("--layer is required with --model")
        if not cmd.collect_tokens:
            raise TrainingError("--collect-tokens is required with --model")
        layer, d_in = cmd.layer, hidden_size(str(cmd.model))
        overrides.setdefault("train_tokens", cmd.collect_tokens)
    if "d_sae" not in overrides and d_in:
        overrides["d_sae"] = DEFAULT_EXPANSION * d_in
    default_batch = TrainConfig.model_fields["batch_size"].default
    overrides.setdefault("batch_size", min(default_batch, overrides["train_tokens"]))
    return TrainJob(
        out_dir=cmd.out,
        train=TrainConfig(**overrides),
        layer=int(layer),
        model=cmd.model,
        activations=cmd.activations,
        collect_tokens=cmd.collect_tokens or 0,
        context_size=cmd.context_size or TrainJob.context_size,
        prepend_bos=cmd.prepend_bos,
        resume=cmd.resume,
        **common,
    )


def _recipe_job(cmd: TrainCommand, recipe: Recipe, overrides: dict[str, Any]) -> TrainJob:
    """``--recipe NAME``: the recipe, scaled to ``--collect-tokens`` or to a cache's size.

    A cache must hold what the recipe collects (row length and row start), because the
    recipe is a claim about the data as much as about the optimiser.
    """
    if cmd.activations is None:
        if cmd.recipe == "default":  # the default model, runs/default-sae
            model, out = str(model_or_default(cmd.model)), cmd.out or DEFAULT_OUT
        elif cmd.model is None or cmd.out is None:
            raise TrainingError(
                f"--recipe {cmd.recipe} needs --out and --model (a local {recipe.model} "
                "folder) or --activations (a cache collected from it)"
            )
        else:
            model, out = cmd.model, cmd.out
        job = recipe.job(
            out,
            model,
            tokens=cmd.collect_tokens,
            layer=cmd.layer,
            context_size=cmd.context_size,
            resume=cmd.resume,
            progress=cmd.progress,
            **overrides,
        )
        return replace(job, prepend_bos=recipe.prepend_bos and cmd.prepend_bos)
    if cmd.recipe == "default":
        raise TrainingError("--recipe default collects its own activations; drop --activations")
    if cmd.out is None:
        raise TrainingError(f"--recipe {cmd.recipe} needs --out (where the SAE folder goes)")
    if cmd.model is not None:
        raise TrainingError("give --model or --activations, not both")
    cache = DiskCache(cmd.activations, cmd.layer)
    meta = cache.meta
    if (meta.context_size, meta.prepend_bos) != (recipe.context_size, recipe.prepend_bos):
        raise TrainingError(
            f"{cmd.activations} holds rows of {meta.context_size} tokens with "
            f"prepend_bos={meta.prepend_bos}; --recipe {cmd.recipe} trains on rows of "
            f"{recipe.context_size} with prepend_bos={recipe.prepend_bos}: collect a cache "
            "that way, or train without --recipe"
        )
    return TrainJob(
        out_dir=cmd.out,
        train=recipe.train_config(cache.num_tokens, **overrides),
        layer=cache.layer,
        activations=cmd.activations,
        context_size=meta.context_size,
        prepend_bos=meta.prepend_bos,
        resume=cmd.resume,
    )


def _summary(metrics: dict[str, Any]) -> str:
    cfg = metrics["config"]
    lines = [f"trained {cfg['architecture']} d_sae={cfg['d_sae']} on layer {metrics['layer']}"]
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
        f"  collect {metrics['collect_seconds']:.0f}s, train {metrics['train_seconds']:.0f}s "
        f"({metrics['train_tokens_per_second']:.0f} tok/s), "
        f"total {metrics.get('total_seconds', 0):.0f}s"
    )
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    cmd = model_from_args(TrainCommand, args)
    overrides = model_from_args(TrainOptions, args).model_dump(
        exclude_none=True, exclude_unset=True
    )
    job = job_from_command(cmd, overrides)
    metrics = run_training(job)
    if world()[0] == 0:
        print(_summary(metrics))
        print(job.out_dir)
    return 0


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return run_command(PROG, lambda: _run(args))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
