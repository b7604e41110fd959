"""Model Runner V2's glue (vLLM's GPU default): the per-model ``ModelState`` hook and its slot map.

``resolve_model_state_cls`` asks the model for ``get_model_state_cls()``; ours
wraps the default state and keeps :class:`V2RequestSlots` in step with
``add_request``/``remove_request``, filling the token map in ``prepare_inputs``,
which V2 calls before every forward and before FULL CUDA-graph replays.

UNTESTED: V2 needs Triton on a GPU and this project has no GPU machine. It is
written against vLLM 0.32.0's interface (``v1/worker/gpu/model_states``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from .worker_steering import WorkerSteering, current_worker_steering


class V2RequestSlots:
    """Request index -> slot (``index + 1``: V2 keeps a request's index while it runs)."""

    def __init__(self, ws: WorkerSteering) -> None:
        self.ws = ws
        self.row_slot = np.zeros(ws.max_reqs, dtype=np.int64)
        self._req_slot: dict[str, int] = {}

    def add(self, req_index: int, req_id: str, params: Any, prompt_len: int) -> None:
        self.remove(req_id)
        plan = self.ws.plan_for(params, req_id) if params is not None else None
        if plan is None:
            return
        slot = req_index + 1
        self.ws.write_slot(slot, plan, prompt_len)
        self._req_slot[req_id] = slot
        self.row_slot[req_index] = slot

    def remove(self, req_id: str) -> None:
        slot = self._req_slot.pop(req_id, None)
        if slot is not None:
            self.row_slot[slot - 1] = 0

    def fill(self, input_batch: Any) -> None:
        if not self._req_slot:
            self.ws.clear_tokens()
            return
        n = int(input_batch.num_reqs)
        idx = input_batch.idx_mapping_np[:n]
        slots = self.row_slot[idx]
        qsl = input_batch.query_start_loc_np[: n + 1]
        self.ws.write_tokens(np.repeat(slots, np.diff(qsl))[: int(input_batch.num_tokens)])


def _slots() -> V2RequestSlots | None:
    ws = current_worker_steering()
    if ws is None:
        return None
    if ws.v2 is None:
        ws.v2 = V2RequestSlots(ws)
    return ws.v2


class SteeringModelState(DefaultModelState):
    def add_request(self, req_index: int, new_req_data: Any) -> None:
        super().add_request(req_index, new_req_data)
        slots = _slots()
        if slots is not None:
            slots.add(
                req_index,
                new_req_data.req_id,
                new_req_data.sampling_params,
                int(new_req_data.prompt_len),
            )

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        slots = _slots()
        if slots is not None:
            slots.remove(req_id)

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> dict[str, Any]:
        out: dict[str, Any] = super().prepare_inputs(input_batch, req_states)
        slots = _slots()
        if slots is not None:
            slots.fill(input_batch)
        return out
