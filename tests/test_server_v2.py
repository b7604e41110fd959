"""``sae-steer serve`` as documented, on vLLM's Model Runner V2 (the GPU default).

Before this test existed the documented command did not start on V2 at all ("SteeringBatchTracker
is not a subclass of vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor"): serve always
passes the batch tracker, which V2's loader refused. The tracker now subclasses both runners'
interfaces. V2 runs here on CPU through the test-only Triton shim (``tests/v2_shim``); the
engine-level properties on V2 are in ``tests/test_engine_matrix.py``.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.models import make_tiny_qwen2
from v2_shim.activate import V2_LOG_LINE, v2_env

from benchmarks import server_process
from benchmarks.server_process import ServerProcess
from sae_steer_vllm import FeatureIntervention, SteeringSpec, steering_extra_body
from sae_steer_vllm.sae import random_sae

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def v2_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("v2server")
    model = make_tiny_qwen2(root / "model")
    random_sae(root / "sae", d_in=128, d_sae=256, layer=2)
    port = server_process.free_port()
    cmd = [sys.executable, "-m", "sae_steer_vllm.cli", "serve", "--model", str(model)]
    cmd += ["--sae", f"tiny={root / 'sae'}", "--dtype", "float32", "--enforce-eager"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "512"]
    cmd += ["--max-num-seqs", "8", "--seed", "0"]
    env = {**v2_env(), "VLLM_CPU_KVCACHE_SPACE": "1"}
    srv = server_process.launch(cmd, root / "server.log", port=port, env=env, healthy_within=600)
    try:
        yield srv
    finally:
        srv.stop()


def _post(srv: ServerProcess, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(
        srv.base_url + "/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _tokens(srv: ServerProcess, spec: SteeringSpec | None) -> str:
    model = json.loads(urllib.request.urlopen(srv.base_url + "/models").read())["data"][0]["id"]
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": 8}
    body |= {"temperature": 0, "ignore_eos": True, **steering_extra_body(spec)}
    status, out = _post(srv, body)
    assert status == 200, out
    return str(out["choices"][0]["text"])


def test_documented_serve_runs_on_v2_and_steers(v2_server: ServerProcess) -> None:
    assert V2_LOG_LINE in Path(v2_server.log).read_text(), "the server did not use Model Runner V2"
    spec = SteeringSpec(
        interventions=[FeatureIntervention(sae="tiny", feature=3, value=60.0, mode="add")]
    )
    cold = _tokens(v2_server, None)
    steered = _tokens(v2_server, spec)
    assert steered != cold, "a strong add did not change greedy decoding on V2"
    assert _tokens(v2_server, None) == cold, "an unsteered request changed after a steered one"
    assert _tokens(v2_server, spec) == steered, "the same steered request differs on repeat"


def test_bad_specs_are_400_on_v2(v2_server: ServerProcess) -> None:
    bad = [
        {"interventions": [{"sae": "nope", "feature": 0, "value": 1.0}]},
        {"interventions": [{"sae": "tiny", "feature": 256, "value": 1.0}]},
        "{not json",
    ]
    for spec in bad:
        raw = spec if isinstance(spec, str) else json.dumps(spec)
        body = {"model": "x", "prompt": "hi", "max_tokens": 2, "vllm_xargs": {"steering": raw}}
        status, out = _post(v2_server, body)
        assert status == 400, (spec, status, out)
    assert server_process.healthy(v2_server.root_url)
