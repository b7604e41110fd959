"""``sae-steer explain``: explain SAE features with an LLM and score the explanations.

The features (top-k or a ReasonScore quantile of the ranked statistics, or a list) are
explained from their top-activating contexts and scored by detection and fuzzing on
held-out contexts (:mod:`~benchmarks.interpret.explainer`); ``explanations.json`` goes
beside the SAE (or into ``--out``), where the ranked table and the dashboards show it;
the log, ``summary.md`` and the histogram go into the output folder. ``--steering`` runs
the steering-effects mode instead (:mod:`~benchmarks.interpret.steering_effects`).

Exit codes as everywhere: 2 bad options, 3 the LLM endpoint cannot be reached or refuses
us (checked before any work), 1 some features failed; a spent ``--max-requests`` budget
is a clean stop (0): what is done is written and ``--resume`` continues.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from benchmarks.client import EndpointError, resolve_model
from benchmarks.interpret.explain_log import ExplainLog
from benchmarks.interpret.explain_prompts import Decode
from benchmarks.interpret.explain_report import METHODS, distribution, scores_of, write_summary
from benchmarks.interpret.explainer import ExplainRun, ExplainSettings, explain_features
from benchmarks.interpret.llm import LLM, LLMConfig
from benchmarks.options import DEFAULT_BASE_URL, CommaList
from sae_steer_vllm.command import CommandConfig, run_model_command
from sae_steer_vllm.constants import EXPLAIN_DIR, EXPLAIN_LOG_FILE, STEERING_EFFECTS_FILE
from sae_steer_vllm.errors import EXIT_FAILED, UsageError
from sae_steer_vllm.sae.hub import HF_PREFIX, resolve_sae_location
from sae_training.features.contexts import FeatureContexts, feature_contexts
from sae_training.features.explanations import ExplanationsFile, write_explanations
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.ranked_table import select_features
from sae_training.recipe import DEFAULT_OUT

PROG = "sae-steer explain"
SCORING = (
    "balanced accuracy on held-out contexts (detection: activating vs non-activating; "
    "fuzzing: true vs decoy marks); 95% CI: Agresti-Caffo adjusted Wald for the mean of "
    "two proportions; unreadable judge answers count as wrong"
)
STEERING_FIELDS = (
    "steer_url",
    "steer_model",
    "steer_sae",
    "strengths",
    "steer_prompts",
    "n_steer_prompts",
    "steer_max_tokens",
)


class ExplainConfig(CommandConfig):
    """Explain SAE features with an LLM from their top-activating contexts (activating tokens
    marked) and score each explanation on held-out contexts the explainer never saw:
    detection and fuzzing, balanced accuracy with a 95% interval, as delphi does. Any
    OpenAI-compatible endpoint; every prompt and answer is logged (explain_log.jsonl) and
    --resume re-uses them. --steering: describe what steering each feature does instead.
    """

    sae: Path = DEFAULT_OUT
    """SAE folder with its statistics (`sae-steer score`), or Hub address
    hf:owner/repo[/subfolder][@revision] (then --out is required)"""
    stats: Path | None = None
    """statistics file or folder (default: the SAE folder's)"""
    features: CommaList[int] = []
    """explicit features to explain, e.g. 12,345 (instead of --top-k / --quantile)"""
    top_k: int | None = Field(None, gt=0)
    """the top K features by ReasonScore (default 20)"""
    quantile: float | None = Field(None, gt=0.0, lt=1.0)
    """instead of --top-k: every feature whose ReasonScore is above this quantile"""
    llm_url: str | None = None
    """OpenAI-compatible base URL of the explainer / judge, ending in /v1 (default:
    $OPENAI_BASE_URL or http://127.0.0.1:8000/v1)"""
    llm_model: str | None = None
    """served model name there (default: the first model it lists)"""
    llm_api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the API key (EMPTY when unset)"""
    concurrency: int = Field(8, gt=0)
    """requests in flight at once"""
    max_requests: int | None = Field(None, ge=0)
    """hard budget of LLM requests for this run; when spent the run stops cleanly, writes
    what is done and says how many features remain (--resume continues)"""
    max_tokens: int = Field(512, gt=0)
    """answer budget of each request (reasoning models need more)"""
    temperature: float = Field(0.0, ge=0.0)
    """sampling temperature of the explainer and judge"""
    constrain: Literal["auto", "on", "off"] = "auto"
    """constrain every answer to the form that is read (a verdict list, an Explanation:
    line, JSON) with vLLM structured outputs; auto = when the endpoint is a vLLM server.
    Makes a small model's answers readable; a strong model rarely needs it"""
    batch_size: int = Field(5, gt=0)
    """contexts the judge sees per prompt"""
    n_explain: int = Field(10, gt=0)
    """top-activating contexts shown to the explainer"""
    n_held_out: int = Field(10, gt=0)
    """held-out activating contexts to score on"""
    n_non_activating: int = Field(10, gt=0)
    """non-activating contexts mixed in for detection"""
    seed: int = 0
    """shuffles, decoys and the choice of non-activating contexts"""
    model: str | None = None
    """HF model folder whose tokenizer decodes the contexts (default: the statistics' model)"""
    out: Path | None = None
    """output folder for explanations.json, the log and summary.md (default:
    explanations.json beside the SAE, the rest in its explain/ folder)"""
    resume: bool = False
    """continue a run in the output folder, re-using every logged answer"""
    progress: bool = True
    """show a progress bar"""
    steering: bool = False
    """run the steering-effects mode instead of explanations"""
    steer_url: str | None = None
    """the steering server (default: --llm-url)"""
    steer_model: str | None = None
    """served model name there (default: the first it serves)"""
    steer_sae: str | None = None
    """the SAE id on that server (default: the only one it serves)"""
    strengths: CommaList[float] = [-2.0, 2.0]
    """clamp strengths (x max_activation); 0 = no steering is always added"""
    steer_prompts: str | None = None
    """JSONL of problems (benchmarks.problems format); default gsm8k_test"""
    n_steer_prompts: int = Field(4, gt=0)
    """prompts generated on per feature and strength"""
    steer_max_tokens: int = Field(128, gt=0)
    """tokens generated per steered prompt"""

    @property
    def url(self) -> str:
        return self.llm_url or os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)

    @property
    def api_key(self) -> str:
        return os.environ.get(self.llm_api_key_env) or "EMPTY"


def _sae_dir(cmd: ExplainConfig) -> Path:
    if str(cmd.sae).startswith(HF_PREFIX):
        if cmd.out is None:
            raise UsageError(f"--sae {cmd.sae}: pass --out (nothing is written into the Hub cache)")
        return resolve_sae_location(str(cmd.sae))
    if not cmd.sae.is_dir():
        raise UsageError(f"SAE folder {cmd.sae} not found (pass --sae)")
    return cmd.sae


def choose_features(cmd: ExplainConfig, stats: FeatureStats) -> list[int]:
    """--features, --quantile or --top-k (one of them), checked against the SAE's size."""
    given = [n for n in ("features", "top_k", "quantile") if getattr(cmd, n) not in (None, [])]
    if len(given) > 1:
        raise UsageError(f"give one of --features, --top-k, --quantile (got {', '.join(given)})")
    if cmd.features:
        bad = [f for f in cmd.features if not 0 <= f < stats.d_sae]
        if bad:
            raise UsageError(f"--features {bad}: the SAE has {stats.d_sae} features")
        return list(dict.fromkeys(cmd.features))
    return select_features(stats, cmd.top_k or 20, cmd.quantile)


def load_decoder(model: str | None) -> Decode:
    """The tokenizer's ``decode`` (special tokens kept: they are part of the context)."""
    if not model:
        raise UsageError("the statistics name no model: pass --model (an HF model folder)")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model))
    except Exception as e:  # transformers raises many types for a bad folder
        raise UsageError(f"--model {model}: cannot load its tokenizer ({e})") from None

    def decode(ids: Sequence[int]) -> str:
        return str(tok.decode(list(ids), clean_up_tokenization_spaces=False))

    return decode


def _meta(
    cmd: ExplainConfig, cfg: LLMConfig, stats_path: Path, features: list[int]
) -> dict[str, Any]:
    sel = (
        f"list of {len(features)}"
        if cmd.features
        else f"ReasonScore above quantile {cmd.quantile}"
        if cmd.quantile is not None
        else f"ReasonScore top {cmd.top_k or 20}"
    )
    return {
        "explainer": cfg.model,
        "llm_url": cfg.url,
        "temperature": cfg.temperature,
        "max_tokens": cfg.max_tokens,
        "constrained": cfg.constrain == "on",
        "stats": str(stats_path),
        "selection": sel,
        "n_explain": cmd.n_explain,
        "n_held_out": cmd.n_held_out,
        "n_non_activating": cmd.n_non_activating,
        "batch_size": cmd.batch_size,
        "seed": cmd.seed,
        "scoring": SCORING,
    }


async def _explain(
    cfg: LLMConfig,
    cmd: ExplainConfig,
    contexts: list[FeatureContexts],
    decode: Decode,
    log: ExplainLog,
) -> ExplainRun:
    llm = LLM(cfg)
    try:
        settings = ExplainSettings(seed=cmd.seed, batch_size=cmd.batch_size)
        return await explain_features(llm, log, contexts, decode, settings, progress=cmd.progress)
    finally:
        await llm.close()


async def _check(cfg: LLMConfig) -> LLMConfig:
    """The endpoint checked, and the config with ``constrain`` resolved for it."""
    llm = LLM(cfg)
    try:
        await llm.check()
        return llm.cfg
    finally:
        await llm.close()


def _steering(
    cmd: ExplainConfig, cfg: LLMConfig, features: list[int], out_dir: Path
) -> tuple[Path, Path]:
    from benchmarks.interpret.steering_effects import (
        SteeringExplainOptions,
        run_steering_explain_async,
    )

    values = {name: getattr(cmd, name) for name in STEERING_FIELDS}
    values["steer_url"] = cmd.steer_url or cfg.url
    opts = SteeringExplainOptions(**values)

    async def go() -> Path:
        llm = LLM(cfg)
        try:
            return await run_steering_explain_async(opts, llm, features, out_dir, cmd.resume)
        finally:
            await llm.close()

    table = asyncio.run(go())
    print(f"steering effects: {table}")
    return table, out_dir / STEERING_EFFECTS_FILE


def run_explain(cmd: ExplainConfig) -> tuple[Path, Path]:
    """The library verb of ``sae-steer explain`` (the demo calls it; prints what the
    command prints): ``(explanations.json, summary.md)``, or with ``steering``
    ``(steering_effects.md, steering_effects.json)``.

    A spent budget returns normally (``summary.md`` lists the remaining features); features
    whose requests failed are listed there too; an endpoint that went away mid-run raises
    :class:`EndpointError` after what is done was written.
    """
    return _execute(cmd)[0]


def _run(cmd: ExplainConfig) -> int:
    _, run = _execute(cmd)
    return EXIT_FAILED if run is not None and run.with_status("failed") else 0


def _execute(cmd: ExplainConfig) -> tuple[tuple[Path, Path], ExplainRun | None]:
    sae = _sae_dir(cmd)
    stats_path = cmd.stats or sae
    stats = FeatureStats.load(stats_path)
    if cmd.stats is None:
        stats.check_weights(sae)
    features = choose_features(cmd, stats)
    if not features:
        raise UsageError("no feature selected (the quantile is too high?)")
    out_dir = cmd.out or sae / EXPLAIN_DIR
    contexts: list[FeatureContexts] = []
    decode: Decode | None = None
    if not cmd.steering:  # local inputs first: a bad one is reported before the endpoint
        contexts = [
            feature_contexts(
                stats,
                f,
                n_explain=cmd.n_explain,
                n_held_out=cmd.n_held_out,
                n_non_activating=cmd.n_non_activating,
                seed=cmd.seed,
            )
            for f in features
        ]
        decode = load_decoder(cmd.model or stats.meta.get("model"))
    model = resolve_model(cmd.url, cmd.llm_model, api_key=cmd.api_key)
    cfg = LLMConfig(
        url=cmd.url,
        model=model,
        api_key=cmd.api_key,
        concurrency=cmd.concurrency,
        max_requests=cmd.max_requests,
        max_tokens=cmd.max_tokens,
        temperature=cmd.temperature,
        constrain=cmd.constrain,
    )
    cfg = asyncio.run(_check(cfg))  # unreachable / refusing / wrong model: exit 3 before any work
    out_dir.mkdir(parents=True, exist_ok=True)
    if cmd.steering or decode is None:
        return _steering(cmd, cfg, features, out_dir), None
    log = ExplainLog(out_dir / EXPLAIN_LOG_FILE, resume=cmd.resume)
    run = asyncio.run(_explain(cfg, cmd, contexts, decode, log))
    meta = _meta(cmd, cfg, Path(stats_path), features)
    written = write_explanations(cmd.out or sae, ExplanationsFile(meta=meta, features=run.done))
    summary = write_summary(out_dir, run, meta, written)
    _report(cmd, run, written, summary)
    return (written, summary), run


def _report(cmd: ExplainConfig, run: ExplainRun, written: Path, summary: Path) -> None:
    done = run.done
    print(f"explanations: {written}  ({len(done)} of {len(run.outcomes)} features)")
    print(f"summary     : {summary}")
    print(f"requests    : {run.requests_made} sent, {run.answers_reused} re-used from the log")
    for m in METHODS:
        d = distribution(scores_of(done, m))
        if d is not None:
            print(f"{m:<9}   : mean {d.mean:.3f}, median {d.median:.3f} over {d.n} features")
    if run.endpoint_error is not None:
        raise EndpointError(
            f"{run.endpoint_error}\nfinished features are written; rerun with --resume"
        )
    remaining = run.with_status("remaining")
    if remaining:
        print(
            f"budget of {cmd.max_requests} requests spent: {len(remaining)} features remain; "
            "rerun the same command with --resume (and a larger --max-requests) to finish them"
        )
    for o in run.with_status("failed"):
        print(f"feature {o.feature} failed: {o.error}")


def main(argv: list[str]) -> int:
    """``sae-steer explain [options]``: options are the fields of :class:`ExplainConfig`."""
    return run_model_command(PROG, ExplainConfig, _run, argv)
