"""``sae-steer bench`` / ``measure_throughput`` against the streaming fake."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers.fake_endpoint import FakeModel, FakeServer

from benchmarks.bench_serving import _fmt, feature_specs, main, measure_throughput, request_mix
from benchmarks.server_process import free_port


def test_request_mix_and_distinct_specs() -> None:
    specs = feature_specs("s", [1, 2], 3, 2.0, "clamp")
    assert len({s.cache_salt() for s in specs}) == 3
    mix = request_mix(20, 0.25, specs, seed=3)
    assert len(mix) == 20 and sum(s is not None for s in mix) == 5
    assert mix == request_mix(20, 0.25, specs, seed=3)
    assert request_mix(4, 0.0, []) == [None] * 4
    with pytest.raises(ValueError):
        request_mix(4, 1.5, specs)
    with pytest.raises(ValueError):
        request_mix(4, 0.5, [])


def test_measure_throughput_counts_tokens_and_arms() -> None:
    specs = feature_specs("fake-sae", [1], 2, 2.0, "add")
    mix = request_mix(12, 0.5, specs)
    with FakeServer() as srv:
        srv.token_delay_s = 0.002
        res = asyncio.run(
            measure_throughput(
                srv.base_url,
                "fake-model",
                prompts=["P1: what is 1 + 2?"],
                specs=mix,
                concurrency=4,
                max_tokens=16,
                warmup=1,
            )
        )
        bodies = srv.requests
    assert res.n_ok == 12 and res.n_errors == 0
    assert res.output_tokens == 12 * 16  # ignore_eos: exactly max_tokens each
    assert res.steered.n_ok == 6 and res.unsteered.n_ok == 6 and res.distinct_specs == 2
    assert res.output_tokens_per_s > 0 and res.latency_s is not None and res.ttft_s is not None
    assert res.ttft_s.p50 <= res.latency_s.p50
    assert all(b["ignore_eos"] and b["stream"] for b in bodies)
    assert sum("vllm_xargs" in b for b in bodies) == 6
    assert srv.max_in_flight <= 4


def test_bench_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    with FakeServer() as srv:
        args = ["--base-url", srv.base_url, "-N", "6", "-c", "2", "--max-tokens", "8"]
        assert main([*args, "--sae", "fake-sae", "--features", "1", "--json-out", str(out)]) == 0
        assert "output tokens/s" in capsys.readouterr().out and out.is_file()
        # a spec the server rejects: counted as errors, exit 1
        assert main([*args, "--sae", "fake-sae", "--features", "5000"]) == 1
        assert "HTTP 400" in capsys.readouterr().out
        assert main(args) == 2  # steered share without a spec source
    assert (
        main(["--base-url", f"http://127.0.0.1:{free_port()}/v1", "--steered-fraction", "0"]) == 3
    )
    assert "cannot reach" in capsys.readouterr().err


def test_measure_throughput_counts_readouts_and_noop_specs() -> None:
    from benchmarks.readout_speed import readout_and_steering, readout_spec
    from sae_steer_vllm.spec import SteeringSpec

    read, both = readout_spec("fake-sae"), readout_and_steering("fake-sae")
    steer = feature_specs("fake-sae", [1], 1, 2.0, "add")[0]
    mix = [read, both, steer, SteeringSpec(), None, read]
    readout = {
        "object": "sae_readout",
        "positions": "generated",
        "prompt_tokens": 5,
        "saes": {
            "fake-sae": {"layer": 3, "positions": [], "token_ids": [], "tokens": [], "top_k": []}
        },
    }
    with FakeServer(FakeModel(readout=readout)) as srv:
        res = asyncio.run(
            measure_throughput(
                srv.base_url,
                "fake-model",
                prompts=["P1: 1 + 2?"],
                specs=mix,
                concurrency=3,
                max_tokens=4,
            )
        )
    assert res.n_ok == 6 and res.output_tokens == 24
    assert res.read_fraction == pytest.approx(3 / 6) and res.readouts_received == 3
    # the no-op spec asks for nothing: it counts with the plain request
    assert res.steered.n_ok == 4 and res.unsteered.n_ok == 2
    assert res.steered_fraction == pytest.approx(4 / 6)
    # steering configurations: the 4 clamps and the add; a readout alone adds none
    assert res.distinct_specs == 2
    assert "readout  50% of requests asked, 3 received sae_readout" in _fmt(res)
