"""What a consumer needs to know about an SAE, whatever layout its folder has.

:class:`SAEConfig` is the canonical description every loader produces (see
:mod:`sae_steer_vllm.sae.loaders`) and the one this project writes: SAELens v6
``cfg.json``, so SAELens itself can load what we train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import SaeSteerError

Architecture = Literal["standard", "topk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu")

Normalization = Literal["none", "expected_average_only_in", "constant_norm_rescale", "layer_norm"]
"""SAELens's ``normalize_activations`` modes, with SAELens's inference semantics:

* ``none`` and ``expected_average_only_in``: the identity. SAELens's trainer folds the
  dataset scaling factor into the weights before its final save (5.x kept the mode name
  in ``cfg.json``; 6.x writes ``none``), and ``SAE.load_from_disk`` applies nothing for
  this mode, so neither do we. An unfolded checkpoint needs its factor passed explicitly
  (:meth:`~sae_steer_vllm.sae.model.SAE.fold_norm_scaling_factor`).
* ``constant_norm_rescale``: per token, ``x * sqrt(d_in) / ||x||`` in, divided back out.
* ``layer_norm``: per token, ``(x - mean) / (std + 1e-5)`` in (unbiased std), ``y * std +
  mean`` out. These two depend on the input, so they cannot be folded into weights.
"""
NORMALIZATIONS: tuple[str, ...] = (
    "none",
    "expected_average_only_in",
    "constant_norm_rescale",
    "layer_norm",
)
INPUT_DEPENDENT_NORMALIZATIONS: tuple[str, ...] = ("constant_norm_rescale", "layer_norm")


class SAEFormatError(SaeSteerError, ValueError):
    """A file on disk is not an SAE we can load; the message names file and problem."""


@dataclass(frozen=True)
class SAEConfig:
    """Sizes, hook layer and activation rule of an SAE, independent of the file layout."""

    d_in: int
    d_sae: int
    architecture: Architecture
    hook_layer: int
    hook_name: str = ""
    model_name: str = ""
    k: int | None = None
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    context_size: int | None = None
    normalize_activations: Normalization = "none"
    """SAELens's input normalisation (see :data:`Normalization`)."""
    prepend_bos: bool = True
    """Whether the training rows began with BOS (SAELens metadata; the release says false)."""
    unfolded_norm_scaling_factor: float | None = None
    """A dataset scaling factor the folder holds but the weights do not (a SAELens 6.x
    mid-training checkpoint's ``activation_scaler.json``). SAELens's ``load_from_disk``
    ignores it; we refuse to guess: pass it to ``load_sae(..., norm_scaling_factor=)``."""
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(f"unknown SAE architecture {self.architecture!r}")
        if self.architecture == "topk" and (self.k is None or self.k <= 0):
            raise SAEFormatError("a topk SAE needs a positive k")
        if self.normalize_activations not in NORMALIZATIONS:
            raise SAEFormatError(
                f"unknown normalize_activations {self.normalize_activations!r} "
                f"(supported: {NORMALIZATIONS})"
            )
        if self.d_in <= 0 or self.d_sae <= 0 or self.hook_layer < 0:
            raise SAEFormatError(
                f"bad sizes d_in={self.d_in} d_sae={self.d_sae} layer={self.hook_layer}"
            )

    @property
    def input_dependent_norm(self) -> bool:
        """True when encode/decode rescale each token by its own statistics."""
        return self.normalize_activations in INPUT_DEPENDENT_NORMALIZATIONS

    def serving_refusal(self) -> str | None:
        """Why the server cannot steer with this SAE as its files stand, or None.

        Per-token normalisation is refused, not approximated: the in-graph clamp
        (``slot_tables.py``) encodes with one dot product per feature and adds a fixed
        decoder row, while these modes rescale each token by its own norm / mean / std on
        the way in and out. Encode/decode (``load_sae``) support them.
        """
        if self.input_dependent_norm:
            return (
                f"normalize_activations={self.normalize_activations!r} rescales each token by "
                "its own statistics, which the server's steering op does not apply; "
                "encode/decode (sae_steer_vllm.load_sae) support it, serving does not"
            )
        if self.unfolded_norm_scaling_factor is not None:
            return self.unfolded_message()
        return None

    def unfolded_message(self) -> str:
        return (
            f"this is an unfolded expected_average_only_in checkpoint (scaling factor "
            f"{self.unfolded_norm_scaling_factor} beside it, not in the weights; SAELens's "
            "load_from_disk would ignore it): fold it once with "
            f"load_sae(folder, norm_scaling_factor={self.unfolded_norm_scaling_factor})"
            ".save(new_folder) and use new_folder"
        )

    def to_saelens_dict(self) -> dict[str, Any]:
        """SAELens v6 cfg.json that SAELens loads with the same encode/decode as ours."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": self.normalize_activations,
            "reshape_activations": "none",
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name or resid_post_hook_name(self.hook_layer),
                # SAELens's hook_layer is the block its hook sits in (blocks.N.hook_resid_pre
                # is N there, our resid_post layer N - 1)
                "hook_layer": layer_from_text(self.hook_name)
                if self.hook_name and layer_from_text(self.hook_name) is not None
                else self.hook_layer,
                "hook_head_index": None,
                "context_size": self.context_size,
                "prepend_bos": self.prepend_bos,
                "model_class_name": "HookedTransformer",
                "sae_lens_training_version": None,
                # SAELens treats a config without a version as pre-6.0 and then
                # ignores this metadata block (hook name, model) on load.
                "sae_lens_version": "6.0.0",
                **self.extra_metadata,
            },
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        return cfg


def resid_post_hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


_HOOK_LAYER_RE = re.compile(r"(?:blocks|layers)\.(\d+)")


def layer_from_text(text: str) -> int | None:
    """The layer number in a hook or folder name (``blocks.7.hook_resid_post``, ``layers.12``)."""
    m = _HOOK_LAYER_RE.search(text)
    return int(m.group(1)) if m else None


_RESID_POST_RE = re.compile(r"^(?:blocks\.(\d+)\.hook_resid_post|(?:model\.)?layers\.(\d+))$")
_RESID_PRE_RE = re.compile(r"^blocks\.(\d+)\.hook_resid_pre$")


def resid_post_layer(hook_name: str) -> int:
    """The decoder layer whose output (resid_post) a hook name reads; the server steers there.

    Accepted forms: ``blocks.N.hook_resid_post`` (TransformerLens), ``layers.N`` and
    ``model.layers.N`` (a Hugging Face decoder layer's output, as SAELens's
    ``AutoModelForCausalLM`` runs name it), and ``blocks.N.hook_resid_pre``, which
    TransformerLens defines as block N-1's output (N >= 1). Anything else (MLP or
    attention outputs, ``hook_z``, resid_mid, the embeddings) is a different tensor.
    """
    if m := _RESID_POST_RE.match(hook_name):
        return int(m.group(1) or m.group(2))
    if (m := _RESID_PRE_RE.match(hook_name)) and int(m.group(1)) >= 1:
        return int(m.group(1)) - 1
    raise SAEFormatError(
        f"hook {hook_name!r} is not the residual stream after a decoder layer (accepted: "
        "blocks.N.hook_resid_post, blocks.N.hook_resid_pre with N >= 1, layers.N, "
        "model.layers.N)"
    )
