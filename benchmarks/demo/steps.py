"""Demo steps 1-3: the model, the SAE, ReasonScore. Each calls the library function the
matching command calls (``sae-steer prepare-model``, ``train``, ``score``), and only adds
what makes the demo resumable: a fingerprint of the step's inputs in ``steps.json``.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.demo.config import DemoConfig, PipelineError
from benchmarks.demo.state import State, file_digest, say
from sae_steer_vllm.constants import (
    ACTIVATION_META,
    ACTIVATIONS_DIR,
    CHECKPOINT_FILE,
    DASHBOARD_DIR,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    STATS_FILE,
    TABLE_JSON,
    TRACE_CORPUS,
    TRAIN_METRICS_FILE,
)
from sae_steer_vllm.files import json_digest
from sae_steer_vllm.sae.stats_file import STATS_FORMAT_VERSION
from sae_training.tokens import CorpusSpec

SAE_FILES = (SAELENS_CFG, SAELENS_WEIGHTS, TRAIN_METRICS_FILE)
"""What an adopted training run contributes: the SAE and its training metrics."""
TABLE_TOP_K = 100
"""Rows of the ranked table (the study takes its top features from it)."""


# ------------------------------------------------------------------ step 1: model
def step_model(cfg: DemoConfig) -> Path:
    """The model folder: ``--model``, or the embedded default prepared once and cached."""
    from sae_steer_vllm.default_model import prepare_default_model

    model_path = Path(cfg.model) if cfg.model else prepare_default_model()
    if not (model_path / "config.json").is_file():
        raise PipelineError(f"{model_path}: not an HF model folder (no config.json)")
    say(f"model: {model_path}")
    return model_path


# ------------------------------------------------------------------ step 2: SAE
def sae_key(job: Any) -> str:
    """What makes two SAEs the same: the training config, layer, collection and model."""
    return json_digest(
        {
            "train": job.train.model_dump(),
            "layer": job.layer,
            "collect_tokens": job.collect_tokens,
            "context_size": job.context_size,
            "mix": asdict(job.mix),
            "model": str(job.model),
        }
    )


def finished_sae(folder: Path) -> bool:
    return all((folder / f).is_file() for f in (SAELENS_CFG, SAELENS_WEIGHTS))


def adoptable(folder: Path, job: Any) -> bool:
    """A finished run of exactly this job: its metrics name the same training config,
    layer and model, and its activation cache (when kept) is what the job would collect."""
    from sae_training import cache_matches

    try:
        metrics = json.loads((folder / TRAIN_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not finished_sae(folder) or not isinstance(metrics, dict):
        return False
    if metrics.get("config") != job.train.model_dump() or metrics.get("layer") != job.layer:
        return False
    if str(metrics.get("model")) != str(job.model):
        return False
    cache = folder / ACTIVATIONS_DIR
    if (cache / ACTIVATION_META).is_file():
        return bool(cache_matches(cache, job.collect_config()))
    return True


def step_sae(cfg: DemoConfig, root: Path, model_path: Path, state: State) -> Path:
    """Reuse ``<out>/sae``, adopt a finished run of the same recipe, or train (resuming a
    killed run from its checkpoint, reusing a matching activation cache)."""
    from sae_training import default_job, find_matching_cache, run_training

    sae_dir = root / "sae"
    job = default_job(
        sae_dir,
        model_path=model_path,
        tokens=cfg.collect_tokens,
        train_tokens=cfg.train_tokens,
        d_sae=cfg.d_sae,
        progress=True,
    )
    key = sae_key(job)
    if state.done("sae", key) and finished_sae(sae_dir):
        say(f"reusing the SAE in {sae_dir} (same configuration)")
        return sae_dir
    for cand in cfg.reuse_sae_from:
        if cand.resolve() != sae_dir.resolve() and adoptable(cand, job):
            say(f"adopting the finished default-recipe SAE from {cand} (same configuration)")
            if sae_dir.exists():
                shutil.rmtree(sae_dir)
            sae_dir.mkdir(parents=True)
            for f in SAE_FILES:
                shutil.copy2(cand / f, sae_dir / f)
            state.mark("sae", key, True, adopted_from=str(cand))
            return sae_dir
    resume = state.key("sae") == key and (sae_dir / CHECKPOINT_FILE).is_file()
    if not resume and sae_dir.exists():
        shutil.rmtree(sae_dir)
    cache = find_matching_cache(cfg.reuse_activations_from, job.collect_config())
    if cache is not None:
        say(f"reusing the activation cache {cache} (same model, layer, tokens and mix)")
    if resume:
        say(f"resuming the interrupted training run in {sae_dir}")
    job = replace(job, activations=cache, resume=resume)
    say(
        f"layer {job.layer}, {job.train.architecture} SAE, d_sae={job.train.d_sae}, "
        f"{job.collect_tokens} activation tokens, {job.train.train_tokens} training tokens"
    )
    state.mark("sae", key, False)
    metrics = run_training(job)
    ev = metrics.get("eval") or {}
    if ev:
        say(
            "held-out: "
            + ", ".join(f"{k}={ev[k]:.3f}" for k in ("explained_variance", "l0") if k in ev)
        )
    state.mark("sae", key, True)
    return sae_dir


# ------------------------------------------------------------------ step 3: ReasonScore
def score_key(cfg: DemoConfig, sae_dir: Path) -> str:
    return json_digest(
        {
            "sae": file_digest(sae_dir / SAELENS_WEIGHTS),
            "tokens": cfg.score_tokens,
            "ctx": cfg.score_ctx,
            "token_check": cfg.token_check,
            "token_texts": cfg.token_texts,
            "dashboard_top": cfg.dashboard_top,
            # statistics counted another way (format 2: burn-in, quantile unit) are recomputed
            "stats_format": STATS_FORMAT_VERSION,
            "burn_in": CorpusSpec(Path(TRACE_CORPUS), ctx=cfg.score_ctx).burn_in,
        }
    )


def step_score(
    cfg: DemoConfig, root: Path, sae_dir: Path, model_path: Path, state: State
) -> tuple[Path, Path, Path]:
    """(statistics file beside the SAE, ranked table JSON, dashboard index), computed by
    ``sae_training.score_sae`` (what ``sae-steer score`` runs) in one call."""
    stats_path = sae_dir / STATS_FILE
    table_dir = root / "reasonscore"
    dash_dir = root / DASHBOARD_DIR
    table, index = table_dir / TABLE_JSON, dash_dir / "index.html"
    key = score_key(cfg, sae_dir)
    if state.done("score", key) and all(p.is_file() for p in (stats_path, table, index)):
        say(f"reusing the statistics, ranked table and dashboards ({table})")
        return stats_path, table, index
    from sae_training import score_sae

    state.mark("score", key, False)
    say(
        f"feature statistics over {cfg.score_tokens} tokens of reasoning traces, "
        f"token-dependence check of the top {cfg.token_check} features, "
        f"dashboards of the top {cfg.dashboard_top}"
    )
    out = score_sae(
        sae_dir,
        model_path,
        TRACE_CORPUS,
        max_tokens=cfg.score_tokens,
        ctx=cfg.score_ctx,
        top_k=TABLE_TOP_K,
        token_check=cfg.token_check,
        token_texts=cfg.token_texts,
        dashboard_top=cfg.dashboard_top,
        stats_path=stats_path,
        table_dir=table_dir,
        dashboard_dir=dash_dir,
        progress=True,
    )
    if out.dashboard is None:
        raise PipelineError("scoring wrote no dashboards (dashboard_top must be >= 1)")
    state.mark("score", key, True)
    return out.stats, out.table_json, out.dashboard
