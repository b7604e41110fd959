"""``sae-steer eval``: reasoning benchmarks with steering sweeps against an OpenAI-compatible endpoint.

Imports neither torch nor vLLM, so it starts fast and runs on any client
machine. Exit codes: 0 all samples answered, 1 some samples failed or a spec
was rejected (see summary.md), 2 bad arguments or input files, 3 the endpoint
cannot be used, 130 interrupted (rerun with ``--resume``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator

from benchmarks.client import EndpointError, RetryPolicy, resolve_model
from benchmarks.grading import GraderKind
from benchmarks.judge import JudgeConfig
from benchmarks.multiple_choice import DEFAULT_CHOICE_SEED
from benchmarks.options import CommaList, EndpointOptions, add_option_groups, command_parser
from benchmarks.problems import LoadedProblems, load_problems
from benchmarks.readout import readout_request
from benchmarks.report import write_report
from benchmarks.runner import SweepResult, run_sweep, shuffle_problems
from benchmarks.sampling import SamplingConfig
from benchmarks.sweep import BASELINE, SpecFileError, SpecMap, grid_specs, load_specs_file
from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_steer_vllm.constants import SAMPLES_FILE
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.spec import FeatureIntervention, Mode, Positions, ReadoutSpec

PROG = "sae-steer eval"

DESCRIPTION = (
    "Run AIME-24 / MATH-500 / GSM8K / GPQA (or any JSONL) against an OpenAI-compatible chat "
    "endpoint, over a baseline and a grid of SAE steering specs; log every sample, "
    "grade with math-verify, and write summary.md, metrics.json and plots."
)

EXAMPLES = """\
examples:
  # 20 MATH-500 problems: baseline + feature 123 clamped at strengths 2 and 4
  sae-steer eval --base-url http://127.0.0.1:8000/v1 --dataset math500 --limit 20 \\
      --sae default --features 123 --strengths 2,4 --max-tokens 1024 --out runs/math500-f123

  # any JSONL, own field names, 4 samples per problem (pass@1 and maj@4)
  sae-steer eval --dataset my.jsonl --problem-field question --answer-field gold -n 4

  # a file of named specs (JSONL of {"name": ..., "spec": {...}}), continue an interrupted run
  sae-steer eval --specs-file specs.jsonl --out runs/x --resume

  # the paper's protocol (prompt, stop, T 0.6, top-p 0.95, 32768 tokens) from a config file
  sae-steer eval --config configs/paper_r1_llama8b_eval.json --out runs/paper

  # GPQA-Diamond from your own file (gated: see docs/eval.md for the format)
  sae-steer eval --dataset gpqa_diamond.jsonl --grader choice --max-tokens 32768

  # clamp feature 123 and watch how it moves features 123, 7 and 88 during generation
  # (a server started with `sae-steer serve --readout`)
  sae-steer eval --sae default --features 123 --strengths 2,4 --readout default --watch 123,7,88

  # rebuild summary.md / plots from an existing log
  sae-steer eval --out runs/x --report-only

Options given on the command line override --config.
"""


class EvalConfig(CommandConfig):
    """The options of ``sae-steer eval`` beyond the endpoint and the sampling settings."""

    # --- requests
    concurrency: int = Field(default=8, ge=1)
    """requests in flight"""
    max_attempts: int = Field(default=5, ge=1)
    """attempts per request on connection errors, timeouts, 429 and 5xx; backoff 1s, 2s,
    4s ... (HTTP 400 is never retried)"""
    request_timeout: float = Field(default=3600.0, gt=0)
    """seconds per request"""
    # --- problems
    dataset: list[str] | None = Field(
        default=None, json_schema_extra={"cli": {"action": "append", "nargs": None}}
    )
    """preset (aime24, math500, gsm8k, gpqa) or a JSONL path; repeatable (default math500).
    Presets are read from $SAE_STEER_DATA or ../shared/data; gpqa is gated, so
    gpqa_diamond.jsonl there is your own file"""
    problem_field: str | None = None
    """JSONL field with the problem (default: preset's / problem)"""
    answer_field: str | None = None
    """JSONL field with the gold answer (default: preset's / answer)"""
    id_field: str | None = None
    """JSONL field with a unique id (default: preset's / id / line index)"""
    grader: Literal["math", "numeric", "choice"] | None = None
    """math: math-verify equivalence; numeric: exact number compare; choice: a
    multiple-choice file, graded by letter (default: numeric for gsm8k, choice for gpqa,
    math otherwise)"""
    choice_seed: int = DEFAULT_CHOICE_SEED
    """multiple choice: seed of the per-item shuffle of the choices (simple-evals' 0)"""
    limit: int | None = None
    """use only the first N problems of each dataset"""
    shuffle_seed: int | None = None
    """take a seeded random subset instead of the first N"""
    # --- measuring
    think_end_id: int | None = None
    """token id of </think> on the served model (default: asked from the server's /tokenize;
    reasoning tokens are then counted from the completion's token ids)"""
    reasoning_from_chars: bool = False
    """estimate reasoning tokens from characters instead of token ids"""
    judge_url: str | None = None
    """OpenAI-compatible base URL of an LLM judge for the answers math-verify cannot parse"""
    judge_model: str | None = None
    """the judge's model name (needed with --judge-url)"""
    judge_api_key: str | None = None
    """the judge's API key (default: $JUDGE_API_KEY or EMPTY)"""
    judge_max_tokens: int = Field(default=1024, ge=1)
    """the judge's completion budget"""
    # --- steering sweep
    sae: str | None = None
    """SAE name registered on the server (for --features)"""
    features: CommaList[int] = []
    """comma list of feature ids"""
    strengths: CommaList[float] = [2.0]
    """comma list of strengths (x the feature's max activation)"""
    modes: CommaList[str] = ["clamp"]
    """comma list of clamp,add"""
    positions: Positions = "all"
    """token positions steered: all (as the paper), prompt, generated, or the reasoning phases
    thinking / answer (the server must have think markers: docs/conditional_steering.md)"""
    specs_file: Path | None = None
    """JSON/JSONL of named specs: {"name": "x", "spec": {"interventions": [...]}}"""
    baseline: bool = True
    """run the unsteered baseline; --no-baseline skips it"""
    spec_check: bool = True
    """check every spec against the server's GET /v1/saes before the first request (unknown
    SAE, feature out of range, strength without statistics, mode, limits); --no-spec-check
    sends them and lets the server refuse each one. Servers without /v1/saes are not checked"""
    # --- readout
    readout: str | None = Field(default=None, json_schema_extra={"cli": {"metavar": "SAE"}})
    """SAE (a name registered on the server) whose --watch features every request, steered
    or not, reads at the generated tokens; each sample records their summary and the report
    gets a table per arm. Needs a server started with `sae-steer serve --readout`: checked
    against its GET /v1/saes before the first request"""
    watch: CommaList[int] = []
    """comma list of features of the --readout SAE to watch (default: every feature the sweep
    steers on that SAE, from --features and --specs-file)"""
    # --- output
    out: Path = Path("eval-results")
    """output folder"""
    resume: bool = False
    """continue the run in --out"""
    report_only: bool = False
    """only rebuild the report from --out"""
    plots: bool = True
    """write the PNG plots; --no-plots skips them"""
    grader_workers: int = Field(default=2, ge=1)
    """grading processes"""
    quiet: bool = Field(False, json_schema_extra={"cli": {"aliases": ["-q"]}})
    """no progress bars"""

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, modes: list[str]) -> list[str]:
        bad = [m for m in modes if m not in ("clamp", "add")]
        if bad:
            raise ValueError(f"unknown mode(s) {bad} (clamp, add)")
        return modes


GROUPS = {
    "requests": ("concurrency", "max_attempts", "request_timeout"),
    "problems": (
        "dataset",
        "problem_field",
        "answer_field",
        "id_field",
        "grader",
        "choice_seed",
        "limit",
        "shuffle_seed",
    ),
    "steering sweep": (
        "sae",
        "features",
        "strengths",
        "modes",
        "positions",
        "specs_file",
        "baseline",
        "spec_check",
    ),
    "readout": ("readout", "watch"),
    "measuring": (
        "think_end_id",
        "reasoning_from_chars",
        "judge_url",
        "judge_model",
        "judge_api_key",
        "judge_max_tokens",
    ),
    "output": ("out", "resume", "report_only", "plots", "grader_workers", "quiet"),
}


def _json_obj(s: str) -> dict[str, Any]:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"invalid JSON ({e.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES)
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="JSON object with any of the options below (names as in --help, with "
        "underscores, e.g. configs/paper_r1_llama8b_eval.json); the command line wins",
    )
    add_model_options(p, EndpointOptions, group="endpoint")
    add_option_groups(p, EvalConfig, GROUPS)
    sampling = p.add_argument_group("sampling")
    # an argument group has add_argument, all add_model_options uses
    add_model_options(
        cast(argparse.ArgumentParser, sampling), SamplingConfig, exclude={"extra_body"}
    )
    sampling.add_argument(
        "--extra-body",
        type=_json_obj,
        default=argparse.SUPPRESS,
        help=SamplingConfig.model_fields["extra_body"].description,
    )
    return p


def build_specs(cfg: EvalConfig) -> SpecMap:
    """Baseline (unless ``--no-baseline``), the feature grid, then the specs file."""
    specs: SpecMap = {BASELINE: None} if cfg.baseline else {}
    if cfg.features:
        if not cfg.sae:
            raise SpecFileError("--features needs --sae (the SAE name registered on the server)")
        modes = cast(list[Mode], cfg.modes)
        specs.update(
            grid_specs(
                cfg.sae, cfg.features, cfg.strengths, modes, positions=cfg.positions, baseline=False
            )
        )
    if cfg.specs_file:
        for name, spec in load_specs_file(cfg.specs_file, baseline=False).items():
            if name in specs and not (name == BASELINE and spec is None):
                raise SpecFileError(
                    f"{cfg.specs_file}: spec name {name!r} already used by the grid"
                )
            specs[name] = spec
    if not specs:
        raise SpecFileError("nothing to run: --no-baseline without --features or --specs-file")
    return specs


def build_readout(cfg: EvalConfig, specs: SpecMap) -> ReadoutSpec | None:
    """What every request reads (``--readout``/``--watch``), or None.

    ``--watch`` defaults to the features the sweep steers on the ``--readout`` SAE (how
    steering one of them moves the others); a sweep that steers none of them needs
    ``--watch``.
    """
    if not cfg.readout:
        if cfg.watch:
            raise UsageError("--watch needs --readout (the SAE whose features to watch)")
        return None
    watch = list(cfg.watch)
    if not watch:
        steered = [
            iv.feature
            for s in specs.values()
            if s is not None
            for iv in s.interventions
            if isinstance(iv, FeatureIntervention) and iv.sae == cfg.readout
        ]
        watch = list(dict.fromkeys(steered))
    if not watch:
        raise UsageError(
            f"--readout {cfg.readout} needs --watch F1,F2,... (the sweep steers no feature of "
            f"{cfg.readout!r} to watch by default)"
        )
    return readout_request(cfg.readout, watch)


def load_datasets(cfg: EvalConfig) -> list[LoadedProblems]:
    """Every ``--dataset``, cut to ``--limit`` (after the seeded shuffle, if asked)."""
    loaded = []
    for ds in cfg.dataset or ["math500"]:
        lp = load_problems(
            ds,
            problem_field=cfg.problem_field,
            answer_field=cfg.answer_field,
            id_field=cfg.id_field,
            kind=cast(GraderKind | None, cfg.grader),
            limit=None if cfg.shuffle_seed is not None else cfg.limit,
            choice_seed=cfg.choice_seed,
        )
        for w in lp.warnings():
            print(f"warning: {w}", file=sys.stderr)
        if cfg.shuffle_seed is not None:
            lp.problems = shuffle_problems(lp.problems, cfg.shuffle_seed)[: cfg.limit]
        if not lp.problems:
            raise UsageError(f"{lp.path}: no usable problems")
        loaded.append(lp)
    return loaded


def _think_end(cfg: EvalConfig) -> int | Literal["auto"] | None:
    if cfg.reasoning_from_chars:
        return None
    return cfg.think_end_id if cfg.think_end_id is not None else "auto"


def judge_config(cfg: EvalConfig) -> JudgeConfig | None:
    """The LLM judge of ``--judge-url/--judge-model``, or None; one without the other is a
    usage error."""
    if cfg.judge_url is None and cfg.judge_model is None:
        return None
    if not (cfg.judge_url and cfg.judge_model):
        raise UsageError("--judge-url and --judge-model go together")
    key = cfg.judge_api_key or os.environ.get("JUDGE_API_KEY", "EMPTY")
    return JudgeConfig(
        url=cfg.judge_url, model=cfg.judge_model, api_key=key, max_tokens=cfg.judge_max_tokens
    )


def run_eval(endpoint: EndpointOptions, sampling: SamplingConfig, cfg: EvalConfig) -> int:
    """The whole command: sweep every dataset, write the report; returns the exit code."""
    if cfg.report_only:
        if not (cfg.out / SAMPLES_FILE).is_file():
            raise UsageError(f"{cfg.out}/{SAMPLES_FILE} not found")
        rep = write_report(cfg.out, plots=cfg.plots)
        print(rep.summary_md.read_text())
        return 0
    specs = build_specs(cfg)
    readout = build_readout(cfg, specs)
    judge = judge_config(cfg)
    loaded = load_datasets(cfg)

    from benchmarks.grading import Grader

    results: list[SweepResult] = []
    try:
        model = resolve_model(endpoint.url, endpoint.model, api_key=endpoint.key)
        n_items = sum(len(lp.problems) for lp in loaded) * len(specs) * sampling.samples
        print(
            f"{endpoint.url} model={model}: {len(specs)} spec(s) x "
            f"{', '.join(f'{lp.name}[{len(lp.problems)}]' for lp in loaded)} x "
            f"{sampling.samples} sample(s) = {n_items} requests -> {cfg.out}",
            file=sys.stderr,
        )
        if readout is not None:
            r = readout.saes[0]
            print(f"each request reads {r.sae} features {r.features}", file=sys.stderr)
        with Grader(workers=cfg.grader_workers) as grader:
            for i, lp in enumerate(loaded):
                results.append(
                    run_sweep(
                        endpoint.url,
                        model,
                        lp.problems,
                        specs,
                        out_dir=cfg.out,
                        dataset=lp.name,
                        sampling=sampling,
                        concurrency=cfg.concurrency,
                        resume=cfg.resume or i > 0,
                        api_key=endpoint.key,
                        request_timeout_s=cfg.request_timeout,
                        retry=RetryPolicy(max_attempts=cfg.max_attempts),
                        grader=grader,
                        progress=not cfg.quiet,
                        check_specs=cfg.spec_check,
                        think_end_id=_think_end(cfg),
                        judge=judge,
                        extra_config={"choice_seed": cfg.choice_seed},
                        readout=readout,
                    )
                )
    except EndpointError as e:
        if results or (cfg.out / SAMPLES_FILE).is_file():
            raise EndpointError(
                f"{e}\nfinished samples are kept in {cfg.out}; rerun with --resume"
            ) from None
        raise
    except KeyboardInterrupt:
        print(
            f"\ninterrupted: finished samples are in {cfg.out}/{SAMPLES_FILE}; "
            "rerun the same command with --resume to continue",
            file=sys.stderr,
        )
        raise
    return _report(cfg, results)


def _report(cfg: EvalConfig, results: list[SweepResult]) -> int:
    spec_errors: dict[str, str] = {}
    for r in results:
        spec_errors.update(r.spec_errors)
    # this run's records only: an older, larger run in the same folder stays in the log
    # but does not leak into this table (--report-only summarises the whole log)
    records = [rec for r in results for rec in r.records]
    rep = write_report(cfg.out, records, spec_errors=spec_errors, plots=cfg.plots)
    print(rep.summary_md.read_text())
    n_err = sum(r.n_errors for r in results)
    for name, msg in spec_errors.items():
        print(f"warning: spec {name!r} was rejected: {msg}", file=sys.stderr)
    if n_err:
        print(
            f"warning: {n_err} sample(s) failed (see error fields in {cfg.out}/{SAMPLES_FILE}); "
            "--resume retries them",
            file=sys.stderr,
        )
        return 1
    return 0


OPTION_MODELS: tuple[type[CommandConfig], ...] = (EndpointOptions, SamplingConfig, EvalConfig)


def load_config_file(path: Path) -> dict[str, Any]:
    """The options of a ``--config`` JSON file; an unknown name is a usage error naming it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a JSON object of options")
    known = {n for m in OPTION_MODELS for n in m.model_fields}
    unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
    if unknown:
        raise UsageError(f"{path}: unknown option(s) {unknown}")
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def body() -> int:
        if args.config is not None:
            given = {k: v for k, v in vars(args).items() if k != "config"}
            merged = argparse.Namespace(**{**load_config_file(args.config), **given})
        else:
            merged = args
        return run_eval(
            model_from_args(EndpointOptions, merged),
            model_from_args(SamplingConfig, merged),
            model_from_args(EvalConfig, merged),
        )

    return run_command(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
