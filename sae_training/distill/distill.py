"""``distill_model``: the default model fine-tuned on R1 traces into a small R1-distill stand-in.

DeepSeek built R1-Distill-Llama/Qwen by supervised fine-tuning of a base model on R1's
reasoning traces, with ``<think>`` / ``</think>`` as single tokens and a chat template whose
generation prompt opens ``<think>\\n``. This does the same at CPU scale: SmolLM2-135M-Instruct
(the default model), the shared R1 traces that fit ``max_len`` tokens, full fine-tuning
(:mod:`.finetune`), the R1 tokenizer surface (:mod:`.tokenizer`). The result is a plain Llama
HF folder that vLLM serves with the plugin like any Llama, and the reasoning half of the
model pair ``sae-steer diff`` compares.

The output folder is a cache, like the converted default model: while a run is under way it
holds the checkpoint and :data:`DISTILL_STATE_FILE`; a finished one has the model, the
tokenizer, :data:`DISTILL_CHECK_FILE` (before/after numbers) and a state file with
``complete: true``, and is reused unless ``force``. A rerun after an interruption continues
from the last checkpoint; different training settings against an existing checkpoint or
finished folder are an error, never a silent mix.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from sae_steer_vllm.command import CommandConfig
from sae_steer_vllm.constants import (
    DISTILL_CHECK_FILE,
    DISTILL_CHECKPOINT_FILE,
    DISTILL_MODEL_SUFFIX,
    DISTILL_STATE_FILE,
    TRACE_CORPUS,
)
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import atomic_write_json, json_digest

DISTILL_FORMAT = 1
"""Version of the recipe below (part of the settings digest: a change invalidates caches)."""

_RUN_CONTROL = {"out", "force", "stop_after", "threads", "progress"}
"""Fields that steer a run but not what it produces (left out of the settings digest)."""


class DistillConfig(CommandConfig):
    """Fine-tune the default model on the shared R1 reasoning traces into a small R1-distill
    stand-in: <think>/</think> as single tokens, DeepSeek-R1-Distill's chat template, full
    fine-tuning on CPU. Resumable (checkpoints; a rerun continues) and cached (a finished
    folder is reused unless --force). Prints and writes the before/after check: share of
    greedy generations closing </think>, reasoning-word rate per 100 tokens, held-out loss."""

    base: Path | None = None
    """HF model folder to distill into (default: the default model, prepared if missing)"""
    traces: str = TRACE_CORPUS
    """R1 traces JSONL (problem / reasoning / answer); a bare name is looked up in the shared data folder"""
    out: Path | None = None
    """output folder (default: <cache>/models/<base name>-R1-distill)"""
    max_len: int = Field(768, gt=16)
    """longest rendered trace trained on, in tokens (longer ones are left out, not truncated)"""
    max_examples: int | None = Field(120, gt=0)
    """train on at most this many traces (a seeded subset); sized for ~15 min on 2 cores"""
    epochs: int = Field(1, gt=0)
    """passes over the training traces"""
    grad_accum: int = Field(2, gt=0)
    """traces per optimizer step"""
    lr: float = Field(2e-4, gt=0.0)
    """peak learning rate (AdamW; linear warm-up, then linear decay to a tenth)"""
    warmup: int = Field(3, ge=0)
    """warm-up optimizer steps"""
    weight_decay: float = Field(0.0, ge=0.0)
    """AdamW weight decay"""
    holdout_every: int = Field(10, ge=2)
    """every N-th usable trace is held out (never trained on; its loss is checked)"""
    checkpoint_every: int = Field(10, gt=0)
    """save model + optimizer state every N optimizer steps"""
    check_problems: str = "gsm8k_test.jsonl"
    """problems for the before/after generation check (JSONL, 'problem' or 'question')"""
    n_check: int = Field(8, ge=1)
    """problems in the check"""
    check_max_tokens: int = Field(384, gt=0)
    """greedy tokens per problem in the check"""
    seed: int = 0
    """data order and subset"""
    stop_after: int | None = Field(None, gt=0)
    """stop (checkpointed) after this many optimizer steps of this run; rerun to continue"""
    threads: int | None = Field(None, gt=0)
    """torch threads (default: all cores)"""
    force: bool = False
    """redo a finished or started folder from scratch"""
    progress: bool = True
    """show progress bars"""


def default_out(base: Path) -> Path:
    from sae_steer_vllm.default_model import cache_root

    return cache_root() / "models" / f"{base.name}{DISTILL_MODEL_SUFFIX}"


def read_state(out: Path) -> dict[str, Any] | None:
    p = out / DISTILL_STATE_FILE
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return obj if isinstance(obj, dict) else None


def is_complete(out: Path) -> bool:
    state = read_state(out)
    return bool(state and state.get("complete"))


def _settings(cfg: DistillConfig, base: Path, traces: Path) -> dict[str, Any]:
    s = cfg.model_dump(exclude=_RUN_CONTROL, mode="json")
    s.update(base=str(base.resolve()), traces=str(traces.resolve()), format=DISTILL_FORMAT)
    return s


def distill_model(cfg: DistillConfig) -> Path:
    """Fine-tune (or reuse / continue) and return the output HF folder; see the module doc."""
    from sae_steer_vllm.default_model import prepare_default_model
    from sae_training.corpus import data_file

    base = cfg.base if cfg.base is not None else prepare_default_model()
    if not (base / "config.json").is_file():
        raise UsageError(f"--base {base}: not an HF model folder (no config.json)")
    traces = data_file(cfg.traces)
    if not traces.is_file():
        raise UsageError(f"traces {traces}: no such file (set SAE_STEER_DATA or pass --traces)")
    if not data_file(cfg.check_problems).is_file():
        raise UsageError(f"check problems {data_file(cfg.check_problems)}: no such file")
    out = cfg.out if cfg.out is not None else default_out(base)
    settings = _settings(cfg, base, traces)
    digest = json_digest(settings)
    state = read_state(out)
    if cfg.force and out.exists():
        shutil.rmtree(out)
        state = None
    if state is not None and state.get("digest") != digest:
        raise UsageError(
            f"{out} holds a distill made with other settings ({state.get('settings')}); "
            "pass --force to redo it, or --out for a new folder"
        )
    if state is not None and state.get("complete"):
        return out
    return _run(cfg, base, traces, out, settings, digest)


def _run(
    cfg: DistillConfig, base: Path, traces: Path, out: Path, settings: dict[str, Any], digest: str
) -> Path:
    import torch

    old_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or os.cpu_count() or 1)
    try:
        return _distill(cfg, base, traces, out, settings, digest)
    finally:
        torch.set_num_threads(old_threads)


def _distill(
    cfg: DistillConfig, base: Path, traces: Path, out: Path, settings: dict[str, Any], digest: str
) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .check import load_problems, run_check
    from .data import load_traces
    from .finetune import Progress, Schedule, micro_batches, train
    from .tokenizer import grow_vocabulary, new_token_ids, r1_style_tokenizer

    torch.manual_seed(cfg.seed)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    state: dict[str, Any] = read_state(out) or {"digest": digest, "settings": settings}
    state.setdefault("wall_s", 0.0)
    problems = load_problems(cfg.check_problems, cfg.n_check)

    base_tok = AutoTokenizer.from_pretrained(str(base))
    tok = r1_style_tokenizer(AutoTokenizer.from_pretrained(str(base)))
    split = load_traces(  # first: bad data fails before any model work
        tok,
        traces,
        max_len=cfg.max_len,
        holdout_every=cfg.holdout_every,
        max_examples=cfg.max_examples,
        seed=cfg.seed,
    )
    state["data"] = split.summary()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if "before" not in state:  # the base model as it is served today: its own template
        state["before"] = run_check(model, base_tok, problems, cfg.check_max_tokens, []).as_dict()
        _save_state(out, state, started)
    added = grow_vocabulary(model, base_tok, tok)
    if "held_out_loss_before" not in state:
        from .check import held_out_loss

        model.eval()
        state["held_out_loss_before"] = held_out_loss(model, split.held_out)
    groups = micro_batches(len(split.train), cfg.epochs, cfg.grad_accum, cfg.seed)
    schedule = Schedule(cfg.lr, len(groups), min(cfg.warmup, len(groups)))
    state["steps_total"] = len(groups)
    _save_state(out, state, started)

    def on_step(prog: Progress) -> None:
        state.update(step=prog.step, losses=prog.losses)
        _save_state(out, state, started)

    ckpt = out / DISTILL_CHECKPOINT_FILE
    prog = train(
        model,
        split.train,
        schedule=schedule,
        groups=groups,
        checkpoint=ckpt,
        checkpoint_every=cfg.checkpoint_every,
        digest=digest,
        stop_after=cfg.stop_after,
        weight_decay=cfg.weight_decay,
        on_step=on_step,
        progress_bar=cfg.progress,
    )
    state.update(step=prog.step, losses=prog.losses)
    if prog.step < len(groups):
        _save_state(out, state, started)
        return out
    model.eval()
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    after = run_check(model, tok, problems, cfg.check_max_tokens, split.held_out)
    report = {
        "base": str(base),
        "traces": str(traces),
        "data": split.summary(),
        "steps": prog.step,
        "loss_first": prog.losses[0] if prog.losses else None,
        "loss_last": prog.losses[-1] if prog.losses else None,
        "held_out_loss_before": state["held_out_loss_before"],
        "held_out_loss_after": after.held_out_loss,
        "before": state["before"],
        "after": after.as_dict(),
        "tokens": new_token_ids(tok),
        "added_rows": added,
    }
    atomic_write_json(out / DISTILL_CHECK_FILE, report)
    state["complete"] = True
    _save_state(out, state, started)
    ckpt.unlink(missing_ok=True)
    return out


def _save_state(out: Path, state: dict[str, Any], started: float) -> None:
    snap = dict(state)
    snap["wall_s"] = round(float(state.get("wall_s", 0.0)) + time.monotonic() - started, 1)
    atomic_write_json(out / DISTILL_STATE_FILE, snap)


def read_check(out: Path) -> dict[str, Any] | None:
    """The before/after report of a finished distill folder (None if absent)."""
    p = out / DISTILL_CHECK_FILE
    return json.loads(p.read_text()) if p.is_file() else None


__all__ = [
    "DistillConfig",
    "default_out",
    "distill_model",
    "is_complete",
    "read_check",
    "read_state",
]
