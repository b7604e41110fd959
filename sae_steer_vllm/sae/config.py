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
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(f"unknown SAE architecture {self.architecture!r}")
        if self.architecture == "topk" and (self.k is None or self.k <= 0):
            raise SAEFormatError("a topk SAE needs a positive k")
        if self.d_in <= 0 or self.d_sae <= 0 or self.hook_layer < 0:
            raise SAEFormatError(
                f"bad sizes d_in={self.d_in} d_sae={self.d_sae} layer={self.hook_layer}"
            )

    def to_saelens_dict(self) -> dict[str, Any]:
        """SAELens v6 cfg.json (``normalize_activations`` is always folded in)."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name or resid_post_hook_name(self.hook_layer),
                "hook_layer": self.hook_layer,
                "hook_head_index": None,
                "context_size": self.context_size,
                "prepend_bos": True,
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
