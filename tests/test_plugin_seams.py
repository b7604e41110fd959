"""The plugin's seams, without starting an engine: the request/SAE/plan side imports
without vLLM, and both runner adapters (V1 batch updates, V2 request slots) drive the
same core (slot tables, token -> slot map)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from sae_steer_vllm.sae import random_sae
from sae_steer_vllm.spec import SteeringSpec

NO_VLLM = """
import sys
sys.modules["vllm"] = None  # every `import vllm...` now raises ImportError
import sae_steer_vllm
from sae_steer_vllm import SAE, SteeringSpec, load_sae, steering_extra_body
from sae_steer_vllm.plugin_config import PluginConfig
from sae_steer_vllm.sae import random_sae, read_config
from sae_steer_vllm.steering_plan import PositionMode, SAECatalog, plan_spec

folder = sys.argv[1]
random_sae(folder, d_in=16, d_sae=32, layer=1)
assert isinstance(load_sae(folder), SAE) and read_config(folder)[0].d_sae == 32
spec = SteeringSpec.from_obj(
    {"interventions": [{"sae": "s", "feature": 3, "strength": 2.0}], "positions": "prompt"}
)
assert steering_extra_body(spec)["vllm_xargs"]["steering"] == spec.to_json()
cat = SAECatalog.load(PluginConfig(saes={"s": folder}), num_layers=2, d_model=16)
plan = plan_spec(spec, cat)
assert len(plan.layers[1].entries) == 1 and plan.position_mode is PositionMode.PROMPT
loaded = [m for m, mod in sys.modules.items() if m.split(".")[0] == "vllm" and mod is not None]
assert not loaded, loaded
print("ok")
"""


def test_spec_sae_and_plan_work_without_vllm(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-c", NO_VLLM, str(tmp_path / "sae")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


D, LAYERS, MAX_REQS = 16, 3, 4


def _worker(tmp_path: Path) -> Any:
    from sae_steer_vllm.worker_steering import WorkerSteering

    random_sae(tmp_path / "sae", d_in=D, d_sae=32, layer=1)
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(
            hf_config=SimpleNamespace(hidden_size=D, num_hidden_layers=LAYERS)
        ),
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_REQS, max_num_batched_tokens=32),
        additional_config={"sae_steer": {"saes": {"s": str(tmp_path / "sae")}}},
    )
    ws = WorkerSteering(cfg)
    for layer in range(LAYERS):
        ws.build_layer_tables(layer, torch.float32)
    return ws


def _params(value: float | None) -> Any:
    if value is None:
        return SimpleNamespace(extra_args=None)
    spec = SteeringSpec.from_obj(
        {"interventions": [{"sae": "s", "feature": 2, "value": value, "mode": "add"}]}
    )
    return SimpleNamespace(extra_args=spec.extra_body()["vllm_xargs"])


def _update(removed: Any = (), added: Any = (), moved: Any = ()) -> Any:
    """A stand-in for vLLM's ``BatchUpdate``."""
    return SimpleNamespace(removed=list(removed), added=list(added), moved=list(moved))


def test_v1_batch_updates_assign_and_free_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from vllm.v1.sample.logits_processor import MoveDirectionality

    from sae_steer_vllm import worker_steering
    from sae_steer_vllm.batch_tracker import SteeringBatchTracker, fill_token_slots

    ws = _worker(tmp_path)
    fill_token_slots(ws, 4)  # no tracker yet: warns, steers nothing
    assert "notracker" in ws._warned
    monkeypatch.setattr(worker_steering, "_WORKER", ws)
    tracker = SteeringBatchTracker(None, torch.device("cpu"), False)  # type: ignore[arg-type]
    slots = ws.v1
    assert slots is not None and tracker.slots is slots
    tracker.update_state(
        _update(added=[(0, _params(3.0), [1, 2, 3], None), (1, _params(None), [1], None)])
    )
    steered = int(slots.row_slot[0])
    assert steered > 0 and slots.row_slot[1] == 0
    dec = ws.catalog.rows("s").feature(2)[3]
    assert torch.allclose(ws.tables[1].add[steered], 3.0 * dec)
    assert int(ws.shared_buffers().slot_prompt_len[steered]) == 3
    tracker.update_state(_update(moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert slots.row_slot[1] == steered and slots.row_slot[0] == 0
    tracker.update_state(_update(removed=[1]))
    assert not slots.row_slot.any() and steered in slots._free


def test_v2_request_slots_fill_the_token_map(tmp_path: Path) -> None:
    pytest.importorskip("vllm.v1.worker.gpu.model_states.default")
    from sae_steer_vllm.model_state_v2 import V2RequestSlots

    ws = _worker(tmp_path)
    slots = V2RequestSlots(ws)
    slots.add(2, "a", _params(1.5), prompt_len=2)
    slots.add(0, "b", _params(None), prompt_len=1)
    batch = SimpleNamespace(
        num_reqs=2,
        idx_mapping_np=np.array([0, 2]),
        query_start_loc_np=np.array([0, 1, 4]),
        num_tokens=4,
    )
    slots.fill(batch)
    assert ws.shared_buffers().tok_slot[:5].tolist() == [0, 3, 3, 3, 0]
    slots.remove("a")
    slots.fill(batch)
    assert not ws.shared_buffers().tok_slot.any()


def test_v2_row_reuse_and_preempted_resumption(tmp_path: Path) -> None:
    """Model Runner V2's two cases that matter (see model_state_v2's contract): rows come from a
    LIFO free list, so a request removed and another added into the same row happen in one
    step; a preempted request is removed, then comes back as a new request with its original
    ``prompt_len``, usually in another row."""
    pytest.importorskip("vllm.v1.worker.gpu.model_states.default")
    from sae_steer_vllm.model_state_v2 import V2RequestSlots

    ws = _worker(tmp_path)
    slots = V2RequestSlots(ws)
    dec = ws.catalog.rows("s").feature(2)[3]
    slots.add(2, "a", _params(1.5), prompt_len=5)
    # one step: "a" finishes (or is preempted) and "c" takes its row with another spec
    slots.remove("a")
    slots.add(2, "c", _params(-4.0), prompt_len=7)
    assert torch.allclose(ws.tables[1].add[3], -4.0 * dec), "row 2's slot kept a's vector"
    assert int(ws.shared_buffers().slot_prompt_len[3]) == 7
    # "a" resumes after preemption as a new request in row 0, prompt_len unchanged
    slots.add(0, "a", _params(1.5), prompt_len=5)
    assert torch.allclose(ws.tables[1].add[1], 1.5 * dec)
    assert int(ws.shared_buffers().slot_prompt_len[1]) == 5, (
        "a resumed request must keep its prompt/generated split"
    )
    batch = SimpleNamespace(
        num_reqs=2,
        idx_mapping_np=np.array([2, 0]),  # batch order is not row order
        query_start_loc_np=np.array([0, 2, 3]),
        num_tokens=3,
    )
    slots.fill(batch)
    assert ws.shared_buffers().tok_slot[:3].tolist() == [3, 3, 1]
    # an unsteered request added into a row whose previous owner was never removed is unsteered
    slots.add(2, "d", _params(None), prompt_len=1)
    slots.fill(batch)
    assert ws.shared_buffers().tok_slot[:3].tolist() == [0, 0, 1]
