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
- With a readout (:mod:`benchmarks.readout`), a server whose ``GET /v1/saes`` says it
  cannot read it (no readout support, unknown SAE, limits), or that has no listing at all,
  stops the sweep before the first request with a :class:`~sae_steer_vllm.errors.UsageError`.
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
from typing import Any, Literal

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
from benchmarks.judge import Judge, JudgeConfig, JudgeResult
from benchmarks.metrics import count_reasoning_words
from benchmarks.problems import Problem
from benchmarks.readout import check_arms, check_readout, readout_summaries, with_readout
from benchmarks.results import (
    ResultLog,
    SampleKey,
    SampleRecord,
    read_config,
    read_log,
    write_config,
)
from benchmarks.sampling import SamplingConfig, config_diffs, run_config
from benchmarks.sweep import SpecMap
from benchmarks.think_tokens import measure_reasoning, resolve_think_end_id
from sae_steer_vllm.constants import SAMPLES_FILE
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.spec import ReadoutSpec

log = logging.getLogger(__name__)


class SweepConfigError(UsageError):
    """The output folder holds a run with different settings (or resume was not asked for)."""


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


def _record(
    dataset: str,
    it: _Item,
    cfg: SamplingConfig,
    out: ChatOutcome,
    grade: Grade | None,
    *,
    think_end_id: int | None = None,
    judged: JudgeResult | None = None,
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
        choice_order=list(it.problem.choice_order) if it.problem.choice_order else None,
    )
    if out.error is None:
        n, has_end, source = measure_reasoning(
            out.text, rec.completion_tokens, out.token_ids, think_end_id
        )
        rec.reasoning_tokens, rec.has_think_end, rec.reasoning_source = n, has_end, source
        rec.reasoning_words = count_reasoning_words(out.text)
    if out.readout is not None:
        rec.readout = readout_summaries(out.readout)
    if judged is not None:
        rec.judge_verdict, rec.judge_response = judged.verdict, judged.response
    if grade is not None:
        rec.extracted_answer = grade.extracted
        rec.correct = grade.correct
        rec.grade_method = grade.method
        rec.grade_detail = grade.detail
    return rec


def _require_readout(outc: ChatOutcome) -> ChatOutcome:
    """A completion that asked for a readout and carries none is a failed sample (redone by
    ``--resume``): its record would silently lack what the run is for."""
    if outc.readout is not None:
        return outc
    return ChatOutcome(
        error="the response carries no sae_readout although the request asked for one "
        "(is this an sae-steer server started with --readout?)",
        error_kind="bad_response",
        latency_s=outc.latency_s,
        attempts=outc.attempts,
    )


def _check_config(out_dir: Path, config: dict[str, Any], resume: bool) -> None:
    log_path = out_dir / SAMPLES_FILE
    if log_path.exists() and log_path.stat().st_size > 0 and not resume:
        raise SweepConfigError(
            f"{log_path} already exists: pass resume=True (--resume) to continue it, "
            "or choose another output folder"
        )
    old = read_config(out_dir)
    if resume and old is not None:
        diffs = config_diffs(old, config)
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
    think_end_id: int | Literal["auto"] | None = "auto",
    judge: JudgeConfig | None = None,
    extra_config: dict[str, Any] | None = None,
    readout: ReadoutSpec | None = None,
) -> SweepResult:
    """Async body of :func:`run_sweep` (use this from code that already runs an event loop)."""
    cfg = sampling or SamplingConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    check_arms(specs, readout)
    client = make_client(base_url, api_key=api_key, timeout_s=request_timeout_s)
    judge_client: Judge | None = None
    try:
        await check_endpoint(client, model)
        end_id = think_end_id if think_end_id != "auto" else None
        if think_end_id == "auto":
            end_id, why = await resolve_think_end_id(base_url, model, api_key=api_key)
            if end_id is None:
                log.warning(
                    "reasoning tokens will be estimated from characters: %s "
                    "(--think-end-id N gives the id)",
                    why,
                )
        config = run_config(
            model,
            cfg,
            think_end_id=end_id,
            judge=judge.model_dump() if judge else None,
            **(extra_config or {}),
            # only when reading: folders of runs without readout keep resuming
            **({"readout": readout.model_dump(mode="json")} if readout is not None else {}),
        )
        _check_config(out, config, resume)
        if judge is not None:
            judge_client = Judge(judge, retry=retry)
            try:
                await check_endpoint(judge_client._client, judge.model)
            except EndpointError as e:
                raise EndpointError(f"the judge cannot be used: {e}") from None
        if check_specs and (readout is not None or any(s is not None for s in specs.values())):
            # before the first request: every spec against what the server serves
            notes: list[str] = []
            listing = await fetch_sae_list(client, notice=notes.append)
            if readout is not None:
                check_readout(readout, listing, notes[0] if notes else "")
            elif notes:
                print(notes[0], file=sys.stderr)
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
                    sent = with_readout(spec, readout)
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
                                cfg.messages(it.problem),
                                temperature=cfg.temperature,
                                top_p=cfg.top_p,
                                max_tokens=cfg.max_tokens,
                                seed=cfg.seed_for(it.sample_index),
                                spec=sent,
                                extra_body=cfg.extra_body,
                                retry=retry,
                                stop=cfg.stop_for(it.problem),
                                return_token_ids=end_id is not None,
                            )
                        except EndpointError as e:
                            fatal.append(e)
                            return
                        if outc.error is None and sent is not None and sent.readout is not None:
                            outc = _require_readout(outc)
                    grade = None
                    judged = None
                    if outc.error is None:
                        p = it.problem
                        n_choices = len(p.choice_order) if p.choice_order else 4
                        grade = await loop.run_in_executor(
                            grade_pool, g.grade, outc.text, p.answer, p.kind, n_choices
                        )
                        if judge_client is not None:
                            try:
                                grade, judged = await judge_client.decide(
                                    grade, p.problem, p.answer
                                )
                            except EndpointError as e:
                                fatal.append(EndpointError(f"the judge failed: {e}"))
                                return
                        conn_streak = 0
                    elif outc.error_kind == "spec_rejected" and spec is None:
                        # an unsteered request refused: the request itself is wrong (e.g. a
                        # parameter this server refuses), not a spec; every item would fail
                        fatal.append(
                            EndpointError(
                                f"the server rejects unsteered requests too ({outc.error}); "
                                + (
                                    "check --readout and --watch against its GET /v1/saes"
                                    if readout is not None
                                    else "fix the sampling settings (e.g. drop --seed)"
                                )
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
                    rec = _record(dataset, it, cfg, outc, grade, think_end_id=end_id, judged=judged)
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
        if judge_client is not None:
            await judge_client.close()


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

    ``think_end_id``: ``"auto"`` (default) asks the server's ``/tokenize`` for the id of
    ``</think>`` and then counts reasoning tokens from the completions' token ids; an int
    gives the id; ``None`` (or a server without ``/tokenize``) estimates from characters
    (:mod:`benchmarks.think_tokens`). ``judge`` decides the answers math-verify cannot parse
    (:mod:`benchmarks.judge`). ``extra_config`` is recorded in ``config.json``.

    ``readout`` (:func:`benchmarks.readout.readout_request`) is sent with every request,
    merged into each arm's spec (unsteered arms send it alone); the server's listing must
    say it can read it (else :class:`~sae_steer_vllm.errors.UsageError` before the first
    request), each record keeps the watched features' summaries, a completion without
    ``sae_readout`` is a failed sample, and ``config.json`` records the readout (a resume
    with another one is refused).
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
