"""``diff_models``: the whole model diff, resumable condition by condition.

Order of work: check every input before loading anything heavy (SAE, both model folders
and their width, both corpora, the statistics file); collect the four conditions'
activations, one model in memory at a time; then per condition the SAE's feature activity
and the fine-tune cosines, each condition's result saved under a digest of everything that
produced it, so a rerun (or a run stopped half-way) recomputes only what is missing; last
the classification and the report, which are cheap and always redone (changing a threshold
needs no recomputation).
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import (
    ACTIVATIONS_DIR,
    DIFF_CONDITION_FILE,
    DIFF_FINETUNE_DIR,
    STATS_FILE,
)
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import json_digest
from sae_steer_vllm.sae import SAE, load_sae
from sae_steer_vllm.sae.tensor_file import read_safetensors, write_tensors
from sae_training.activation_sources import DiskCache
from sae_training.collection import CollectConfig
from sae_training.diffing.classify import (
    CONDITIONS,
    DataKind,
    ModelRole,
    Thresholds,
    class_counts,
    classify,
    condition_name,
    pattern_counts,
)
from sae_training.diffing.compare import compare, random_features
from sae_training.diffing.conditions import (
    activation_chunks,
    collect_config,
    condition_dir,
    corpus_path,
    ensure_activations,
    feature_activity,
    opens_think,
    pick_reasoning_model,
    training_source,
)
from sae_training.diffing.config import DiffConfig, DiffResult
from sae_training.diffing.finetune import (
    FinetuneSettings,
    finetune_cosines,
    settings_for,
    training_record,
)
from sae_training.diffing.report import write_report
from sae_training.features.feature_stats import FeatureStats, sae_weights_digest
from sae_training.lm import ResidReader, hidden_size, load_model, model_or_default

Cond = tuple[ModelRole, DataKind]


def _log(msg: str) -> None:
    print(f"sae-steer diff: {msg}", file=sys.stderr, flush=True)


def default_model_b(model_a: Path) -> Path:
    """`sae-steer distill`'s output for ``model_a``, which must be complete."""
    from sae_training.distill.distill import default_out, is_complete

    out = default_out(model_a)
    if not is_complete(out):
        raise UsageError(
            f"no --model-b given and no finished distilled model at {out}: run "
            "`sae-steer distill` first, or pass --model-b"
        )
    return out


def _check_model(path: Path, which: str, d_in: int) -> None:
    if not (path / "config.json").is_file():
        raise UsageError(f"--model-{which} {path}: not a Hugging Face model folder")
    width = hidden_size(path)
    if width is not None and width != d_in:
        raise UsageError(
            f"--model-{which} {path} has d_model {width}, but the SAE reads {d_in}-wide "
            "activations: both models must have the SAE's width"
        )


def _load_stats(cfg: DiffConfig, sae_dir: Path, d_sae: int) -> FeatureStats | None:
    path = cfg.stats if cfg.stats is not None else sae_dir / STATS_FILE
    if not path.exists():
        if cfg.stats is not None:
            raise UsageError(f"--stats {path}: no such file")
        return None
    stats = FeatureStats.load(path)
    if stats.d_sae != d_sae:
        raise UsageError(f"{path} has {stats.d_sae} features, the SAE {d_sae}")
    stats.check_weights(sae_dir)
    return stats


def _tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _collect_all(
    cfg: DiffConfig, paths: dict[ModelRole, Path], ccfgs: dict[Cond, CollectConfig], layer: int
) -> None:
    """Every condition's activation cache, loading each model only if it has one to fill."""
    from sae_training.activation_cache import cache_matches

    for role in ("a", "b"):
        todo = [
            c for c in CONDITIONS if c[0] == role and not cache_matches(_acts_dir(cfg, c), ccfgs[c])
        ]
        if not todo:
            continue
        model, tok = load_model(paths[role], cfg.device)
        ResidReader(model, layer)  # the layer exists in this model, or a clear error
        for c in todo:
            _log(f"collecting {condition_name(*c)} ({cfg.tokens} tokens)")
            ensure_activations(ccfgs[c], _acts_dir(cfg, c), tok, model, progress=cfg.progress)
        del model
        gc.collect()


def _device(cfg: DiffConfig) -> torch.device:
    """Where the SAE encodes: ``--device``, else the first GPU, else the CPU."""
    if cfg.device:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _acts_dir(cfg: DiffConfig, c: Cond) -> Path:
    return condition_dir(cfg.out, *c) / ACTIVATIONS_DIR


def _condition_result(
    cfg: DiffConfig,
    sae: SAE,
    c: Cond,
    settings: FinetuneSettings,
    key: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """Activity + fine-tune cosines of one condition, from its saved file when present."""
    digest = json_digest({**key, "finetune": settings.as_dict()})
    folder = condition_dir(cfg.out, *c)
    path = folder / DIFF_CONDITION_FILE.format(digest=digest)
    if path.is_file():
        tensors, _ = read_safetensors(path)
        return tensors
    _log(f"fine-tuning on {condition_name(*c)} ({settings.steps} steps)")
    layer = sae.cfg.hook_layer
    activity = feature_activity(sae, activation_chunks(_acts_dir(cfg, c), layer))
    work = folder / DIFF_FINETUNE_DIR.format(digest=digest)
    source = training_source(sae, _acts_dir(cfg, c), layer)
    cos = finetune_cosines(sae, source, settings, work, progress=cfg.progress)
    tensors = {**activity, **cos}
    write_tensors(path, tensors, {"digest": digest})
    shutil.rmtree(work, ignore_errors=True)  # the checkpoint is only for an interrupted run
    return tensors


def diff_models(cfg: DiffConfig) -> DiffResult:
    """Run the model diff described by ``cfg``; see :class:`DiffConfig` and
    :mod:`sae_training.diffing.classify` for the rule."""
    t0 = time.perf_counter()
    sae_dir = Path(cfg.sae)
    if not sae_dir.is_dir():
        raise UsageError(f"--sae {sae_dir}: no such SAE folder")
    sae = load_sae(sae_dir)
    layer, d_in = sae.cfg.hook_layer, sae.cfg.d_in
    model_a = model_or_default(cfg.model_a)
    model_b = Path(cfg.model_b) if cfg.model_b is not None else default_model_b(model_a)
    _check_model(model_a, "a", d_in)
    _check_model(model_b, "b", d_in)
    chat, reasoning = corpus_path(cfg.chat, "chat"), corpus_path(cfg.reasoning, "reasoning")
    stats = _load_stats(cfg, sae_dir, sae.cfg.d_sae)
    if cfg.top_k > sae.cfg.d_sae:
        raise UsageError(f"--top-k {cfg.top_k} exceeds the SAE's {sae.cfg.d_sae} features")
    paths: dict[ModelRole, Path] = {"a": model_a, "b": model_b}
    think = {r: opens_think(_tokenizer(p)) for r, p in paths.items()}
    reasoning_model = pick_reasoning_model(cfg.reasoning_model, think["a"], think["b"])
    ctx = cfg.context_size or sae.cfg.context_size or 256
    ccfgs = {
        c: collect_config(
            paths[c[0]],
            c[1],
            layer=layer,
            tokens=cfg.tokens,
            context_size=ctx,
            prepend_bos=sae.cfg.prepend_bos,
            chat=chat,
            reasoning=reasoning,
        )
        for c in CONDITIONS
    }
    cfg.out.mkdir(parents=True, exist_ok=True)
    _collect_all(cfg, paths, ccfgs, layer)
    for c in CONDITIONS:  # a config.json without hidden_size escaped _check_model
        width = DiskCache(_acts_dir(cfg, c), layer).d_in
        if width != d_in:
            raise UsageError(
                f"model {c[0].upper()} gives {width}-wide activations at layer {layer}, "
                f"but the SAE reads {d_in}-wide ones"
            )
    t_collected = time.perf_counter()

    sae = sae.to(_device(cfg))
    ref = CONDITIONS[0]
    ref_l0 = float(feature_activity(sae, activation_chunks(_acts_dir(cfg, ref), layer))["l0"])
    settings = settings_for(
        sae,
        training_record(sae_dir),
        DiskCache(_acts_dir(cfg, ref), layer).head(32768),
        ref_l0,
        lr=cfg.lr,
        l1_coeff=cfg.l1_coeff,
        steps=cfg.steps,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
    )
    sae_digest = sae_weights_digest(sae_dir)
    results = {
        c: _condition_result(
            cfg,
            sae,
            c,
            settings,
            {"sae": sae_digest, "collect": repr(ccfgs[c])},
        )
        for c in CONDITIONS
    }
    t_tuned = time.perf_counter()

    stack = {k: torch.stack([results[c][k] for c in CONDITIONS]) for k in ("density", "mean")}
    stack.update(
        {k: torch.stack([results[c][k] for c in CONDITIONS]) for k in ("cos_dec", "cos_enc")}
    )
    thresholds = Thresholds(
        min_density=cfg.min_density,
        relative_density=cfg.relative_density,
        min_decoder_cos=cfg.min_decoder_cos,
        min_encoder_cos=cfg.min_encoder_cos,
    )
    classes, present = classify(
        stack["density"], stack["cos_dec"], stack["cos_enc"], thresholds, reasoning_model
    )
    rs: dict[str, Any] | None = None
    if stats is not None:
        top = stats.ranking()[: cfg.top_k].tolist()
        rand = random_features(classes, top, cfg.random_count, cfg.seed)
        rs = {"top": top, "random": rand, "per_class": compare(classes, top, rand)}
    seconds = {
        "collect": round(t_collected - t0, 1),
        "finetune": round(t_tuned - t_collected, 1),
    }
    meta = {
        "sae": str(sae_dir),
        "layer": layer,
        "model_a": str(model_a),
        "model_b": str(model_b),
        "reasoning_model": reasoning_model,
        "reasoning_model_rule": cfg.reasoning_model,
        "chat": str(chat),
        "reasoning": str(reasoning),
        "tokens_per_condition": cfg.tokens,
        "context_size": ctx,
        "finetune": settings.as_dict(),
        "thresholds": thresholds.__dict__,
        "seed": cfg.seed,
        "stats": None if stats is None else str(cfg.stats or sae_dir / STATS_FILE),
        "seconds": seconds,
    }
    json_path, md_path, plot_path = write_report(
        cfg.out,
        meta=meta,
        arrays=stack,
        present=present,
        classes=classes,
        counts=class_counts(classes),
        patterns=pattern_counts(present, classes),
        reasonscore=rs,
    )
    seconds["total"] = round(time.perf_counter() - t0, 1)
    return DiffResult(
        out_dir=cfg.out,
        json_path=json_path,
        report_path=md_path,
        plot_path=plot_path,
        counts=class_counts(classes),
        classes=classes,
        reasonscore=rs,
        seconds=seconds,
    )
