"""The conditional-steering benchmark's specs, plan, tables and phase check, and its main
against the scripted endpoint (no vLLM: the benchmark itself is run by hand, see
``benchmarks/conditional_speed.py``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeModel, FakeServer, Reply

from benchmarks.conditional_speed import (
    BASELINE,
    CLAMPED,
    ROWS,
    PhaseStats,
    arm_specs,
    end_marker_id,
    paired_ratios,
    phase_check,
    ratios,
    round_plan,
    run_rounds,
    table,
    think_flags,
    thinking_length,
)
from benchmarks.conditional_speed import main as conditional_main
from benchmarks.plugin_speed import SAE_NAME, Harness, add_harness_args
from benchmarks.server_process import ServerProcess
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.sae_api import (
    ModelShape,
    RuntimeUpdates,
    SAEEntry,
    SAEList,
    ServerLimits,
    ThinkMarkers,
    check_spec_against,
)
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec, SteeringSpecError

END_ID = 30


def listing(*, markers: bool = True, architecture: str = "standard") -> SAEList:
    """``GET /v1/saes`` of the benchmark's server: its SAE on layer 18, "." ending thinking."""
    think = ThinkMarkers(start=None, start_id=None, end=".", end_id=END_ID) if markers else None
    return SAEList(
        data=[
            SAEEntry(
                name=SAE_NAME,
                layer=18,
                d_in=8,
                d_sae=1000,
                architecture=architecture,
                modes=["clamp", "add"],
                has_statistics=False,
            )
        ],
        model=ModelShape(num_layers=30, d_model=8, think_markers=think),
        limits=ServerLimits(
            max_interventions=16,
            max_clamp_per_layer=8,
            vector_layers=[18],
            vector_layers_setting="sae",
        ),
        runtime_updates=RuntimeUpdates(enabled=False, layers=[]),
    )


def _srv(port: int) -> ServerProcess:
    return ServerProcess(proc=None, host="127.0.0.1", port=port, log=Path("x"))  # type: ignore[arg-type]


def _ivs(spec: SteeringSpec) -> list[FeatureIntervention]:
    out = []
    for iv in spec.interventions:
        assert isinstance(iv, FeatureIntervention)
        out.append(iv)
    return out


def test_arms_differ_only_in_their_gates() -> None:
    specs = arm_specs()
    assert list(specs) == [key for _, key, _ in ROWS] and specs["none"] is None
    steered = {k: s for k, s in specs.items() if s is not None}
    for key, spec in steered.items():  # the same 2 clamps everywhere; the new fields survive
        targets = [(iv.sae, iv.feature, iv.value, iv.mode) for iv in _ivs(spec)]
        assert targets == [(SAE_NAME, f, 4.0, "clamp") for f in CLAMPED], key
        assert SteeringSpec.from_json(spec.to_json()) == spec
        check_spec_against(spec, listing())  # what the real server's admission checks
    plain, thinking, each = steered[BASELINE], steered["thinking"], steered["thinking_each"]
    assert plain.positions == "all" and not any(iv.gated for iv in _ivs(plain))
    assert thinking.positions == "thinking" and not any(iv.gated for iv in _ivs(thinking))
    assert each.positions == "all"
    assert [iv.positions for iv in _ivs(each)] == ["thinking", "thinking"]
    gated = _ivs(steered["when"])
    assert all(iv.positions is None and iv.window is None for iv in gated)
    conds = [iv.when for iv in gated if iv.when is not None]
    assert len(conds) == 2 and all(c.sae == SAE_NAME for c in conds)
    assert [(c.above is None, c.below is None) for c in conds] == [(False, True), (True, False)]
    assert not {c.feature for c in conds} & set(CLAMPED)
    # the server refuses what the benchmark could not measure: no phases, or a TopK condition
    with pytest.raises(SteeringSpecError, match="think markers"):
        check_spec_against(thinking, listing(markers=False))
    with pytest.raises(SteeringSpecError, match="TopK"):
        check_spec_against(steered["when"], listing(architecture="topk"))


def test_rounds_alternate_the_order_of_the_cells() -> None:
    srv = _srv(1)
    keys = [key for _, key, _ in ROWS]
    first, second = round_plan(srv, 0), round_plan(srv, 1)
    assert [c.key for c in first] == [f"{k}/{c}" for c in (16, 64) for k in keys]
    assert [c.key for c in second] == [f"{k}/{c}" for c in (16, 64) for k in reversed(keys)]
    assert [c.key for c in round_plan(srv, 2)] == [c.key for c in first]
    specs = arm_specs()
    for cell in first:
        key, conc = cell.key.split("/")
        assert cell.server is srv and cell.specs == [specs[key]] * int(conc)


def test_run_rounds_collects_every_round(monkeypatch: pytest.MonkeyPatch) -> None:
    import benchmarks.plugin_speed as harness

    calls: list[tuple[str, int, int]] = []

    def fake_measure(url: str, model: str, specs: list[Any], tokens: int) -> float:
        calls.append((url, len(specs), tokens))
        return float(len(calls))  # the call's number: shows which round a sample came from

    monkeypatch.setattr(harness, "measure_once", fake_measure)
    srv = _srv(7)
    samples = run_rounds(srv, "m", 5, 3)
    n = 2 * len(ROWS)
    assert len(calls) == 3 * n and {(u, t) for u, _, t in calls} == {(srv.base_url, 5)}
    # 5 cells per concurrency: round 2 runs them backwards (16: calls 11-15, 64: 16-20)
    assert samples["none/16"] == [1.0, 15.0, 21.0]
    assert samples[f"{BASELINE}/64"] == [7.0, 19.0, 27.0]
    assert samples["when/16"] == [5.0, 11.0, 25.0]


def test_ratios_and_the_table() -> None:
    keys = [key for _, key, _ in ROWS]
    cells = {f"{k}/16": 100.0 - 2 * i for i, k in enumerate(keys)}
    cells |= {f"{k}/64": 200.0 - 10 * i for i, k in enumerate(keys)}
    r = ratios(cells)
    assert r["plain/16"] == r["plain/64"] == 1.0
    assert r["when/16"] == pytest.approx(92 / 98) and r["none/64"] == pytest.approx(200 / 190)
    phases = PhaseStats(
        end_marker=".",
        end_id=END_ID,
        requests=3,
        max_tokens=64,
        reached_answer=2,
        thinking_tokens=[12, 64, 20],
    )
    text = table(cells, phases).splitlines()
    assert text[0].endswith("| vs baseline | goal |") and text[1] == "|---|---|---|---|---|---|"
    assert text[2] == "| no steering | 100.0 | 1.020 | 200.0 | 1.053 | – |"
    assert text[3] == "| 2 clamps, all positions (baseline) | 98.0 | 1.000 | 190.0 | 1.000 | – |"
    assert text[6].startswith("| (b) the 2 clamps, each with a `when`")
    assert text[6].endswith("| 92.0 | 0.939 | 160.0 | 0.842 | ≥ 0.95 |")
    assert text[7] == ""
    assert "'.', token 30" in text[8] and "2 of 3 requests reached the answer phase" in text[8]
    assert "median of 20 generated tokens (each: 12, 64, 20)" in text[8]
    # paired: each round's ratio first, then the median over rounds
    samples = {k: [v, v] for k, v in cells.items()}
    samples["when/16"] = [49.0, 98.0 * 3]  # round 1: 0.5x, round 2: 3x -> median 1.75
    assert paired_ratios(samples)["when/16"] == pytest.approx(1.75)
    assert paired_ratios(samples)["thinking/64"] == pytest.approx(180 / 190)


def test_thinking_length() -> None:
    assert thinking_length([5, END_ID, 7, END_ID], END_ID) == 2  # up to and including the first
    assert thinking_length([END_ID, 1], END_ID) == 1
    assert thinking_length([5, 6, 7], END_ID) == 3  # never ended: all thinking
    assert thinking_length([], END_ID) == 0


def test_end_marker_id() -> None:
    assert end_marker_id(listing(), ".") == END_ID
    with pytest.raises(UsageError, match="not exactly one token"):
        end_marker_id(listing(markers=False), "\n\n")
    with pytest.raises(RuntimeError, match="not None / '!'"):
        end_marker_id(listing(), "!")


def test_the_server_gets_the_think_markers(tmp_path: Path) -> None:
    ap = argparse.ArgumentParser()
    add_harness_args(ap, out=tmp_path / "r.json", tokens=64, reps=3)
    h = Harness.from_args(ap.parse_args(["--model", "/m/SmolLM2", "--sae", "/s/sae"]))
    cmd = h.command(think_flags("."), 1234)
    assert cmd[1:4] == ["-m", "sae_steer_vllm.cli", "serve"]
    # the empty start marker is its own argument (no shell quoting involved)
    assert cmd[-6:] == [
        "--sae",
        f"{SAE_NAME}=/s/sae",
        "--think-start-marker",
        "",
        "--think-end-marker",
        ".",
    ]


def with_token_ids(ids: list[int] | None) -> Any:
    """The fake's answer, plus ``token_ids`` (``ids``; None: leave them out) when asked."""
    fake = FakeModel(sae=SAE_NAME)

    def respond(body: dict[str, Any]) -> Reply:
        status, payload = fake.respond(body)
        if status == 200 and body.get("return_token_ids") and ids is not None:
            payload["choices"][0]["token_ids"] = ids
        return status, payload

    return respond


def test_phase_check_finds_the_end_marker() -> None:
    import asyncio

    spec = arm_specs()["thinking"]
    assert spec is not None
    kw: dict[str, Any] = {"end_marker": ".", "end_id": END_ID, "max_tokens": 6}
    with FakeServer(respond=with_token_ids([4, 4, END_ID, 5, 5, 5])) as srv:
        p = asyncio.run(
            phase_check(srv.base_url, "fake-model", spec, prompts=["P1: a", "P2: b"], **kw)
        )
        sent = srv.requests
    assert (p.requests, p.reached_answer, p.thinking_tokens, p.median_thinking) == (
        2,
        2,
        [3, 3],
        3.0,
    )
    assert all(b["return_token_ids"] and b["ignore_eos"] and b["max_tokens"] == 6 for b in sent)
    assert all(SteeringSpec.from_json(b["vllm_xargs"]["steering"]) == spec for b in sent)
    assert not any(b.get("stream") for b in sent)
    with FakeServer(respond=with_token_ids([4, 4, 4])) as srv:
        p = asyncio.run(phase_check(srv.base_url, "fake-model", spec, prompts=["P1: a"], **kw))
    assert (p.reached_answer, p.thinking_tokens) == (0, [3])
    with (
        FakeServer(respond=with_token_ids(None)) as srv,
        pytest.raises(RuntimeError, match="no token_ids"),
    ):
        asyncio.run(phase_check(srv.base_url, "fake-model", spec, prompts=["P1: a"], **kw))
    with FakeServer(FakeModel(sae="other")) as srv, pytest.raises(RuntimeError, match="HTTP 400"):
        asyncio.run(phase_check(srv.base_url, "fake-model", spec, prompts=["P1: a"], **kw))


class _Endpoint:
    """What the harness needs of a started server, backed by a scripted endpoint."""

    def __init__(self, fake: FakeServer) -> None:
        self.base_url, self.pid = fake.base_url, os.getpid()


def test_main_writes_the_result_and_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    served = FakeServer(respond=with_token_ids([7, END_ID, 8, 9]))
    served.listing = listing().model_dump(mode="json")

    @contextlib.contextmanager
    def serving(self: Harness, servers: dict[str, list[str] | None]) -> Iterator[dict[str, Any]]:
        assert servers == {"plugin": ["--think-start-marker", "", "--think-end-marker", "."]}
        with served:
            yield {"plugin": _Endpoint(served)}

    monkeypatch.setattr(Harness, "serving", serving)
    out = tmp_path / "r.json"
    argv = ["--model", "/m/fake-model", "--sae", "/s/sae", "--tokens", "3", "--reps", "1"]
    assert conditional_main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    keys = {f"{k}/{c}" for c in (16, 64) for _, k, _ in ROWS}
    assert set(res["cells"]) == keys and all(len(v) == 1 for v in res["samples"].values())
    assert set(res["ratios"]) == set(res["paired_ratios"]) == keys
    assert res["think_markers"] == {"start": "", "end": "."}
    assert res["phases"]["reached_answer"] == 8 and res["phases"]["thinking_tokens"] == [2] * 8
    assert res["table_md"] in capsys.readouterr().out
    # every request of a steered cell carried its spec (plus 16 warming up each steered arm)
    sent = [b for b in served.requests if b.get("stream")]
    steered = len(ROWS) - 1
    assert sum("vllm_xargs" in b for b in sent) == steered * 16 + steered * (16 + 64)
    assert sum("vllm_xargs" not in b for b in sent) == 16 + (16 + 64)  # warm-up + none
    specs = {s.to_json() for s in arm_specs().values() if s is not None}
    assert {b["vllm_xargs"]["steering"] for b in sent if "vllm_xargs" in b} == specs


def test_main_stops_when_the_server_has_no_phases(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = FakeServer(FakeModel(sae=SAE_NAME))
    served.listing = listing(markers=False).model_dump(mode="json")

    @contextlib.contextmanager
    def serving(self: Harness, servers: dict[str, list[str] | None]) -> Iterator[dict[str, Any]]:
        with served:
            yield {"plugin": _Endpoint(served)}

    monkeypatch.setattr(Harness, "serving", serving)
    argv = ["--model", "/m/fake-model", "--sae", "/s/sae", "--out", str(tmp_path / "r.json")]
    with pytest.raises(UsageError, match="'nope' is not exactly one token"):
        conditional_main([*argv, "--think-end-marker", "nope"])
    assert not served.requests and not (tmp_path / "r.json").exists()
