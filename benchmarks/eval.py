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
import sys
from pathlib import Path
from typing import Any, Literal, cast

from pydantic import Field, field_validator

from benchmarks.client import EndpointError, RetryPolicy, resolve_model
from benchmarks.grading import GraderKind
from benchmarks.options import CommaList, EndpointOptions, add_option_groups, command_parser
from benchmarks.problems import LoadedProblems, load_problems
from benchmarks.report import write_report
from benchmarks.runner import SamplingConfig, SweepResult, run_sweep, shuffle_problems
from benchmarks.sweep import BASELINE, SpecFileError, SpecMap, grid_specs, load_specs_file
from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_steer_vllm.constants import SAMPLES_FILE
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.spec import Mode

PROG = "sae-steer eval"

DESCRIPTION = (
    "Run AIME-24 / MATH-500 / GSM8K (or any JSONL) against an OpenAI-compatible chat "
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

  # rebuild summary.md / plots from an existing log
  sae-steer eval --out runs/x --report-only
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
    """preset (aime24, math500, gsm8k) or a JSONL path; repeatable (default math500). Presets
    are read from $SAE_STEER_DATA or ../shared/data"""
    problem_field: str | None = None
    """JSONL field with the problem (default: preset's / problem)"""
    answer_field: str | None = None
    """JSONL field with the gold answer (default: preset's / answer)"""
    id_field: str | None = None
    """JSONL field with a unique id (default: preset's / id / line index)"""
    grader: Literal["math", "numeric"] | None = None
    """math: math-verify equivalence; numeric: exact number compare (default: numeric for
    gsm8k, math otherwise)"""
    limit: int | None = None
    """use only the first N problems of each dataset"""
    shuffle_seed: int | None = None
    """take a seeded random subset instead of the first N"""
    # --- steering sweep
    sae: str | None = None
    """SAE name registered on the server (for --features)"""
    features: CommaList[int] = []
    """comma list of feature ids"""
    strengths: CommaList[float] = [2.0]
    """comma list of strengths (x the feature's max activation)"""
    modes: CommaList[str] = ["clamp"]
    """comma list of clamp,add"""
    positions: Literal["all", "prompt", "generated"] = "all"
    """token positions steered (all, as the paper)"""
    specs_file: Path | None = None
    """JSON/JSONL of named specs: {"name": "x", "spec": {"interventions": [...]}}"""
    baseline: bool = True
    """run the unsteered baseline; --no-baseline skips it"""
    spec_check: bool = True
    """check every spec against the server's GET /v1/saes before the first request (unknown
    SAE, feature out of range, strength without statistics, mode, limits); --no-spec-check
    sends them and lets the server refuse each one. Servers without /v1/saes are not checked"""
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
        )
        for w in lp.warnings():
            print(f"warning: {w}", file=sys.stderr)
        if cfg.shuffle_seed is not None:
            lp.problems = shuffle_problems(lp.problems, cfg.shuffle_seed)[: cfg.limit]
        if not lp.problems:
            raise UsageError(f"{lp.path}: no usable problems")
        loaded.append(lp)
    return loaded


def run_eval(endpoint: EndpointOptions, sampling: SamplingConfig, cfg: EvalConfig) -> int:
    """The whole command: sweep every dataset, write the report; returns the exit code."""
    if cfg.report_only:
        if not (cfg.out / SAMPLES_FILE).is_file():
            raise UsageError(f"{cfg.out}/{SAMPLES_FILE} not found")
        rep = write_report(cfg.out, plots=cfg.plots)
        print(rep.summary_md.read_text())
        return 0
    specs = build_specs(cfg)
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)

    def body() -> int:
        return run_eval(
            model_from_args(EndpointOptions, args),
            model_from_args(SamplingConfig, args),
            model_from_args(EvalConfig, args),
        )

    return run_command(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
