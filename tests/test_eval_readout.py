"""``sae-steer eval --readout SAE --watch F1,F2``: every request reads the watched features,
each sample keeps their summary, and the report shows how each arm moved them.

All against the scripted endpoint: a respond wrapper scripts each request's ``sae_readout``
summary from the problem index and the arm's strength, so every table number is known by
hand (4 problems, one sample each):

* feature 5: mean activation ``i + 2 x strength``, active on 25% of the tokens unsteered,
  50% steered;
* feature 7: mean activation ``1 + (i mod 2) x strength``, active on 50% of the tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeModel, FakeServer, make_problems

from benchmarks.eval import EvalConfig, build_readout, build_specs, main
from benchmarks.readout import readout_markdown, readout_table
from benchmarks.results import SampleRecord, read_log
from sae_steer_vllm.readout_api import FeatureSummary
from sae_steer_vllm.sae_api import (
    ModelShape,
    ReadoutLimits,
    RuntimeUpdates,
    SAEEntry,
    SAEList,
    ServerLimits,
)
from sae_steer_vllm.spec import SteeringSpec

SAE = "fake-sae"
N = 4


def listing(*, readout: bool = True, layers: tuple[int, ...] = (3,)) -> dict[str, Any]:
    """``GET /v1/saes`` of a server with ``SAE`` on layer 3, with or without readout."""
    limits = ReadoutLimits(enabled=readout, max_top_k=64, max_watch=64, layers=list(layers))
    return SAEList(
        data=[
            SAEEntry(
                name=SAE,
                layer=3,
                d_in=8,
                d_sae=1000,
                architecture="standard",
                modes=["clamp", "add"],
                has_statistics=True,
                strength_units=["max"],
            )
        ],
        model=ModelShape(num_layers=6, d_model=8),
        limits=ServerLimits(
            max_interventions=4,
            max_clamp_per_layer=2,
            vector_layers=[3],
            vector_layers_setting="all",
            readout=limits if readout else ReadoutLimits(enabled=False),
        ),
        runtime_updates=RuntimeUpdates(enabled=False, layers=[]),
    ).model_dump(mode="json")


def scripted_summary(i: int, strength: float, feature: int) -> dict[str, float | int]:
    if feature == 5:
        mean, frac = i + 2 * strength, (0.5 if strength else 0.25)
    else:
        mean, frac = 1 + (i % 2) * strength, 0.5
    return {"tokens": 10, "mean": mean, "max": mean + 1, "active_fraction": frac}


def scripted(fake: FakeModel, *, drop: bool = False) -> Callable[[dict[str, Any]], Any]:
    """The fake's answer with a per-request ``sae_readout`` (``drop``: none at all)."""

    def respond(body: dict[str, Any]) -> Any:
        status, payload = fake.respond(body)
        if status != 200 or "sae_readout" not in payload:
            return status, payload
        if drop:
            del payload["sae_readout"]
            return status, payload
        spec = SteeringSpec.from_json(body["vllm_xargs"]["steering"])
        assert spec.readout is not None
        user = body["messages"][-1]["content"]
        i = int(re.search(r"\bP(\d+):", user).group(1))  # type: ignore[union-attr]
        strength = max((iv.strength or 0.0 for iv in spec.interventions), default=0.0)  # type: ignore[union-attr]
        watch = spec.readout.saes[0].features
        payload["sae_readout"] = {
            "positions": "generated",
            "prompt_tokens": 5,
            "saes": {
                SAE: {
                    "layer": 3,
                    "positions": [],
                    "token_ids": [],
                    "tokens": [],
                    "top_k": [],
                    "features": watch,
                    "summary": {str(f): scripted_summary(i, strength, f) for f in watch},
                }
            },
        }
        return status, payload

    return respond


def server(*, readout: bool = True, has_listing: bool = True, drop: bool = False) -> FakeServer:
    fake = FakeModel(sae=SAE, readout={"placeholder": True} if readout else None)
    srv = FakeServer(fake, respond=scripted(fake, drop=drop))
    srv.listing = listing(readout=readout) if has_listing else None
    return srv


def dataset(tmp_path: Path) -> Path:
    f = tmp_path / "toy.jsonl"
    rows = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in make_problems(N)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def eval_args(srv: FakeServer, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--base-url", srv.base_url, "--model", srv.model_name,
        "--dataset", str(dataset(tmp_path)), "--out", str(tmp_path / "out"),
        "--sae", SAE, "--features", "5", "--strengths", "1,2",
        "--max-tokens", "60", "--reasoning-from-chars", "--no-plots", "-q",
        "--concurrency", "2", "--max-attempts", "1",
        *extra,
    ]  # fmt: skip


# ------------------------------------------------------------------ requests and records
def test_requests_carry_the_readout_and_records_its_summary(tmp_path: Path) -> None:
    with server() as srv:
        assert main(eval_args(srv, tmp_path, "--readout", SAE, "--watch", "5,7")) == 0
    assert len(srv.requests) == N * 3
    by_arm: dict[bool, int] = {True: 0, False: 0}
    for body in srv.requests:
        spec = SteeringSpec.from_json(body["vllm_xargs"]["steering"])
        assert spec.readout is not None and spec.readout.positions == "generated"
        (r,) = spec.readout.saes
        assert (r.sae, r.top_k, r.features) == (SAE, 0, [5, 7])
        by_arm[bool(spec.interventions)] += 1
    assert by_arm == {True: 2 * N, False: N}  # the baseline sends a readout-only spec

    out = tmp_path / "out"
    recs = list(read_log(out / "samples.jsonl").records.values())
    assert len(recs) == 3 * N and all(r.ok for r in recs)
    for r in recs:
        i, s = int(r.problem_id[1:]), {"baseline": 0.0, "f5_clamp_s1": 1.0, "f5_clamp_s2": 2.0}
        assert r.readout is not None and list(r.readout) == [SAE]
        got = {f: v.model_dump() for f, v in r.readout[SAE].items()}
        assert got == {str(f): scripted_summary(i, s[r.spec_name], f) for f in (5, 7)}
        assert r.spec is None if r.spec_name == "baseline" else "readout" not in r.spec
    line = json.loads((out / "samples.jsonl").read_text().splitlines()[0])
    assert set(line["readout"][SAE]["5"]) == {"tokens", "mean", "max", "active_fraction"}
    assert "watched" not in json.dumps(line)  # summaries only, no per-token values
    config = json.loads((out / "config.json").read_text())
    assert config["readout"]["saes"][0]["features"] == [5, 7]


def test_report_table_equals_hand_computed_values(tmp_path: Path) -> None:
    with server() as srv:
        assert main(eval_args(srv, tmp_path, "--readout", SAE, "--watch", "5,7")) == 0
    out = tmp_path / "out"
    rows = json.loads((out / "metrics.json").read_text())["readout"]
    table = {(r["spec_name"], r["feature"]): r for r in rows}
    assert [(r["spec_name"], r["feature"]) for r in rows] == [
        ("baseline", 5), ("baseline", 7), ("f5_clamp_s1", 5), ("f5_clamp_s1", 7),
        ("f5_clamp_s2", 5), ("f5_clamp_s2", 7),
    ]  # fmt: skip
    # feature 5: mean over problems of i + 2s (i = 0..3): 1.5, 3.5, 5.5; every problem moves
    # by exactly 2s, so the paired CI is a point
    for arm, s in (("baseline", 0), ("f5_clamp_s1", 1), ("f5_clamp_s2", 2)):
        r5, r7 = table[(arm, 5)], table[(arm, 7)]
        assert r5["n_samples"] == N and r5["mean_tokens"] == 10
        assert r5["mean_activation"]["mean"] == pytest.approx(1.5 + 2 * s)
        assert r5["active_fraction"]["mean"] == pytest.approx(0.5 if s else 0.25)
        # feature 7: 1 + (i mod 2) s -> 1 + s/2; per-problem differences (0, s, 0, s)
        assert r7["mean_activation"]["mean"] == pytest.approx(1 + s / 2)
        assert r7["active_fraction"]["mean"] == pytest.approx(0.5)
        lo, hi = r7["mean_activation"]["lo"], r7["mean_activation"]["hi"]
        assert 1.0 <= lo <= 1 + s / 2 <= hi <= 1 + s
        if s == 0:
            assert r5["mean_vs_baseline"] is None and r5["active_vs_baseline"] is None
            continue
        assert r5["mean_vs_baseline"] == {"diff": 2 * s, "lo": 2 * s, "hi": 2 * s, "n_problems": N}
        d = r5["active_vs_baseline"]
        assert (d["diff"], d["lo"], d["hi"]) == pytest.approx((0.25, 0.25, 0.25))
        d7 = r7["mean_vs_baseline"]
        assert d7["diff"] == pytest.approx(s / 2) and 0.0 <= d7["lo"] <= s / 2 <= d7["hi"] <= s
        assert r7["active_vs_baseline"]["diff"] == pytest.approx(0.0)
    md = (out / "summary.md").read_text()
    assert "## Watched features (readout)" in md
    assert "| toy | f5_clamp_s1 | fake-sae | 5 | 4 | 10 | 3.500 [" in md
    assert "| +2.000 [2.000, 2.000] | 50.0 [50.0, 50.0] | +25.0 [25.0, 25.0] |" in md
    assert "| toy | baseline | fake-sae | 7 | 4 | 10 | 1.000 [1.000, 1.000] | – |" in md


def test_table_is_a_mean_over_problems_and_skips_what_it_cannot_use() -> None:
    """Per problem first (two samples of p0: 1 and 3 -> 2), then over problems (2 and 5 ->
    3.5, not the sample mean 3); unread, failed and pre-readout samples are left out."""

    def rec(pid: str, k: int, mean: float | None, tokens: int = 10, **kw: Any) -> SampleRecord:
        s = FeatureSummary(
            tokens=tokens, mean=mean, max=mean, active_fraction=0.5 if mean else None
        )
        return SampleRecord(
            dataset="d", problem_id=pid, spec_name="arm", spec=None, sample_index=k, seed=None,
            gold_answer="1", readout={SAE: {"3": s}}, **kw,
        )  # fmt: skip

    records = [
        rec("p0", 0, 1.0),
        rec("p0", 1, 3.0),
        rec("p1", 0, 5.0),
        rec("p1", 1, None, tokens=0),  # nothing generated: no value to average
        rec("p2", 0, 99.0, error="HTTP 500", error_kind="transient"),
        SampleRecord.model_validate(  # a line written before readout existed
            {"dataset": "d", "problem_id": "p3", "spec_name": "arm", "spec": None,
             "sample_index": 0, "seed": None, "gold_answer": "1", "completion": "x"}
        ),
    ]  # fmt: skip
    (row,) = readout_table(records)
    assert row.n_samples == 3 and row.mean_activation.n == 2
    assert row.mean_activation.mean == pytest.approx(3.5)
    assert row.active_fraction.mean == pytest.approx(0.5)
    assert row.mean_vs_baseline is None  # no unsteered arm in this log
    assert "| arm | fake-sae | 3 | 3 | 10 | 3.500 [" in readout_markdown(
        [row], dataset_column=False
    )


# ------------------------------------------------------------------ refused up front
@pytest.mark.parametrize(
    ("kind", "needle"),
    [
        ("no-readout", "started without readout support"),
        ("no-listing", "has no SAE listing (http://"),
        ("unknown-sae", "unknown SAE 'other'"),
        ("too-far", "feature 1000 out of range"),
    ],
)
def test_a_server_that_cannot_read_fails_before_the_first_request(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str, needle: str
) -> None:
    sae, watch = (
        ("other", "1") if kind == "unknown-sae" else (SAE, "5,1000" if kind == "too-far" else "5")
    )
    with server(readout=kind != "no-readout", has_listing=kind != "no-listing") as srv:
        assert main(eval_args(srv, tmp_path, "--readout", sae, "--watch", watch)) == 2
    assert srv.requests == []
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_a_response_without_the_readout_is_a_failed_sample(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--no-spec-check, and a server that drops the readout: the samples fail, visibly."""
    with server(drop=True) as srv:
        code = main(eval_args(srv, tmp_path, "--readout", SAE, "--watch", "5", "--no-spec-check"))
    assert code == 1
    recs = list(read_log(tmp_path / "out" / "samples.jsonl").records.values())
    assert recs and all(
        r.error_kind == "bad_response" and "no sae_readout" in (r.error or "") for r in recs
    )


def test_watch_defaults_to_the_steered_features_and_bad_pairs_are_usage_errors() -> None:
    from sae_steer_vllm.errors import UsageError

    cfg = EvalConfig(sae=SAE, features=[5, 9], readout=SAE)
    spec = build_readout(cfg, build_specs(cfg))
    assert spec is not None and spec.saes[0].features == [5, 9] and spec.saes[0].top_k == 0
    assert build_readout(EvalConfig(sae=SAE, features=[5]), {}) is None
    for bad, msg in [
        (EvalConfig(sae=SAE, features=[5], readout="other"), "needs --watch"),
        (EvalConfig(watch=[1]), "--watch needs --readout"),
        (EvalConfig(readout=SAE, watch=[1, 1]), "twice"),
    ]:
        with pytest.raises(UsageError, match=msg):
            build_readout(bad, build_specs(bad))


# ------------------------------------------------------------------ resume
def test_resume_keeps_the_summaries_and_refuses_another_watch_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--readout", SAE, "--watch", "5,7"]
    with server() as srv:
        srv.fake.fail_first["P1"] = 3  # every arm of problem 1 fails once (one attempt each)
        assert main(eval_args(srv, tmp_path, *args)) == 1
        log = tmp_path / "out" / "samples.jsonl"
        first = {r.key: r for r in read_log(log).records.values() if r.ok}
        assert len(first) == 3 * (N - 1)
        n_sent = len(srv.requests)
        assert main(eval_args(srv, tmp_path, *args, "--resume")) == 0
        assert len(srv.requests) == n_sent + 3  # only problem 1's three arms again
        again = read_log(log).records
        assert len(again) == 3 * N and all(r.ok and r.readout for r in again.values())
        for k, r in first.items():
            assert again[k].readout == r.readout
        rows = json.loads((tmp_path / "out" / "metrics.json").read_text())["readout"]
        assert {r["n_samples"] for r in rows} == {N}
        capsys.readouterr()
        assert main(eval_args(srv, tmp_path, "--readout", SAE, "--watch", "5", "--resume")) == 2
    assert "different settings" in capsys.readouterr().err


# ------------------------------------------------------------------ the demo study
def test_demo_study_watches_the_top_features_and_reports_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.demo import DemoConfig, ReportContext, analyse, make_design, write_study_report
    from benchmarks.demo.run import study_key, study_readout
    from benchmarks.demo.server import serve_command
    from benchmarks.runner import run_sweep
    from sae_steer_vllm.constants import SAELENS_WEIGHTS

    cfg = DemoConfig(sae_name=SAE, watch_top=2)
    table = {"features": [{"feature": 5}, {"feature": 7}, {"feature": 9}]}
    assert "--readout" in serve_command(cfg, tmp_path, tmp_path, 1)
    assert "--readout" not in serve_command(DemoConfig(watch_top=0), tmp_path, tmp_path, 1)
    with server(readout=False) as srv:
        assert study_readout(cfg, srv.base_url, table) is None
    assert "started without readout support" in capsys.readouterr().out
    problems = make_problems(N)
    design = make_design(SAE, [5], [300], [1.0, 2.0], "clamp")
    with server() as srv:
        readout = study_readout(cfg, srv.base_url, table)
        assert readout is not None and readout.saes[0].features == [5, 7]  # the top 2
        assert study_readout(DemoConfig(sae_name=SAE, watch_top=0), srv.base_url, table) is None
        res = run_sweep(
            srv.base_url, srv.model_name, problems, design.specs(), out_dir=tmp_path / "study",
            dataset="toy", max_tokens=60, temperature=0.0, progress=False, readout=readout,
        )  # fmt: skip
    assert all(r.ok and r.readout for r in res.records)

    # the cached study's fingerprint: the watch list is part of it, no readout keeps the old key
    (tmp_path / SAELENS_WEIGHTS).write_bytes(b"w")
    (tmp_path / "stats").write_bytes(b"s")
    keys = {
        study_key(cfg, tmp_path, tmp_path / "stats", design, r)
        for r in (None, readout, study_readout_of([5, 9]))
    }
    assert len(keys) == 3

    an = analyse(design, res.records)
    ctx = ReportContext(
        model="fake-model", sae_path="sae", sae_summary="test", score_summary="",
        dataset="toy", n_prompts=N, max_tokens=60, temperature=0.0, top_p=1.0, seed=0,
        feature_notes={}, problems={p.id: p.problem for p in problems}, links={}, elapsed={},
    )  # fmt: skip
    text = write_study_report(
        tmp_path / "study" / "report.md", design, an, res.records, [], ctx
    ).read_text()
    assert "### How steering one feature moves the others (readout)" in text
    # top1 = feature 5 at strength 2 (the middle strength): feature 7 moved by +1 (s/2)
    assert "- top feature 5 at strength 2: mean activation of the other watched features" in text
    assert "7: +1.000 [0.000, 2.000]" in text
    assert "| top1.f5_clamp_s1 | fake-sae | 5 | 4 | 10 | 3.500 [" in text
    assert "| random1.f300_clamp_s2 | fake-sae | 7 |" in text


def study_readout_of(watch: list[int]) -> Any:
    from benchmarks.readout import readout_request

    return readout_request(SAE, watch)
