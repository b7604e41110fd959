"""The ``--logits-processors`` entry for both runners, and Model Runner V1's slot map it feeds.

vLLM tells logits processors, before each forward, which persistent-batch row
holds which request (``BatchUpdate``). That is exactly what per-token steering
needs, so :class:`SteeringBatchTracker` only forwards those updates to
:class:`V1BatchSlots`; the steered model's eager outer ``forward`` then expands
row -> slot to token -> slot with ``query_start_loc`` from the attention
metadata (:func:`fill_token_slots`). ``validate_params`` runs in the API server
at admission: a structurally bad spec is an HTTP 400 there even without the
middleware.

Model Runner V2 loads the same class through its own interface (it subclasses
both: each runner's loader only checks ``issubclass``, vLLM 0.32
``v1/sample/logits_processor/__init__.py:119-122`` and
``v1/worker/gpu/sample/logits_processor/loader.py:124-130``). Under V2 it tracks
nothing (the model state does, :mod:`.model_state_v2`): it validates specs at
admission (``v1/engine/input_processor.py:99-106``), declines every request in
``add_request`` so the sampler never runs it (``gpu/sample/sampler.py:235``), and
refuses to start when the steering model state is not attached.

Install with ``--logits-processors sae_steer_vllm.batch_tracker:SteeringBatchTracker``
(``sae-steer serve`` does; the same value on both runners, so nobody has to predict
which one vLLM picks). Not registered under the ``vllm.logits_processors``
entry-point group on purpose: an entry point is loaded into every vLLM in the
environment, steered model or not.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from .errors import SaeSteerError
from .spec import spec_from_extra_args
from .worker_steering import WorkerSteering, get_worker_steering

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig


class V1BatchSlots:
    """Persistent-batch row -> slot, kept in step with V1's ``BatchUpdate``s."""

    def __init__(self, ws: WorkerSteering) -> None:
        self.ws = ws
        self.row_slot = np.zeros(ws.max_reqs, dtype=np.int64)
        self._free = list(range(ws.num_slots - 1, 0, -1))
        self._active = 0

    def _alloc(self) -> int:
        if not self._free:  # cannot happen: slots = max_num_seqs + 1
            raise RuntimeError("sae-steer: no free steering slot")
        return self._free.pop()

    def _release(self, slot: int) -> None:
        if slot:
            self._free.append(slot)
            self.ws.release_slot(slot)

    def update(self, batch_update: Any) -> None:
        """Apply a ``BatchUpdate`` (order: removed, added, moved)."""
        rs = self.row_slot
        for row in batch_update.removed:
            self._release(int(rs[row]))
            rs[row] = 0
        for row, params, prompt_ids, out in batch_update.added:
            self._release(int(rs[row]))
            rs[row] = 0
            plan = self.ws.plan_for(params)
            if plan is not None:
                slot = self._alloc()
                plen = len(prompt_ids) if prompt_ids is not None else 0
                # prompt + what a resumed request generated before (V1 restores its outputs)
                ids = [*(prompt_ids or ()), *(out or ())] if plan.needs_phase else None
                self.ws.write_slot(slot, plan, plen, params, ids)
                rs[row] = slot
        for a, b, direction in batch_update.moved:
            if direction == MoveDirectionality.SWAP:
                rs[a], rs[b] = rs[b], rs[a]
            else:
                if rs[b] and rs[b] != rs[a]:
                    self._release(int(rs[b]))
                rs[b] = rs[a]
                rs[a] = 0
        self._active = int(np.count_nonzero(rs))

    def fill(self, num_tokens: int) -> None:
        """Token -> slot map for this step, from the attention metadata's query_start_loc."""
        if self._active == 0:
            self.ws.clear_tokens()
            return
        qsl = _query_start_loc()
        if qsl is None:  # profiling / dummy runs carry no requests
            self.ws.clear_tokens()
            return
        num_reqs = min(len(qsl) - 1, self.ws.max_reqs)
        counts = np.diff(qsl[: num_reqs + 1])
        self.ws.write_tokens(np.repeat(self.row_slot[:num_reqs], counts)[:num_tokens])


def fill_token_slots(ws: WorkerSteering, num_tokens: int) -> None:
    """Called by the steered model's outer ``forward`` under V1, before the trunk runs."""
    if ws.v1 is None:
        ws.warn_once(
            "notracker",
            "sae-steer: the V1 batch tracker is not installed; steering is OFF. "
            "Start vLLM with --logits-processors "
            "sae_steer_vllm.batch_tracker:SteeringBatchTracker (sae-steer serve does this)",
        )
        return
    ws.v1.fill(num_tokens)


def _query_start_loc() -> np.ndarray | None:
    if not is_forward_context_available():
        return None
    md: Any = get_forward_context().attn_metadata
    if isinstance(md, list):
        md = md[0] if md else None
    if not md:
        return None
    for m in md.values():
        q = getattr(m, "query_start_loc_cpu", None)
        if q is None:
            q = getattr(m, "query_start_loc", None)
        if q is not None:
            return np.asarray(q.cpu().numpy() if isinstance(q, torch.Tensor) else q)
    return None


class SteeringBatchTracker(LogitsProcessor, V2LogitsProcessor):
    """The ``--logits-processors`` entry: forwards V1 batch updates, returns logits unchanged."""

    slots: V1BatchSlots | None

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        spec_from_extra_args(sampling_params.extra_args)  # raises SteeringSpecError (ValueError)

    def __init__(self, vllm_config: VllmConfig, *args: Any) -> None:
        ws = get_worker_steering(vllm_config)
        if len(args) == 1:  # Model Runner V2: (vllm_config, req_states)
            if ws.v2 is None:  # the runner builds its model state before the sampler
                raise SaeSteerError(
                    "sae-steer: Model Runner V2 did not build sae-steer's model state "
                    "(the model's get_model_state_cls was not used), so steering cannot "
                    "attach; start vLLM with VLLM_USE_V2_MODEL_RUNNER=0 and report the "
                    "vLLM version"
                )
            self.slots = None
            return
        if ws.v1 is None:  # Model Runner V1: (vllm_config, device, is_pin_memory)
            ws.v1 = V1BatchSlots(ws)
        self.slots = ws.v1

    def is_argmax_invariant(self) -> bool:
        return True

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        """V2: never process logits for any request (the model state does the steering)."""
        return False

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update and self.slots is not None:
            self.slots.update(batch_update)
