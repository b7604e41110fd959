"""Session fixtures: the default model, and ONE shared steering server for all server tests.

Starting vLLM costs about a minute on two cores, so every test that needs a
real endpoint shares ``steer_server`` (default model, float32 so outputs are
batch-invariant, torch.compile mode, three registered SAEs, and runtime SAE
registration under ``sae_root`` on layer 6 and the clampable SAEs' layers 14 and 18).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

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


@dataclass(frozen=True)
class SteerServer:
    base_url: str  # http://127.0.0.1:PORT/v1
    model: str  # served model name
    model_path: Path
    sae_name: str  # standard SAE with feature statistics
    sae_path: Path
    d_sae: int
    topk_sae_name: str  # TopK SAE without statistics
    jumprelu_sae_name: str  # JumpReLU SAE (layer 14, threshold 4.0) with statistics
    jumprelu_sae_path: Path
    max_interventions: int
    log_path: Path
    sae_root: Path  # POST /v1/saes resolves paths under it

    @property
    def root_url(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]


@pytest.fixture(scope="session")
def steer_server(
    default_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SteerServer]:
    root = tmp_path_factory.mktemp("server")
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
    port = server_process.free_port()
    log = root / "server.log"
    max_interventions = 8
    cmd = [
        sys.executable,
        "-m",
        "sae_steer_vllm.cli",
        "serve",
        "--sae",
        f"test-sae={sae}",
        "--sae",
        f"topk-sae={topk}",
        "--sae",
        f"jr-sae={jr}",
        "--max-interventions",
        str(max_interventions),
        "--allow-runtime-sae-updates",
        "--sae-root",
        str(sae_root),
        "--steerable-layers",
        "6",
        "--dtype",
        "float32",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "32",
        "--seed",
        "0",
        "--enable-scale-out",  # /inference/v1/generate: test_server_doors admits steering there
        "--print-command",
    ]
    # The server runs the hand-launch command (`python -m vllm.entrypoints.openai.api_server
    # ...`, what the README documents) that `sae-steer serve --print-command` prints, so the
    # suite covers launching vLLM directly; `sae-steer serve` itself is run by the pipeline
    # test. small_cpu_env is what `sae-steer serve` would add to the environment.
    printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    cmd = shlex.split(printed.strip().splitlines()[-1])
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"], cmd
    env = small_cpu_env({**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    srv = server_process.launch(cmd, log, port=port, env=env, healthy_within=900)
    try:
        yield SteerServer(
            base_url=srv.base_url,
            model=default_model.name,
            model_path=default_model,
            sae_name="test-sae",
            sae_path=sae,
            d_sae=1024,
            topk_sae_name="topk-sae",
            jumprelu_sae_name="jr-sae",
            jumprelu_sae_path=jr,
            max_interventions=max_interventions,
            log_path=log,
            sae_root=sae_root,
        )
    finally:
        srv.stop()
