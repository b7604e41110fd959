"""Steered model classes: vLLM's own model plus a hook after each steerable decoder layer.

``Steered<Arch>ForCausalLM(SteeringMixin, <Arch>ForCausalLM)`` is vLLM's class
unchanged plus :class:`SteeringMixin`, which registers a forward hook on each steerable decoder layer in ``__init__`` (before the first
compile, so dynamo inlines it into the graph). The hook adds the steering
delta to ``residual``: a decoder layer returns ``(mlp_out, residual)`` and the
true residual stream after the layer (HF's layer output, "resid_post") is
their sum. Adding to ``residual`` rather than ``mlp_out`` leaves the next
layer's all-reduce -> fused add-RMSNorm pattern intact for TP fusion passes.

Two sites (spec ``site``). vLLM's ``LlamaDecoderLayer.forward`` (vLLM 0.32,
``model_executor/models/llama.py:313-330``) ends ``hidden_states, residual =
self.post_attention_layernorm(hidden_states, residual); hidden_states =
self.mlp(hidden_states); return hidden_states, residual``: its first output is the
MLP output, and the residual add is deferred to the next layer's fused
``input_layernorm(hidden_states, residual)`` (or the final ``norm``); Qwen2/3 and
Mistral do the same. ``resid_post`` (default, the paper's definition) encodes
``hidden + residual``. ``mlp_out`` is what the authors' code ran
(AIRI-Institute/SAE-Reasoning @ 2cbfbff): ``evaluation/evaluation.sh:13-17`` pass
``sae_feature_idx=46379,sae_strength=2.0,sae_max_activation=5.840`` as model args,
so ``lm_eval/models/vllm_causallms.py:356-373`` takes the non-dict branch and hooks
``lm_model.model.layers[self.sae.cfg.hook_layer]`` with
``get_intervention_hook(copy.deepcopy(self.sae), **self.intervention_config)``
(``enforce_eager`` at :132); ``lm_eval/sae_utils.py:53-71`` then does
``activations = output[0].clone()``, ``features = sae.encode(activations)``,
``error = activations.to(features.dtype) - reconstructed``,
``features[..., feature_idx] = max_activation * strength``,
``activations_hat = sae.decode(features) + error`` and returns
``(activations_hat,) + output[1:]``: the feature encoded from the MLP output and
``mlp_out + (c - f_i(mlp_out)) * W_dec[i]`` put back in its place. Since an SAE
trained on resid_post rarely fires on an MLP output, that is close to adding
``c * W_dec[i]``. Here the same delta, computed from ``hidden`` alone, is added to
``residual``: every consumer (next layer, final norm, aux hidden states) reads only
the sum, which is therefore the authors' up to one rounding of the model dtype.

The eager outer ``forward`` (outside vLLM's compiled trunk) is where Model
Runner V1 fills the token->slot map for this step. A new architecture is one
more three-line class here plus its entry in
:data:`sae_steer_vllm.STEERED_ARCHITECTURES` (whose names these classes carry:
``register`` points vLLM at ``sae_steer_vllm.steered_model:<name>``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM
from vllm.model_executor.models.utils import PPMissingLayer

from .batch_tracker import fill_token_slots
from .errors import SaeSteerError
from .slot_tables import steering_delta, token_phase
from .think_phase import update_phase
from .worker_steering import WorkerSteering, get_worker_steering


def _steering_hook(
    module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, residual = output
    positions = args[0] if args else kwargs["positions"]
    if positions.dim() > 1:  # M-RoPE passes [3, n]; the first row is the text position
        positions = positions[0]
    n = residual.shape[0]
    capture = getattr(module, "sae_steer_capture", None)
    if capture is not None:  # readout: what the SAE sees, before this layer's intervention
        capture(hidden + residual, positions)
    idx = module.sae_steer_tok_slot[:n]
    phase = token_phase(
        positions,
        idx,
        module.sae_steer_slot_prompt_len,
        module.sae_steer_slot_think_start,
        module.sae_steer_slot_think_end,
    )
    delta = steering_delta(
        module.sae_steer_tables, idx, phase, module.sae_steer_slot_mode, hidden, residual
    )
    return hidden, residual + delta


def _install(model: nn.Module, vllm_config: Any) -> None:
    ws = get_worker_steering(vllm_config)
    shared = ws.shared_buffers()
    dtype = vllm_config.model_config.dtype
    inner: Any = model.model
    layers: Any = inner.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, PPMissingLayer):
            continue
        tables = ws.build_layer_tables(i, dtype)
        if tables is None:
            continue
        layer.sae_steer_tables = tables  # registers the buffers as a submodule
        capture = ws.build_capture(i, dtype)
        if capture is not None:
            layer.sae_steer_capture = capture
        for name, buf in shared._asdict().items():
            layer.register_buffer("sae_steer_" + name, buf, persistent=False)
        layer.register_forward_hook(_steering_hook, with_kwargs=True)
    if ws.readout is not None:
        ws.readout.preload()


class SteeringMixin(nn.Module):
    """Adds per-request steering to a vLLM ``*ForCausalLM`` (put it first in the bases)."""

    _sae_steer_v1: WorkerSteering | None
    _sae_steer_ws: WorkerSteering

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _install(self, vllm_config)
        ws = get_worker_steering(vllm_config)
        self._sae_steer_ws = ws
        self._sae_steer_v1 = None if ws.use_v2 else ws  # V1 fills the token map here

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if self._sae_steer_v1 is not None:
            fill_token_slots(self._sae_steer_v1, int(positions.shape[-1]))
        elif self._sae_steer_ws.v2 is None:  # V2 builds its state at load, before any forward
            raise SaeSteerError(
                "sae-steer: Model Runner V2 did not build sae-steer's model state, so "
                "steering cannot attach; start vLLM with VLLM_USE_V2_MODEL_RUNNER=0 and "
                "report the vLLM version"
            )
        ws = self._sae_steer_ws
        if ws.phase_ids is not None and input_ids is not None:
            pos = positions[0] if positions.dim() > 1 else positions
            st = ws.shared_buffers()
            update_phase(
                input_ids,
                pos,
                st.tok_slot[: pos.shape[0]],
                st.slot_prompt_len,
                st.slot_think_start,
                st.slot_think_end,
                *ws.phase_ids,
            )
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> Any:
        """vLLM's, then this step's readout is shipped: both runners call this eagerly after
        every forward, outside compiled and CUDA graphs (repeat calls in a step no-op)."""
        logits = super().compute_logits(hidden_states)  # type: ignore[misc]
        if self._sae_steer_ws.readout is not None:
            self._sae_steer_ws.readout.ship()
        return logits

    def get_model_state_cls(self) -> type:
        """Model Runner V2 asks the model for its state class (unused under V1)."""
        from .model_state_v2 import SteeringModelState

        return SteeringModelState


class SteeredLlamaForCausalLM(SteeringMixin, LlamaForCausalLM):
    """LlamaForCausalLM with per-request SAE steering after its decoder layers."""


class SteeredQwen2ForCausalLM(SteeringMixin, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with per-request SAE steering after its decoder layers."""


class SteeredQwen3ForCausalLM(SteeringMixin, Qwen3ForCausalLM):
    """Qwen3ForCausalLM with per-request SAE steering after its decoder layers."""


class SteeredMistralForCausalLM(SteeringMixin, MistralForCausalLM):
    """MistralForCausalLM with per-request SAE steering after its decoder layers."""
