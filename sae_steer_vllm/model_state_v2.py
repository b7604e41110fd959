"""Model Runner V2's glue (vLLM's GPU default): the per-model ``ModelState`` hook and its slot map.

The contract, from vLLM 0.32.0 (paths under ``vllm/v1/``). vLLM 0.33.0 (GPU wheel, diffed against
0.32.0; no CPU build of 0.33 exists to run here) keeps every part of it: ``ModelState`` and
``DefaultModelState.__init__``, ``NewRequestData``, the input-batch fields read below,
``model_states/__init__.py``, both logits-processor interfaces and the ``additional_config``
handling are unchanged; ``gpu/model_runner.py`` changed in 182 lines (line numbers below
shift), with the same calls to the model state:

* ``worker/gpu/model_states/__init__.py:32-33``: ``resolve_model_state_cls`` uses the
  model's ``get_model_state_cls()`` when it has one; the runner builds the state in
  ``load_model`` (``gpu/model_runner.py:431``), before the sampler and its logits
  processors (``:457``), so :class:`SteeringModelState` attaches in ``__init__``.
* Each step (``gpu/model_runner.py:1730-1735``): ``finish_requests`` calls
  ``remove_request`` for every finished *and preempted* id, sorted so all TP ranks free
  rows alike (``:1152-1164``; ``_remove_request`` calls the model state before the row
  is freed, ``:1134-1138``); then ``add_requests`` calls ``add_request(req_index, new)``
  for each new request, after ``_remove_request(req_id)`` for the same id (streaming
  input re-adds, ``:1181-1216``). Rows come from a LIFO free list
  (``gpu/states.py:100,132``): a row freed in a step is the next one handed out, so a
  request removed and another added into the same row in one step is the common case.
* Preemption: a preempted request is removed like a finished one; on resumption the
  scheduler sends it as a *new* request (``core/sched/scheduler.py:1418-1428``) with
  ``prefill_token_ids`` = prompt + output so far and its original ``prompt_len``
  (``core/sched/output.py:59-91``), usually in another row.
* ``prepare_inputs(input_batch, req_states)`` runs before every forward
  (``gpu/model_runner.py:1959-1967``), eager, piecewise or FULL graph replay
  (``:1997-2044``), and also for dummy/profile batches (``InputBatch.make_dummy``:
  rows ``0..n-1``, ``gpu/input_batch.py:126-140``). CUDA-graph *capture* calls
  ``prepare_dummy_inputs`` instead (``gpu/cudagraph_utils.py:682-686``).
* Rows: ``input_batch.idx_mapping_np[i]`` is the row of the ``i``-th request of this
  step's batch (batch order is re-sorted every step, decodes first,
  ``gpu/model_runner.py:2435-2447``); its tokens are
  ``query_start_loc_np[i]:query_start_loc_np[i+1]``, exact except under adaptive draft
  verification, which reallocates drafts on the device only (``:1411-1439``).
  ``num_tokens_after_padding`` >= ``num_tokens``: padding tokens stay slot 0.
* Async scheduling: the forward runs on the runner's current stream
  (``gpu/model_runner.py:585-587``); our host->device writes are ordered on that stream
  after the previous step's forward, so they are correct, but synchronous (the host
  waits for the device each step).

A slot is ``row + 1``: V2 keeps a request in one row while it runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from .errors import SaeSteerError
from .worker_steering import WorkerSteering, get_worker_steering


class V2RequestSlots:
    """Request index -> slot (``index + 1``: V2 keeps a request's index while it runs)."""

    def __init__(self, ws: WorkerSteering) -> None:
        self.ws = ws
        self.row_slot = np.zeros(ws.max_reqs, dtype=np.int64)
        self._req_slot: dict[str, int] = {}

    def add(
        self,
        req_index: int,
        req_id: str,
        params: Any,
        prompt_len: int,
        token_ids: list[int] | None = None,
    ) -> None:
        """``token_ids``: prompt, then what a resumed request generated before preemption."""
        self.remove(req_id)
        self.row_slot[req_index] = 0  # the row may have been freed without us
        plan = self.ws.plan_for(params, req_id) if params is not None else None
        if plan is None:
            return
        slot = req_index + 1
        self.ws.write_slot(slot, plan, prompt_len, params, token_ids)
        self._req_slot[req_id] = slot
        self.row_slot[req_index] = slot

    def remove(self, req_id: str) -> None:
        slot = self._req_slot.pop(req_id, None)
        if slot is not None:
            self.row_slot[slot - 1] = 0
            self.ws.release_slot(slot)

    def fill(self, input_batch: Any) -> None:
        if not self._req_slot:
            self.ws.clear_tokens()
            return
        n = int(input_batch.num_reqs)
        idx = input_batch.idx_mapping_np[:n]
        slots = self.row_slot[idx]
        qsl = input_batch.query_start_loc_np[: n + 1]
        self.ws.write_tokens(np.repeat(slots, np.diff(qsl))[: int(input_batch.num_tokens)])


class SteeringModelState(DefaultModelState):
    """vLLM's default state plus the request -> slot bookkeeping steering needs."""

    def __init__(self, vllm_config: Any, model: Any, encoder_cache: Any, device: Any) -> None:
        super().__init__(vllm_config, model, encoder_cache, device)
        ws = get_worker_steering(vllm_config)
        if int(vllm_config.parallel_config.prefill_context_parallel_size) > 1:
            raise SaeSteerError(
                "sae-steer: prefill context parallelism splits a request's tokens across "
                "ranks, which the steering token map does not follow; drop "
                "--prefill-context-parallel-size"
            )
        spec = vllm_config.speculative_config
        if spec is not None and getattr(spec, "enable_adaptive_verification", False):
            raise SaeSteerError(
                "sae-steer: adaptive draft verification places draft tokens on the device "
                "only, so steering cannot map tokens to requests; turn it off"
            )
        if ws.v2 is None:
            ws.v2 = V2RequestSlots(ws)
        self.slots = ws.v2

    def add_request(self, req_index: int, new_req_data: Any) -> None:
        super().add_request(req_index, new_req_data)
        self.slots.add(
            req_index,
            new_req_data.req_id,
            new_req_data.sampling_params,
            int(new_req_data.prompt_len),
            new_req_data.prefill_token_ids or new_req_data.prompt_token_ids,
        )

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.slots.remove(req_id)

    def prepare_inputs(self, input_batch: Any, req_states: Any) -> dict[str, Any]:
        out: dict[str, Any] = super().prepare_inputs(input_batch, req_states)
        self.slots.fill(input_batch)
        return out
