"""The runtime-SAE registry without an engine: a plugin config, worker states standing in
for tensor-parallel ranks, and an "engine" whose collective RPCs call the real worker
extension on them (as vLLM's executor calls each worker); plus the HTTP call the
``/v1/saes`` tests make on a real server."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from sae_steer_vllm.plugin_config import PluginConfig
from sae_steer_vllm.sae import random_sae

D, LAYERS = 32, 8


def registry_config(tmp_path: Path, **over: Any) -> PluginConfig:
    """Two start-up SAEs (standard on layer 2, TopK without statistics on layer 1), runtime
    updates on under ``tmp_path/root``, clamp tables also on layers 5 and 6."""
    random_sae(tmp_path / "std", d_in=D, d_sae=64, layer=2)
    random_sae(tmp_path / "tk", d_in=D, d_sae=64, layer=1, architecture="topk", with_stats=False)
    kw: dict[str, Any] = {
        "saes": {"std": str(tmp_path / "std"), "tk": str(tmp_path / "tk")},
        "max_interventions": 4,
        "max_clamp_per_layer": 2,
        "vector_layers": "0,1,2,6",
        "allow_runtime_sae_updates": True,
        "sae_root": str(tmp_path / "root"),
        "steerable_layers": "5,6",
    }
    kw.update(over)
    (tmp_path / "root").mkdir(exist_ok=True)
    return PluginConfig(**kw)


def fake_vllm_config(config: PluginConfig, extension: str | None = None) -> Any:
    """The parts of vLLM's config the plugin reads (``extension``: default ours)."""
    from sae_steer_vllm.worker_extension import EXTENSION

    return SimpleNamespace(
        model_config=SimpleNamespace(
            hf_config=SimpleNamespace(hidden_size=D, num_hidden_layers=LAYERS)
        ),
        scheduler_config=SimpleNamespace(max_num_seqs=4, max_num_batched_tokens=32),
        additional_config={"sae_steer": config.model_dump()},
        parallel_config=SimpleNamespace(
            worker_extension_cls=EXTENSION if extension is None else extension,
            _api_process_count=1,
            data_parallel_size=1,
        ),
    )


def worker_state(vllm_config: Any) -> Any:
    """One worker's steering state, with its tables built as the model constructor would."""
    from sae_steer_vllm.worker_steering import WorkerSteering

    ws = WorkerSteering(vllm_config)
    for layer in range(LAYERS):
        ws.build_layer_tables(layer, torch.float32)
    return ws


class FakeEngine:
    """``collective_rpc`` over per-rank worker states; ``set_worker`` makes a state the
    process's current one (``worker_steering._WORKER``) while its rank answers."""

    def __init__(self, ranks: list[Any], set_worker: Callable[[Any], None]) -> None:
        self.ranks = ranks
        self.set_worker = set_worker
        self.calls: list[str] = []

    async def collective_rpc(
        self, method: str, timeout: float | None = None, args: tuple = (), kwargs: Any = None
    ) -> list[Any]:
        from sae_steer_vllm.worker_extension import SAESteerWorkerExtension

        self.calls.append(method)
        out = []
        for ws in self.ranks:
            self.set_worker(ws)
            out.append(getattr(SAESteerWorkerExtension(), method)(*args))
        return out


def saes_http(server: Any, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call to a real server's root (``/v1/saes...``): (status, JSON answer)."""
    req = urllib.request.Request(
        server.root_url + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")
