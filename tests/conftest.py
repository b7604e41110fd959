"""Session fixtures: the default model, and ONE shared Model Runner V1 steering server.

Starting vLLM costs about a minute on two cores, so every test that needs a
real endpoint shares ``steer_server`` (default model, float32 so outputs are
batch-invariant, torch.compile mode, three registered SAEs, and runtime SAE
registration under ``sae_root`` on layer 6 and the clampable SAEs' layers 14 and 18).
Tests that take the ``server`` fixture (``test_server.py``, ``test_readout*.py``) run on it
and on a Model Runner V2 server with the same SAE files (``helpers/servers.py:v2_steer_server``),
started once, when the first V2 test runs (pytest groups the tests by runner).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.servers import (
    MAX_INTERVENTIONS,
    ServerFiles,
    SteerServer,
    steer_server_record,
    v2_steer_server,
)

from benchmarks import server_process
from sae_steer_vllm.default_model import prepare_default_model
from sae_steer_vllm.sae import random_sae
from sae_steer_vllm.serve import small_cpu_env


@pytest.fixture(autouse=True)
def _autograd_not_leaked() -> Iterator[None]:
    """Fail a test that leaves autograd switched off: later training tests would break."""
    import torch

    yield
    if not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test (or code it ran) left torch autograd disabled")


@pytest.fixture(scope="session")
def default_model() -> Path:
    return prepare_default_model()


@pytest.fixture(scope="session")
def server_files(tmp_path_factory: pytest.TempPathFactory) -> ServerFiles:
    root = tmp_path_factory.mktemp("server-saes")
    sae = root / "sae-l18"
    random_sae(sae, d_in=576, d_sae=1024, layer=18)
    topk = root / "sae-topk-l10"
    random_sae(topk, d_in=576, d_sae=512, layer=10, architecture="topk", with_stats=False)
    # Threshold 4.0 sits inside the layer-14 pre-activation range of this SAE's first
    # features on real text, so an exactness test fails if the plugin ignores it.
    jr = root / "sae-jumprelu-l14"
    random_sae(jr, d_in=576, d_sae=256, layer=14, architecture="jumprelu", seed=3, threshold=4.0)
    sae_root = root / "sae-root"
    sae_root.mkdir()
    return ServerFiles(sae=sae, topk=topk, jumprelu=jr, sae_root=sae_root)


@pytest.fixture(scope="session")
def steer_server(
    default_model: Path, server_files: ServerFiles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    """Model Runner V1, torch.compile mode: the suite's main server."""
    root = tmp_path_factory.mktemp("server")
    port = server_process.free_port()
    cmd = [sys.executable, "-m", "sae_steer_vllm.cli", "serve"]
    cmd += server_files.serve_args(MAX_INTERVENTIONS)
    cmd += ["--port", str(port), "--max-num-seqs", "32"]
    cmd += ["--enable-scale-out", "--print-command"]  # /inference/v1/generate: test_server_doors
    # The server runs the hand-launch command (`python -m vllm.entrypoints.openai.api_server
    # ...`, what the README documents) that `sae-steer serve --print-command` prints, so the
    # suite covers launching vLLM directly; `sae-steer serve` itself is run by the pipeline
    # test and the V2 server. small_cpu_env is what `sae-steer serve` would add to the environment.
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cmd = shlex.split(printed.strip().splitlines()[-1])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], cmd
    env = small_cpu_env({**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    srv = server_process.launch(cmd, root / "server.log", port=port, env=env, healthy_within=900)
    try:
        yield steer_server_record(srv, default_model, server_files, MAX_INTERVENTIONS)
    finally:
        srv.stop()


@pytest.fixture(scope="session", params=["v1", "v2"])
def server(
    request: pytest.FixtureRequest,
    default_model: Path,
    server_files: ServerFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SteerServer]:
    """A test taking this runs against Model Runner V1 (the shared compile-mode server) and V2
    (vLLM's GPU default; eager, prefill chunked at 64 tokens), with the same assertions."""
    if request.param == "v1":
        yield request.getfixturevalue("steer_server")
        return
    with v2_steer_server(default_model, server_files, tmp_path_factory.mktemp("v2")) as srv:
        yield srv
