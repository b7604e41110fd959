"""sae-steer's vLLM plugin: per-request SAE-feature steering inside the residual stream.

Public API (imported lazily, so ``import sae_steer_vllm`` stays light and never
imports torch or vLLM):

* the request side: :class:`SteeringSpec`, :class:`FeatureIntervention`,
  :class:`VectorIntervention`, :func:`steering_extra_body`;
* SAE files: :func:`load_sae`, :class:`SAE`, :class:`SAEConfig`;
* :class:`SaeSteerError`, the base of every error sae-steer reports;
* :func:`register`, the ``vllm.general_plugins`` entry point.

Hand-launch paths (public too): ``--logits-processors
sae_steer_vllm.batch_tracker:SteeringBatchTracker``, ``--middleware
sae_steer_vllm.middleware.SteeringMiddleware``, ``--middleware
sae_steer_vllm.sae_routes.SAERoutes``, ``--worker-extension-cls
sae_steer_vllm.worker_extension.SAESteerWorkerExtension`` (runtime SAE updates), and the model classes
``sae_steer_vllm.steered_model:Steered<Arch>ForCausalLM``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

if TYPE_CHECKING:
    from .errors import SaeSteerError
    from .sae import SAE, SAEConfig, load_sae
    from .spec import (
        FeatureIntervention,
        SteeringSpec,
        VectorIntervention,
        steering_extra_body,
    )

STEERED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "SteeredLlamaForCausalLM",
    "Qwen2ForCausalLM": "SteeredQwen2ForCausalLM",
    "Qwen3ForCausalLM": "SteeredQwen3ForCausalLM",
    "MistralForCausalLM": "SteeredMistralForCausalLM",
}
"""Base architecture -> steered class in :mod:`sae_steer_vllm.steered_model`."""

_LAZY: dict[str, str] = {
    "SteeringSpec": "spec",
    "FeatureIntervention": "spec",
    "VectorIntervention": "spec",
    "steering_extra_body": "spec",
    "load_sae": "sae",
    "SAE": "sae",
    "SAEConfig": "sae",
    "SaeSteerError": "errors",
}

__all__ = [
    "SAE",
    "STEERED_ARCHITECTURES",
    "FeatureIntervention",
    "SAEConfig",
    "SaeSteerError",
    "SteeringSpec",
    "VectorIntervention",
    "load_sae",
    "register",
    "steering_extra_body",
]


__getattr__, __dir__ = lazy_exports(__name__, {n: f".{m}" for n, m in _LAZY.items()})


def register() -> None:
    """Called by vLLM once in every process (API server, EngineCore, each worker).

    Registers only *lazy* ``"module:Class"`` references, so no torch or model
    import happens here.
    """
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for steered in STEERED_ARCHITECTURES.values():
        if steered not in supported:
            ModelRegistry.register_model(steered, f"sae_steer_vllm.steered_model:{steered}")
