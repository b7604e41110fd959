"""The suite's steering servers: what a test gets (:class:`SteerServer`), the SAE files they
register (:class:`ServerFiles`), and the Model Runner V2 server. The session fixtures that
start them live in ``tests/conftest.py``."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from v2_shim.activate import V2_LOG_LINE, v2_env

from benchmarks import server_process

MAX_INTERVENTIONS = 8
"""``--max-interventions`` of every suite server (the 400 test sends one more)."""


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
    runner: str = "v1"  # vLLM's model runner: "v1" or "v2"

    @property
    def root_url(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]


@dataclass(frozen=True)
class ServerFiles:
    """The SAE files every steering server of the suite registers (built once a session)."""

    sae: Path  # standard, layer 18, with statistics
    topk: Path  # TopK, layer 10, no statistics
    jumprelu: Path  # JumpReLU, layer 14, threshold 4.0, with statistics
    sae_root: Path  # POST /v1/saes resolves paths under it

    def serve_args(self, max_interventions: int) -> list[str]:
        """``sae-steer serve`` flags shared by the V1 and V2 servers."""
        return [
            "--sae",
            f"test-sae={self.sae}",
            "--sae",
            f"topk-sae={self.topk}",
            "--sae",
            f"jr-sae={self.jumprelu}",
            "--max-interventions",
            str(max_interventions),
            "--allow-runtime-sae-updates",
            "--sae-root",
            str(self.sae_root),
            "--steerable-layers",
            "6",
            "--readout",
            "--dtype",
            "float32",
            "--host",
            "127.0.0.1",
            "--max-model-len",
            "2048",
            "--seed",
            "0",
        ]


def steer_server_record(
    srv: server_process.ServerProcess,
    model: Path,
    files: ServerFiles,
    max_interventions: int,
    runner: str = "v1",
) -> SteerServer:
    return SteerServer(
        base_url=srv.base_url,
        model=model.name,
        model_path=model,
        sae_name="test-sae",
        sae_path=files.sae,
        d_sae=1024,
        topk_sae_name="topk-sae",
        jumprelu_sae_name="jr-sae",
        jumprelu_sae_path=files.jumprelu,
        max_interventions=max_interventions,
        log_path=srv.log,
        sae_root=files.sae_root,
        runner=runner,
    )


@contextlib.contextmanager
def v2_steer_server(model: Path, files: ServerFiles, root: Path) -> Iterator[SteerServer]:
    """``sae-steer serve`` as documented, on Model Runner V2 (vLLM's GPU default), here on CPU
    through the test-only Triton shim (``tests/v2_shim``).

    ``model`` must be the default model (what ``sae-steer serve`` runs without ``--model``,
    served under its folder's name as on V1). Before V2 was tested, this command did not start
    on V2 at all ("SteeringBatchTracker is not a subclass of
    vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor"). Eager (V2's per-step kernels
    run in Triton's interpreter, so compile mode would only add start-up time; compile on V2 is
    in ``test_engine_matrix``) and prefill chunked at 64 tokens, so long prompts span steps."""
    port = server_process.free_port()
    # no --model: the default model, served under its folder's name as on V1
    cmd = [sys.executable, "-m", "sae_steer_vllm.cli", "serve"]
    cmd += files.serve_args(MAX_INTERVENTIONS)
    cmd += ["--port", str(port), "--max-num-seqs", "16", "--enforce-eager"]
    cmd += ["--max-num-batched-tokens", "64"]
    env = v2_env({**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    log = root / "server-v2.log"
    srv = server_process.launch(cmd, log, port=port, env=env, healthy_within=900)
    try:
        if V2_LOG_LINE not in log.read_text():
            raise AssertionError(f"the server did not build Model Runner V2; see {log}")
        yield steer_server_record(srv, model, files, MAX_INTERVENTIONS, runner="v2")
    finally:
        srv.stop()
