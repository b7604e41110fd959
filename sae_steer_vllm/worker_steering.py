"""Per-worker steering state shared by both model runners: plans, slots and the token map.

vLLM builds the model, the V1 logits processors and the V2 model state as
separate objects with no shared handle, so one instance per worker process
(:data:`_WORKER`) is where they meet. That is the only module-level mutable
state in the plugin, and vLLM's design forces it.

This module is the runner-independent core: it turns a request's sampling
params into a cached :class:`SteeringPlan`, writes plans into a slot's tables,
and writes the token -> slot map the decoder-layer hooks read. How a runner
tells us which request sits where is glue that lives with that runner:

* Model Runner V1 (the CPU build; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``):
  :class:`~sae_steer_vllm.batch_tracker.V1BatchSlots`, fed by a no-op logits
  processor's ``BatchUpdate`` and filled from the attention metadata in the
  model's eager outer ``forward``;
* Model Runner V2 (GPU default): :class:`~sae_steer_vllm.model_state_v2.V2RequestSlots`,
  fed by the model state's ``add_request``/``remove_request``/``prepare_inputs``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .admission import REQUEST_ID_KEY
from .errors import SaeSteerError
from .plugin_config import PluginConfigError
from .readout_capture import ReadoutCapture
from .readout_worker import WorkerReadout, read_target
from .sae import SAEFormatError, SAERows
from .slot_tables import LayerTables
from .spec import spec_from_extra_args
from .steering_plan import SAECatalog, SteeringPlan, plan_spec
from .think_phase import NO_POSITION, initial_phase

if TYPE_CHECKING:
    from .batch_tracker import V1BatchSlots
    from .model_state_v2 import V2RequestSlots

logger = logging.getLogger("sae_steer_vllm")

_PLAN_CACHE_SIZE = 512


class SlotState(NamedTuple):
    """The buffers every steered layer shares (registered on each as ``sae_steer_<name>``)."""

    tok_slot: torch.Tensor
    """``[max_tokens]``: this step's slot per token (0: unsteered)"""
    slot_mode: torch.Tensor
    """``[S]``: each slot's request-level positions (:class:`PositionMode`)"""
    slot_prompt_len: torch.Tensor
    """``[S]``: each slot's prompt length"""
    slot_think_start: torch.Tensor
    """``[S]``: each slot's reasoning start ``S`` (:mod:`~sae_steer_vllm.think_phase`)"""
    slot_think_end: torch.Tensor
    """``[S]``: each slot's first end marker ``E``"""


@dataclass
class PlanFailures:
    """Requests whose spec failed in this worker and that therefore ran unsteered.

    ``admitted``: the API server had validated them (HTTP 200); it must stay 0, anything
    else is a fault the operator has to look at. ``unadmitted``: no admission middleware
    saw them (the offline ``LLM`` API, or a server started without it).
    """

    admitted: int = 0
    unadmitted: int = 0


class WorkerSteering:
    """Slot tables, plan cache and the token -> slot map for one worker process.

    Slot 0 is "unsteered" (all zeros); slots ``1..max_num_seqs`` belong to running
    requests, assigned by the runner's adapter (``v1`` or ``v2``, attached by the
    runner's glue when vLLM builds it).
    """

    def __init__(self, vllm_config: Any) -> None:
        self.catalog = SAECatalog.from_vllm_config(vllm_config)
        self.config = self.catalog.limits
        self.d_model = self.catalog.d_model
        self.num_layers = self.catalog.num_layers
        sched = vllm_config.scheduler_config
        self.max_reqs = int(sched.max_num_seqs)
        self.num_slots = self.max_reqs + 1
        # padding (CUDA graphs) can exceed the token budget a little
        self.max_tokens = int(sched.max_num_batched_tokens) + self.max_reqs
        self.use_v2 = bool(getattr(vllm_config, "use_v2_model_runner", False))
        self.v1: V1BatchSlots | None = None
        self.v2: V2RequestSlots | None = None
        self.tables: dict[int, LayerTables] = {}
        self._shared: SlotState | None = None
        markers = self.catalog.think_markers
        self.phase_ids: tuple[int, int] | None = (
            None
            if markers is None
            else (-1 if markers.start_id is None else markers.start_id, markers.end_id)
        )
        """(start id or -1, end id) when the model has think markers: the forward then
        tracks each slot's think span (:func:`~sae_steer_vllm.think_phase.update_phase`)"""
        self._plans: OrderedDict[str, SteeringPlan] = OrderedDict()
        self.plan_failures = PlanFailures()
        self._slot_layers: dict[int, set[int]] = {}
        self._dirty_upto = 0
        self._warned: set[str] = set()
        self.readout = _readout_for(self.catalog, vllm_config)
        self._readout_pos: torch.Tensor | None = None
        logger.info(
            "sae-steer: %d SAEs %s, steerable layers %s, clamp layers %s, %d slots",
            len(self.catalog.saes),
            sorted(self.catalog.saes),
            _fmt_layers(self.catalog.steerable_layers),
            sorted(self.catalog.clamp_layers),
            self.num_slots,
        )

    # ------------------------------------------------------------------ runtime SAEs
    def register_sae(self, name: str, path: str) -> None:
        """Add an SAE at runtime (``POST /v1/saes``, via the worker extension).

        The same metadata check as start-up, on a layer that already has clamp tables,
        and the SAE's small vectors read now, so a broken weights file fails here and
        not in a request. Raises :class:`~sae_steer_vllm.plugin_config.PluginConfigError`.
        """
        info = self.catalog.read_runtime_sae(name, path)
        try:
            rows = SAERows(info.path)
        except (SAEFormatError, OSError) as e:
            raise PluginConfigError(f"SAE {name!r}: {e}") from None
        self.catalog.add(info, rows)
        self._plans.clear()  # a cached plan may name an SAE that has just changed meaning
        ro = self.readout
        if ro is not None and info.cfg.hook_layer in ro.captures and ro.is_reporting():
            ro.encoder(name)  # its encoder now, not in the step of the first request reading it
        logger.info("sae-steer: registered SAE %r (layer %d) at runtime", name, info.cfg.hook_layer)

    def unregister_sae(self, name: str) -> bool:
        """Remove an SAE (``DELETE /v1/saes/{name}``); False if it was not registered.

        The API server only asks once no admitted request names it; running slots keep
        their tables either way (plans are copied into them), only new plans change.
        """
        if name not in self.catalog.saes:
            return False
        self.catalog.remove(name)
        self._plans.clear()
        logger.info("sae-steer: removed SAE %r", name)
        return True

    # ------------------------------------------------------------------ buffers
    def build_layer_tables(self, layer: int, dtype: torch.dtype) -> LayerTables | None:
        """Called while vLLM constructs the model (so default device/dtype apply)."""
        if layer not in self.catalog.steerable_layers:
            return None
        k = self.config.max_clamp_per_layer if layer in self.catalog.entry_layers else 0
        t = LayerTables(self.num_slots, self.d_model, k, dtype)
        self.tables[layer] = t
        return t

    def build_capture(self, layer: int, dtype: torch.dtype) -> ReadoutCapture | None:
        """The readout capture of ``layer`` (while vLLM constructs the model), or None."""
        if self.readout is None or layer not in self.catalog.readout_layers:
            return None
        if self._readout_pos is None:
            self._readout_pos = torch.zeros(self.max_tokens, dtype=torch.int64)
        cap = ReadoutCapture(self.max_tokens, self.d_model, dtype, self._readout_pos)
        self.readout.add_capture(layer, cap)
        return cap

    def shared_buffers(self) -> SlotState:
        """Created on first use, while vLLM constructs the model (its device and dtype)."""
        if self._shared is None:
            i64 = torch.int64
            self._shared = SlotState(
                tok_slot=torch.zeros(self.max_tokens, dtype=i64),
                slot_mode=torch.zeros(self.num_slots, dtype=i64),
                slot_prompt_len=torch.zeros(self.num_slots, dtype=i64),
                slot_think_start=torch.full((self.num_slots,), NO_POSITION, dtype=i64),
                slot_think_end=torch.full((self.num_slots,), NO_POSITION, dtype=i64),
            )
        return self._shared

    # ------------------------------------------------------------------ plans
    def plan_for(self, params: Any, req_id: str | None = None) -> SteeringPlan | None:
        """The request's plan, or None if unsteered. Never raises: a worker exception would
        kill the engine for every user.

        A spec that fails here is a failure of that request, and vLLM 0.32 gives a model or
        a logits processor no way to fail one request (its per-request error finish is
        reached only from KV/EC connectors and the engine core's own pre-processing). So the
        request runs unsteered and the failure is made loud instead of silent: an ERROR log
        naming the request, every time, and a count in :attr:`plan_failures`. The admission
        middleware validates every spec on every route (and reads its SAE rows) before a 200,
        so for an admitted request this means the worker's SAEs differ from the API
        server's (a file changed on disk, a registration raced the request).
        """
        extra = getattr(params, "extra_args", None)
        try:
            spec = spec_from_extra_args(extra, self.config.max_spec_bytes)
            if spec is None:
                return None
            key = spec.to_json()
            plan = self._plans.get(key)
            if plan is None:
                plan = plan_spec(spec, self.catalog)
                self._plans[key] = plan
                if len(self._plans) > _PLAN_CACHE_SIZE:
                    self._plans.popitem(last=False)
            else:
                self._plans.move_to_end(key)
            return plan
        except Exception as e:  # noqa: BLE001 - see docstring
            self._plan_failed(extra, req_id, e)
            return None

    def _plan_failed(self, extra: Any, req_id: str | None, e: Exception) -> None:
        admitted = extra.get(REQUEST_ID_KEY) if isinstance(extra, Mapping) else None
        reason = str(e) if isinstance(e, SaeSteerError) else f"{type(e).__name__}: {e}"
        if admitted is not None:
            self.plan_failures.admitted += 1
            logger.error(
                "sae-steer: request %s was ADMITTED by the API server but its steering spec "
                "failed in this worker, so it runs UNSTEERED: %s. The worker's SAEs differ "
                "from the API server's (a file changed on disk, or a registration raced the "
                "request); failures so far: %s",
                req_id or admitted,
                reason,
                self.plan_failures,
            )
        else:
            self.plan_failures.unadmitted += 1
            logger.error(
                "sae-steer: request %s runs UNSTEERED, its spec failed in the worker: %s "
                "(no admission middleware saw it: start the API server with --middleware "
                "sae_steer_vllm.middleware.SteeringMiddleware so such requests get HTTP 400)",
                req_id or "(offline)",
                reason,
            )

    def warn_once(self, key: str, msg: str, *args: Any) -> None:
        """Log an error the first time ``key`` occurs (a worker logs per step otherwise)."""
        if key not in self._warned:
            self._warned.add(key)
            logger.error(msg, *args)

    def write_slot(
        self,
        slot: int,
        plan: SteeringPlan,
        prompt_len: int,
        params: Any = None,
        token_ids: Sequence[int] | None = None,
    ) -> None:
        """Put a request's plan into ``slot``'s tables (clearing layers it no longer uses),
        its readout target (from ``params``) beside them, and its think span as far as
        ``token_ids`` (prompt, then what it generated before a preemption) show it."""
        if self.readout is not None:
            self.readout.attach(slot, read_target(params, plan.readout, prompt_len))
        for layer in self._slot_layers.pop(slot, set()) - set(plan.layers):
            self.tables[layer].write(slot, None)
        for layer, lp in plan.layers.items():
            self.tables[layer].write(slot, lp)
        self._slot_layers[slot] = set(plan.layers)
        st = self.shared_buffers()
        st.slot_mode[slot] = int(plan.position_mode)
        st.slot_prompt_len[slot] = prompt_len
        start = end = NO_POSITION
        markers = self.catalog.think_markers
        if markers is not None and plan.needs_phase:
            if token_ids is None:  # cannot happen with vLLM 0.32's runners; never guess
                self.warn_once(
                    "notokens",
                    "sae-steer: the runner gave no token ids with a request that steers "
                    "thinking/answer; its phase starts from the first generated marker",
                )
                token_ids = []
            start, end = initial_phase(token_ids, prompt_len, markers)
        st.slot_think_start[slot] = start
        st.slot_think_end[slot] = end

    def release_slot(self, slot: int) -> None:
        """The request in ``slot`` left (finished, aborted or preempted): it reads no more.
        Its tables are overwritten by the next :meth:`write_slot`."""
        if self.readout is not None:
            self.readout.release(slot)

    # ------------------------------------------------------------------ token map
    def write_tokens(self, tok: np.ndarray) -> None:
        """This step's slot per token; the rest of the buffer is kept zero (unsteered)."""
        buf = self.shared_buffers().tok_slot
        n = len(tok)
        if n:
            buf[:n].copy_(torch.from_numpy(np.ascontiguousarray(tok)), non_blocking=False)
        if self._dirty_upto > n:
            buf[n : self._dirty_upto].zero_()
        nz = int(np.count_nonzero(tok)) if n else 0
        self._dirty_upto = n if nz else 0
        if self.readout is not None:
            self.readout.step_tokens(tok)

    def clear_tokens(self) -> None:
        """No steered request in this step."""
        self.write_tokens(np.zeros(0, dtype=np.int64))


def _readout_for(catalog: SAECatalog, vllm_config: Any) -> WorkerReadout | None:
    """The worker's readout, when the server reads; refuses set-ups it cannot read exactly."""
    if not catalog.readout_layers:
        return None
    if int(getattr(vllm_config.parallel_config, "pipeline_parallel_size", 1)) > 1:
        raise PluginConfigError(
            "sae-steer: readout needs every SAE layer on one rank; it does not support "
            "pipeline parallelism (drop --readout or --pipeline-parallel-size)"
        )
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise PluginConfigError(
            "sae-steer: readout would report rejected draft tokens; it does not support "
            "speculative decoding (drop --readout or --speculative-config)"
        )
    return WorkerReadout(catalog)


def _fmt_layers(layers: set[int]) -> str:
    s = sorted(layers)
    if s and s == list(range(s[0], s[-1] + 1)) and len(s) > 3:
        return f"{s[0]}..{s[-1]}"
    return str(s)


_WORKER: WorkerSteering | None = None


def get_worker_steering(vllm_config: Any) -> WorkerSteering:
    """The process's instance, created on first use (model constructor or tracker)."""
    global _WORKER
    if _WORKER is None:
        _WORKER = WorkerSteering(vllm_config)
    return _WORKER


def current_worker_steering() -> WorkerSteering | None:
    return _WORKER
