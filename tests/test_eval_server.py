"""The eval harness against the real vLLM server with the steering plugin (``steer_server``).

Tiny on purpose (2 problems, 32 tokens): it checks that specs built here are
accepted, that a bad spec is rejected with HTTP 400 and reported per spec, and
that steering changes greedy output, not that the small model can do maths.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from benchmarks.bench_serving import feature_specs, measure_throughput, request_mix
from benchmarks.problems import load_problems
from benchmarks.report import write_report
from benchmarks.runner import SamplingConfig, run_sweep
from benchmarks.sweep import BASELINE, grid_specs
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

pytestmark = pytest.mark.server


def test_tiny_real_sweep(steer_server: Any, tmp_path: Path) -> None:
    problems = load_problems("math500", limit=2).problems
    specs = grid_specs(steer_server.sae_name, [0], [2.0])
    specs["add_big"] = SteeringSpec(
        interventions=[
            FeatureIntervention(sae=steer_server.sae_name, feature=1, value=200.0, mode="add")
        ]
    )
    specs["bad_feature"] = SteeringSpec(
        interventions=[
            FeatureIntervention(sae=steer_server.sae_name, feature=steer_server.d_sae, strength=1.0)
        ]
    )
    res = run_sweep(
        steer_server.base_url,
        steer_server.model,
        problems,
        specs,
        out_dir=tmp_path,
        dataset="math500",
        sampling=SamplingConfig(temperature=0.0, max_tokens=32),  # CPU server refuses seeds
        concurrency=4,
        progress=False,
        check_specs=False,  # the pre-check would stop the sweep; this tests the server's own 400
    )
    assert set(res.spec_errors) == {"bad_feature"}
    assert "400" in res.spec_errors["bad_feature"]
    ok = [r for r in res.records if r.ok]
    assert {r.spec_name for r in ok} == {BASELINE, "f0_clamp_s2", "add_big"}
    assert all(0 < r.completion_tokens <= 32 and r.grade_method for r in ok)
    base = {r.problem_id: r.completion for r in ok if r.spec_name == BASELINE}
    big = {r.problem_id: r.completion for r in ok if r.spec_name == "add_big"}
    assert base != big  # a large added direction must change greedy decoding
    rep = write_report(tmp_path, res.records)
    assert "bad_feature" in rep.summary_md.read_text()


def test_real_throughput_mix(steer_server: Any) -> None:
    specs = feature_specs(steer_server.sae_name, [0, 1], 2, 1.0, "clamp")
    res = asyncio.run(
        measure_throughput(
            steer_server.base_url,
            steer_server.model,
            prompts=["Count to ten."],
            specs=request_mix(4, 0.5, specs),
            concurrency=4,
            max_tokens=8,
        )
    )
    assert res.n_errors == 0, res.errors
    assert res.output_tokens == 4 * 8 and res.output_tokens_per_s > 0


def test_real_server_returns_token_ids_for_reasoning_length(
    steer_server: Any, tmp_path: Path
) -> None:
    """vLLM's /tokenize passes admission and gives one id per special marker; with
    ``return_token_ids`` the completion's ids come back, as many as usage counts. The default
    model has no ``</think>`` token: "auto" falls back to the labelled estimate, and an id that
    never occurs counts every token (a truncated trace)."""
    from benchmarks.think_tokens import resolve_think_end_id

    start_id, why = asyncio.run(
        resolve_think_end_id(steer_server.base_url, steer_server.model, marker="<|im_start|>")
    )
    assert isinstance(start_id, int), why
    none_id, why = asyncio.run(resolve_think_end_id(steer_server.base_url, steer_server.model))
    assert none_id is None and "not one special token" in why
    problems = load_problems("math500", limit=1).problems
    sampling = SamplingConfig(temperature=0.0, max_tokens=16, prompt="paper")
    res = run_sweep(
        steer_server.base_url,
        steer_server.model,
        problems,
        {BASELINE: None},
        out_dir=tmp_path / "ids",
        sampling=sampling,
        progress=False,
        think_end_id=start_id,  # generation ends at <|im_end|>: <|im_start|> never occurs
    )
    (rec,) = res.records
    assert rec.ok and rec.reasoning_source == "token_ids", rec.error
    assert rec.reasoning_tokens == rec.completion_tokens and not rec.has_think_end
    auto = run_sweep(
        steer_server.base_url,
        steer_server.model,
        problems,
        {BASELINE: None},
        out_dir=tmp_path / "auto",
        sampling=sampling,
        progress=False,
    )
    assert auto.records[0].reasoning_source == "chars"
