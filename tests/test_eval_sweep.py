"""Sweeps against the scripted fake server: wire format, faults, resume, report."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeModel, FakeServer, make_problems

from benchmarks.client import EndpointError, RetryPolicy
from benchmarks.grading import Grader
from benchmarks.problems import DEFAULT_INSTRUCTION, load_problems
from benchmarks.report import write_report
from benchmarks.results import SAMPLES_FILE, read_log
from benchmarks.runner import (
    SamplingConfig,
    SweepConfigError,
    SweepResult,
    run_sweep,
    run_sweep_async,
)
from benchmarks.sweep import BASELINE, SpecMap, grid_specs, load_specs_file

FAST = RetryPolicy(max_attempts=3, base_delay_s=0.01, max_delay_s=0.05)


@pytest.fixture(scope="module")
def grader() -> Iterator[Grader]:
    with Grader(workers=2) as g:
        yield g


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _sweep(
    srv: FakeServer,
    problems: list[Any],
    specs: SpecMap,
    out_dir: Path,
    grader: Grader,
    **kw: Any,
) -> SweepResult:
    """``run_sweep`` against the fake's model, with the shared grader and no progress bar."""
    return run_sweep(
        srv.base_url,
        "fake-model",
        problems,
        specs,
        out_dir=out_dir,
        grader=grader,
        progress=False,
        **kw,
    )


def test_sweep_sends_specs_seeds_and_logs_every_sample(tmp_path: Path, grader: Grader) -> None:
    problems = make_problems(3)
    specs = grid_specs("fake-sae", [3], [1.0, 4.0])
    with FakeServer() as srv:
        res = _sweep(
            srv,
            problems,
            specs,
            tmp_path,
            grader,
            dataset="toy",
            samples=2,
            max_tokens=256,
            temperature=0.7,
            seed=10,
            concurrency=4,
            retry=FAST,
        )
        sent = list(srv.requests)
    assert len(res.records) == 3 * 3 * 2 and res.n_errors == 0 and res.n_new == 18
    # wire format: the spec's own JSON under vllm_xargs, seeds seed + sample index
    by_spec = {name: (s.to_json() if s else None) for name, s in specs.items()}
    for body in sent:
        steer = (body.get("vllm_xargs") or {}).get("steering")
        assert steer in by_spec.values()
        assert body["seed"] in (10, 11)
        assert body["temperature"] == 0.7 and body["max_tokens"] == 256
        assert body["messages"][-1]["content"].startswith(DEFAULT_INSTRUCTION + "\n")
    assert sum(1 for b in sent if "vllm_xargs" not in b) == 6  # baseline is unsteered

    lines = _lines(tmp_path / SAMPLES_FILE)
    assert len(lines) == 18
    rec = next(r for r in lines if r["spec_name"] == "f3_clamp_s4" and r["problem_id"] == "p1")
    assert rec["spec"] == by_spec["f3_clamp_s4"]
    assert rec["extracted_answer"] == "4" and rec["gold_answer"] == "3" and not rec["correct"]
    assert rec["completion_tokens"] > rec["reasoning_tokens"] > 0 and rec["has_think_end"]
    assert rec["reasoning_words"] >= 9  # "Hmm" + 9 x ("Wait", "let me")
    base = next(r for r in lines if r["spec_name"] == BASELINE and r["problem_id"] == "p1")
    assert base["correct"] and base["seed"] in (10, 11)

    rep = write_report(tmp_path, res.records)
    by = {m.spec_name: m for m in rep.metrics}
    assert by[BASELINE].pass_at_1 == 1.0 and by["f3_clamp_s1"].pass_at_1 == 1.0
    assert by["f3_clamp_s4"].pass_at_1 == 0.0
    ci = by["f3_clamp_s4"].accuracy_vs_baseline
    assert ci is not None and ci.diff == -1.0 and ci.n_problems == 3
    tok = by["f3_clamp_s4"].tokens_vs_baseline
    assert tok is not None and tok.diff > 0
    assert rep.summary_md.read_text().count("| toy |") == 3
    assert [p.name for p in rep.plots] == ["toy_vs_strength.png"]
    assert rep.plots[0].stat().st_size > 5000
    assert json.loads(rep.metrics_json.read_text())["metrics"][0]["spec_name"] == BASELINE


def test_concurrency_is_bounded(tmp_path: Path, grader: Grader) -> None:
    with FakeServer(FakeModel(delay_s=0.08)) as srv:
        _sweep(
            srv,
            make_problems(12),
            {BASELINE: None},
            tmp_path,
            grader,
            concurrency=3,
        )
        assert 2 <= srv.max_in_flight <= 3


def test_bad_spec_is_reported_and_sweep_continues(tmp_path: Path, grader: Grader) -> None:
    specs = grid_specs("fake-sae", [3, 5000], [2.0])
    with FakeServer() as srv:
        res = _sweep(
            srv,
            make_problems(4),
            specs,
            tmp_path,
            grader,
            concurrency=1,
            retry=FAST,
        )
        bad_json = specs["f5000_clamp_s2"]
        assert bad_json is not None
        n_bad_sent = sum(
            1
            for b in srv.requests
            if (b.get("vllm_xargs") or {}).get("steering") == bad_json.to_json()
        )
    assert set(res.spec_errors) == {"f5000_clamp_s2"}
    assert "HTTP 400" in res.spec_errors["f5000_clamp_s2"]
    assert "out of range" in res.spec_errors["f5000_clamp_s2"]
    assert n_bad_sent == 1  # never retried, later samples not sent at all
    ok = Counter(r.spec_name for r in res.records if r.ok)
    assert ok == {BASELINE: 4, "f3_clamp_s2": 4}
    errs = [r for r in res.records if not r.ok]
    assert len(errs) == 4 and all(r.error_kind == "spec_rejected" for r in errs)
    summary = write_report(tmp_path, res.records, plots=False).summary_md.read_text()
    assert "## Rejected specs" in summary and "out of range" in summary


def test_transient_errors_are_retried(tmp_path: Path, grader: Grader) -> None:
    fake = FakeModel(fail_first={"P0": 2, "P1": 100})
    with FakeServer(fake) as srv:

        def sweep() -> SweepResult:
            return _sweep(
                srv,
                make_problems(3),
                {BASELINE: None},
                tmp_path,
                grader,
                concurrency=1,
                retry=FAST,
            )

        res = sweep()
        by = {r.problem_id: r for r in res.records}
        assert by["p0"].ok and by["p0"].attempts == 3  # two 503s, then an answer
        assert not by["p1"].ok and by["p1"].error_kind == "transient"
        assert "503" in (by["p1"].error or "")
        assert by["p2"].ok and by["p2"].attempts == 1
        # the failed sample is redone by resume once the server recovers
        fake.fail_first["P1"] = 0
        n_before = len(srv.requests)
        res2 = sweep()
        assert len(srv.requests) - n_before == 1
    assert res2.n_errors == 0 and res2.n_new == 1 and res2.n_resumed == 2
    assert all(r.ok for r in read_log(tmp_path / SAMPLES_FILE).records.values())


def test_completion_without_box_is_wrong_and_kept(tmp_path: Path, grader: Grader) -> None:
    with FakeServer() as srv:
        res = _sweep(
            srv,
            make_problems(2, nobox=1),
            {BASELINE: None},
            tmp_path,
            grader,
        )
    rec = next(r for r in res.records if r.problem_id == "p1")
    assert rec.ok and not rec.correct
    assert rec.extracted_answer is None and rec.grade_method == "no_answer"
    assert "So the total is 3." in rec.completion
    m = write_report(tmp_path, res.records, plots=False).metrics[0]
    assert m.pass_at_1 == 0.5 and m.no_answer_rate == 0.5


def test_dataset_line_without_answer_is_skipped_and_counted(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text(
        "\n".join(
            [
                json.dumps({"q": "1+1?", "a": 2, "id": "x"}),
                json.dumps({"q": "no answer", "id": "y"}),
                json.dumps({"q": "empty answer", "a": "  "}),
                json.dumps({"a": "3"}),
                "{not json",
                json.dumps({"q": "2+2?", "a": "4", "id": "x"}),  # duplicate id made unique
            ]
        )
        + "\n"
    )
    lp = load_problems(str(f), problem_field="q", answer_field="a")
    assert [p.answer for p in lp.problems] == ["2", "4"]
    assert len({p.id for p in lp.problems}) == 2
    assert (lp.missing_answer, lp.missing_problem, len(lp.bad_lines)) == (2, 1, 1)
    assert any("2 line(s) without an answer" in w for w in lp.warnings())
    assert load_problems("math500", limit=3).problems[0].kind == "math"
    assert load_problems("gsm8k", limit=1).problems[0].kind == "numeric"


def _count_lines(p: Path) -> int:
    return p.read_text().count("\n") if p.exists() else 0


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path: Path, grader: Grader) -> None:
    problems = make_problems(6)
    specs = grid_specs("fake-sae", [3], [1.0])
    cfg = SamplingConfig(samples=2, max_tokens=128)
    log_path = tmp_path / SAMPLES_FILE
    kw: dict[str, Any] = {
        "out_dir": tmp_path,
        "sampling": cfg,
        "concurrency": 2,
        "grader": grader,
        "progress": False,
    }
    with FakeServer(FakeModel(delay_s=0.05)) as srv:

        async def interrupted() -> None:
            task = asyncio.create_task(
                run_sweep_async(srv.base_url, "fake-model", problems, specs, **kw)
            )
            for _ in range(500):
                if _count_lines(log_path) >= 5:
                    break
                await asyncio.sleep(0.01)
            task.cancel()  # what Ctrl-C does to asyncio.run
            with contextlib.suppress(asyncio.CancelledError):
                await task

        asyncio.run(interrupted())
        n_done = _count_lines(log_path)
        assert 5 <= n_done < 24
        with log_path.open("a") as f:  # a crash in the middle of a write
            f.write('{"dataset": "custom", "problem_id": "p5", "spec_na')
        n_before = len(srv.requests)
        res = run_sweep(srv.base_url, "fake-model", problems, specs, **kw)
        resent = len(srv.requests) - n_before
    lines = _lines(log_path)  # every line parses: the torn tail was cut
    keys = Counter((r["problem_id"], r["spec_name"], r["sample_index"]) for r in lines)
    assert len(keys) == 6 * 2 * 2 and max(keys.values()) == 1
    assert res.n_resumed == n_done and res.n_new == 24 - n_done == resent
    assert res.n_errors == 0 and len(res.records) == 24


def test_resume_guards(tmp_path: Path, grader: Grader) -> None:
    with FakeServer() as srv:
        kw: dict[str, Any] = {"out_dir": tmp_path, "grader": grader, "progress": False}
        run_sweep(srv.base_url, "fake-model", make_problems(1), {BASELINE: None}, **kw)
        with pytest.raises(SweepConfigError, match="resume"):
            run_sweep(
                srv.base_url, "fake-model", make_problems(1), {BASELINE: None}, resume=False, **kw
            )
        with pytest.raises(SweepConfigError, match="temperature"):
            run_sweep(
                srv.base_url,
                "fake-model",
                make_problems(1),
                {BASELINE: None},
                temperature=1.0,
                **kw,
            )


def test_unreachable_and_wrong_model(tmp_path: Path, grader: Grader) -> None:
    from benchmarks.server_process import free_port

    def sweep(base_url: str, model: str, out: str) -> SweepResult:
        return run_sweep(
            base_url,
            model,
            make_problems(1),
            {BASELINE: None},
            out_dir=tmp_path / out,
            grader=grader,
            progress=False,
        )

    with pytest.raises(EndpointError, match="cannot reach"):
        sweep(f"http://127.0.0.1:{free_port()}/v1", "m", "a")
    with FakeServer() as srv, pytest.raises(EndpointError, match="not served"):
        sweep(srv.base_url, "other", "b")


def test_server_dying_mid_run_stops_the_sweep(tmp_path: Path, grader: Grader) -> None:
    fake = FakeModel()
    calls = {"n": 0}

    def respond(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        calls["n"] += 1
        if calls["n"] > 3:
            raise ConnectionAbortedError("server crashed")  # connection dropped, no reply
        return fake.respond(body)

    with FakeServer(respond=respond) as srv, pytest.raises(EndpointError, match="stopped"):
        _sweep(
            srv,
            make_problems(30),
            {BASELINE: None},
            tmp_path,
            grader,
            concurrency=1,
            retry=RetryPolicy(max_attempts=1),
            abort_after_conn_failures=3,
        )
    log = read_log(tmp_path / SAMPLES_FILE)
    assert len(log.done()) == 3 and len(log.records) == 6


def test_specs_file_formats(tmp_path: Path) -> None:
    spec = {"interventions": [{"sae": "s", "feature": 1, "strength": 2.0}]}
    jl = tmp_path / "s.jsonl"
    jl.write_text(json.dumps({"name": "a", "spec": spec}) + "\n" + json.dumps({"name": "b"}) + "\n")
    m = load_specs_file(jl)
    assert list(m) == [BASELINE, "a", "b"] and m["b"] is None and m["a"] is not None
    js = tmp_path / "s.json"
    js.write_text(json.dumps({"x": spec, "baseline": None}))
    assert list(load_specs_file(js)) == ["x", "baseline"]
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps([{"name": "a", "spec": {"interventions": [{"sae": "s", "feature": -1}]}}])
    )
    with pytest.raises(ValueError, match="'a'"):
        load_specs_file(bad)
    dup = tmp_path / "dup.jsonl"
    dup.write_text(json.dumps({"name": "a"}) + "\n" + json.dumps({"name": "a"}) + "\n")
    with pytest.raises(ValueError, match="duplicate"):
        load_specs_file(dup)


def test_unsteered_request_refused_stops_the_run(tmp_path: Path, grader: Grader) -> None:
    """A 400 on the baseline is not a spec problem: stop with the server's reason."""
    with FakeServer(FakeModel(refuse_seed=True)) as srv:
        with pytest.raises(EndpointError, match="unsteered requests too.*seed"):
            _sweep(
                srv,
                make_problems(5),
                grid_specs("fake-sae", [3], [1.0]),
                tmp_path,
                grader,
                seed=0,
                concurrency=1,
            )
        assert len(srv.requests) <= 2
