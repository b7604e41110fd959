"""``sae-steer explain --steering``: what steering each feature does, in words, grouped.

The paper's Table 2 (v1): for each feature, generate on a fixed prompt set with the feature
clamped at negative and positive strengths and without steering, let an LLM describe how the
steered outputs differ from the unsteered ones, then group the features by those
descriptions (:mod:`benchmarks.interpret.clusters`) into a table: cluster name, features,
what strengthening does, what weakening does.

Why it is built this way:

* generation is an ordinary sweep (:func:`benchmarks.runner.run_sweep_async` over
  :func:`benchmarks.sweep.grid_specs`): the same client, retries, spec pre-check against the
  server's ``GET /v1/saes``, and the same ``samples.jsonl`` resume, in its own folder
  (``steering_generations/``) of the output folder. Greedy decoding, so arms differ only by
  the steering. Strength is relative (x the feature's max activation), as in every sweep;
  the unsteered arm is shared by all features.
* every LLM prompt and answer goes to ``explain_log.jsonl`` (:mod:`benchmarks.interpret.
  explain_log`) under the kinds ``steer_describe`` and ``steer_cluster``, and ``resume``
  re-uses an answer whose prompt is unchanged: a run stopped anywhere loses nothing.
* a side (weakening or strengthening) whose outputs equal the unsteered ones on every prompt
  is reported as such without asking; a feature with no change on any side goes to the
  ``no visible effect`` group. An answer that is not the JSON asked for is ``unreadable``
  and its feature stays unclustered: nothing is guessed.
"""

from __future__ import annotations

import asyncio
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from benchmarks.client import check_endpoint, fetch_sae_list, make_client
from benchmarks.grading import Grader
from benchmarks.interpret.clusters import (
    Clustering,
    EffectCluster,
    FeatureEffect,
    Side,
    Status,
    cluster_prompt,
    clusters_schema,
    effects_table,
    group_rows,
    read_clusters,
)
from benchmarks.interpret.explain_log import ExplainLog
from benchmarks.interpret.llm import LLM, LLMBudgetExhausted, LLMRequestError
from benchmarks.interpret.steering_describe import (
    describe_prompt,
    description_schema,
    read_description,
)
from benchmarks.problems import Problem, load_problems
from benchmarks.results import SampleRecord
from benchmarks.runner import run_sweep_async
from benchmarks.sampling import SamplingConfig
from benchmarks.sweep import BASELINE, grid_name, grid_specs
from sae_steer_vllm.constants import (
    EXPLAIN_LOG_FILE,
    STEERING_EFFECTS_FILE,
    STEERING_EFFECTS_TABLE,
    STEERING_GENERATIONS_DIR,
)
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import atomic_write

__all__ = [
    "SteeringEffectsFile",
    "SteeringExplainOptions",
    "run_steering_explain",
    "run_steering_explain_async",
]

FORMAT_VERSION = 1
DESCRIBE_KIND = "steer_describe"
CLUSTER_KIND = "steer_cluster"
CLUSTER_FEATURE = -1
"""The log's ``feature`` for the clustering request (it is about all features)."""
DESCRIBE_MAX_TOKENS = 400
CLUSTER_MAX_TOKENS = 1500
GENERATION_CONCURRENCY = 8


class SteeringExplainOptions(BaseModel):
    """The steering mode's settings (``sae-steer explain`` passes its fields by name)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steer_url: str | None = None
    """the steering server (default: the LLM's URL)"""
    steer_model: str | None = None
    """served model name there (default: the first it serves)"""
    steer_sae: str | None = None
    """the SAE id on that server (default: the only one it serves)"""
    strengths: list[float] = Field(default_factory=lambda: [-2.0, 2.0])
    """clamp strengths (x max_activation); 0 = no steering is always added"""
    steer_prompts: str | None = None
    """JSONL of problems (benchmarks.problems format); default gsm8k_test"""
    n_steer_prompts: int = Field(default=4, ge=1)
    steer_max_tokens: int = Field(default=128, ge=1)

    @field_validator("strengths")
    @classmethod
    def _steered_strengths(cls, v: list[float]) -> list[float]:
        if any(not math.isfinite(s) for s in v):
            raise ValueError("strengths must be finite numbers")
        out = sorted({float(s) for s in v if s != 0})
        if not out:
            raise ValueError("give at least one non-zero strength (0, no steering, is always run)")
        return out

    @property
    def weakening(self) -> list[float]:
        return [s for s in self.strengths if s < 0]

    @property
    def strengthening(self) -> list[float]:
        return [s for s in self.strengths if s > 0]


class SteeringEffectsFile(BaseModel):
    """``steering_effects.json``: settings, each feature's effects, the groups."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    meta: dict[str, Any] = Field(default_factory=dict)
    features: list[FeatureEffect] = Field(default_factory=list)
    clusters: list[EffectCluster] = Field(default_factory=list)
    unclustered: list[int] = Field(default_factory=list)
    cluster_status: Literal["clustered", "unreadable", "not_asked"] = "not_asked"
    notes: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- the steering server
async def _resolve_server(opts: SteeringExplainOptions, llm: LLM) -> tuple[str, str, str, str]:
    """(url, model, sae, api_key): the options' values or the server's only choice."""
    url = opts.steer_url or llm.cfg.url
    key = llm.cfg.api_key if opts.steer_url is None or opts.steer_url == llm.cfg.url else "EMPTY"
    client = make_client(url, api_key=key, timeout_s=60.0)
    try:
        ids = await check_endpoint(client, opts.steer_model)
        listing = await fetch_sae_list(client, notice=lambda msg: None)
    finally:
        await client.close()
    model = opts.steer_model or (ids[0] if ids else None)
    if model is None:
        raise UsageError(f"{url} lists no models: pass --steer-model")
    if listing is None:
        raise UsageError(
            f"{url} does not answer GET /v1/saes like an sae-steer server: steering needs "
            "one (sae-steer serve); pass --steer-url"
        )
    names = [e.name for e in listing.data]
    sae = opts.steer_sae
    if sae is None:
        if len(names) != 1:
            raise UsageError(f"{url} serves {len(names)} SAEs ({names}): pass --steer-sae")
        sae = names[0]
    if sae not in names:
        raise UsageError(f"SAE {sae!r} is not served at {url}; served: {names}")
    return url, model, sae, key


def _load_prompts(opts: SteeringExplainOptions) -> tuple[str, list[Problem]]:
    loaded = load_problems(opts.steer_prompts or "gsm8k", limit=opts.n_steer_prompts)
    for w in loaded.warnings():
        print(w, file=sys.stderr)
    if not loaded.problems:
        raise UsageError(f"{loaded.path}: no usable problems to steer on")
    return loaded.name, loaded.problems


# ---------------------------------------------------------------- describing one feature


def _constrained_note(llm: LLM) -> str:
    return ", answers constrained to the JSON asked for" if llm.constrained else ""


async def _ask_logged(
    llm: LLM,
    log: ExplainLog,
    kind: str,
    feature: int,
    prompt: str,
    max_tokens: int,
    resume: bool,
    schema: dict[str, Any],
) -> str:
    key = (kind, feature, "0")  # one request per (kind, feature); a changed prompt is re-asked
    if resume:
        cached = log.get(key, prompt)
        if cached is not None:
            return cached
    answer = await llm.ask(prompt, max_tokens=max_tokens, json_schema=schema)
    log.put(key, prompt, answer)
    return answer


def _no_change(n: int) -> str:
    return f"no change: identical to the unsteered output on all {n} prompts"


async def _describe(
    feature: int,
    opts: SteeringExplainOptions,
    problems: Sequence[Problem],
    ok: dict[tuple[str, str], SampleRecord],
    errors: dict[tuple[str, str], str],
    llm: LLM,
    log: ExplainLog,
    resume: bool,
    spent: list[str],
) -> FeatureEffect:
    """One feature: ``no_change`` / ``not_generated`` from the texts, else the LLM's words
    (``spent`` collects budget exhaustion, so the run can stop after writing the table)."""
    measured: dict[Side, list[tuple[float, str]]] = {
        "weakening": [(s, grid_name(feature, s, "clamp")) for s in opts.weakening],
        "strengthening": [(s, grid_name(feature, s, "clamp")) for s in opts.strengthening],
    }
    names = [BASELINE] + [n for arms in measured.values() for _, n in arms]
    usable = [p for p in problems if all((p.id, n) in ok for n in names)]
    if not usable:
        why = next(
            (errors[(p.id, n)] for p in problems for n in names if (p.id, n) in errors),
            "no generated samples",
        )
        return FeatureEffect(feature=feature, status="not_generated", reason=why)
    texts = {k: r.completion for k, r in ok.items()}
    n = len(usable)
    fixed: dict[str, str | None] = {}
    ask: dict[Side, list[tuple[float, str]]] = {}
    for side, arms in measured.items():
        if not arms:
            fixed[side] = None
        elif all(texts[(p.id, a)] == texts[(p.id, BASELINE)] for p in usable for _, a in arms):
            fixed[side] = _no_change(n)
        else:
            ask[side] = arms
    if not ask:
        return FeatureEffect(feature=feature, status="no_change", n_prompts=n, **fixed)
    prompt = describe_prompt(feature, usable, texts, ask)
    try:
        answer = await _ask_logged(
            llm,
            log,
            DESCRIBE_KIND,
            feature,
            prompt,
            DESCRIBE_MAX_TOKENS,
            resume,
            description_schema(list(ask)),
        )
    except LLMBudgetExhausted as e:
        spent.append(str(e))
        return _unanswered(feature, "failed", n, fixed, ask, f"not described: {e}")
    except LLMRequestError as e:
        return _unanswered(feature, "failed", n, fixed, ask, f"not described: {e}")
    got = read_description(answer, list(ask))
    if got is None:
        text = f"unreadable answer (see {EXPLAIN_LOG_FILE})"
        return _unanswered(feature, "unreadable", n, fixed, ask, text)
    return FeatureEffect(feature=feature, status="described", n_prompts=n, **{**fixed, **got})


def _unanswered(
    feature: int,
    status: Status,
    n: int,
    fixed: dict[str, str | None],
    ask: dict[Side, Any],
    text: str,
) -> FeatureEffect:
    """A feature the LLM did not describe: each asked side says why, measured facts stay."""
    sides: dict[str, str | None] = {**fixed, **{side: text for side in ask}}
    return FeatureEffect(feature=feature, status=status, n_prompts=n, reason=text, **sides)


# ---------------------------------------------------------------- the whole run
def _open_log(path: Path, resume: bool) -> ExplainLog:
    """The output folder's log; it may hold the explain mode's answers (other kinds), but
    without ``resume`` never an earlier steering run's: two runs are never mixed."""
    log = ExplainLog(path, resume=True)
    if not resume and any(e["kind"] in (DESCRIBE_KIND, CLUSTER_KIND) for e in log.entries()):
        raise UsageError(
            f"{path} already holds a steering-effects run: pass --resume to continue it, "
            "or choose another --out"
        )
    return log


def _generation_errors(records: Sequence[SampleRecord]) -> dict[tuple[str, str], str]:
    return {(r.problem_id, r.spec_name): r.error or "failed" for r in records if not r.ok}


def _sides_measured(opts: SteeringExplainOptions) -> list[Side]:
    out: list[Side] = []
    if opts.strengthening:
        out.append("strengthening")
    if opts.weakening:
        out.append("weakening")
    return out


async def run_steering_explain_async(
    opts: SteeringExplainOptions, llm: LLM, features: list[int], out_dir: Path, resume: bool
) -> Path:
    """:func:`run_steering_explain` from code that already runs an event loop."""
    if not features:
        raise UsageError("no features to steer")
    features = list(dict.fromkeys(int(f) for f in features))
    out = Path(out_dir)
    log = _open_log(out / EXPLAIN_LOG_FILE, resume)
    url, model, sae, key = await _resolve_server(opts, llm)
    source, problems = _load_prompts(opts)
    specs = grid_specs(sae, features, opts.strengths, ("clamp",))
    grader = Grader(workers=1)
    try:
        res = await run_sweep_async(
            url,
            model,
            problems,
            specs,
            out_dir=out / STEERING_GENERATIONS_DIR,
            dataset=source,
            sampling=SamplingConfig(
                temperature=0.0, top_p=1.0, max_tokens=opts.steer_max_tokens, samples=1
            ),
            concurrency=GENERATION_CONCURRENCY,
            resume=resume,
            api_key=key,
            grader=grader,
            think_end_id=None,
            extra_config={"purpose": "sae-steer explain --steering"},
        )
    finally:
        grader.close()
    ok = {(r.problem_id, r.spec_name): r for r in res.records if r.ok}
    errors = _generation_errors(res.records)
    spent: list[str] = []
    effects = await asyncio.gather(
        *(_describe(f, opts, problems, ok, errors, llm, log, resume, spent) for f in features)
    )
    sides = _sides_measured(opts)
    described = [e.description() for e in effects if e.status == "described"]
    clustering = Clustering(status="not_asked")
    notes: list[str] = []
    if described:
        prompt = cluster_prompt(described, sides)
        try:
            answer = await _ask_logged(
                llm,
                log,
                CLUSTER_KIND,
                CLUSTER_FEATURE,
                prompt,
                CLUSTER_MAX_TOKENS,
                resume,
                clusters_schema([d.feature for d in described]),
            )
        except LLMBudgetExhausted as e:
            answer = None
            spent.append(str(e))
            notes.append(f"clustering not asked: {e}")
        except LLMRequestError as e:
            answer = None
            notes.append(f"clustering not asked: {e}")
        clustering = read_clusters(answer, [d.feature for d in described], sides)
        if answer is not None and clustering.status == "unreadable":
            notes.append("the clustering answer was not the JSON asked for: all unclustered")
    clusters, left = group_rows(effects, clustering, sides)
    missing = {e.feature: e.reason or "" for e in effects if e.status == "not_generated"}
    meta = {
        "steer_url": url,
        "steer_model": model,
        "steer_sae": sae,
        "strengths": opts.strengths,
        "prompts": source,
        "n_prompts": len(problems),
        "max_tokens": opts.steer_max_tokens,
        "llm_model": llm.cfg.model,
        "constrained": llm.constrained,
        "generations": f"{STEERING_GENERATIONS_DIR}/",
    }
    data = SteeringEffectsFile(
        meta=meta,
        features=effects,
        clusters=clusters,
        unclustered=[d.feature for d in left],
        cluster_status=clustering.status,
        notes=notes + clustering.notes,
    )
    atomic_write(out / STEERING_EFFECTS_FILE, data.model_dump_json(indent=2) + "\n")
    header = [
        "# What steering does",
        "",
        f"SAE `{sae}` on `{model}`: each feature clamped at "
        f"{', '.join(f'{s:g}' for s in opts.strengths)} x its max activation, greedy, on "
        f"{len(problems)} prompts from `{source}` ({opts.steer_max_tokens} tokens); described and "
        f"grouped by `{llm.cfg.model}`{_constrained_note(llm)} (prompts and answers: "
        f"`{EXPLAIN_LOG_FILE}`).",
    ]
    table = effects_table(
        clusters,
        left,
        header=header,
        not_generated=missing,
    )
    path = atomic_write(out / STEERING_EFFECTS_TABLE, table)
    if spent:  # as in the explain mode: stop cleanly, keep what is done, exit 0
        n_left = sum(e.status == "failed" for e in effects)
        grouped = "" if clustering.status == "clustered" else ", features not grouped"
        print(
            f"{spent[0]}: {n_left} feature(s) not described{grouped}; {path} lists what is "
            "done; --resume (with a larger --max-requests) finishes the run",
            file=sys.stderr,
        )
    return path


def run_steering_explain(
    opts: SteeringExplainOptions, llm: LLM, features: list[int], out_dir: Path, resume: bool
) -> Path:
    """Generate (sweep), describe each feature, group them; returns ``steering_effects.md``.

    Writes ``steering_effects.json`` and ``steering_effects.md`` into ``out_dir``, the sweep
    into ``out_dir/steering_generations/`` and every LLM request into ``explain_log.jsonl``.
    Raises :class:`~sae_steer_vllm.errors.UsageError` for a server that cannot steer as
    asked and :class:`~benchmarks.client.EndpointError` when it cannot be reached. When the
    LLM's ``max_requests`` run out it stops cleanly like the explain mode: the table lists
    what is done, the rest is marked ``failed`` and a notice says ``--resume`` finishes it.

    Runs its own event loop and closes ``llm`` in it (its connections belong to that loop);
    from async code use :func:`run_steering_explain_async`, which leaves ``llm`` open.
    """

    async def main() -> Path:
        try:
            return await run_steering_explain_async(opts, llm, features, out_dir, resume)
        finally:
            await llm.close()

    return asyncio.run(main())
