"""The language model side: load an HF causal LM, find its decoder layers, read resid_post.

``resid_post`` at layer L is the output of decoder layer L (``hidden_states[L + 1]`` in
transformers' numbering, SAELens ``blocks.L.hook_resid_post``), the same point the vLLM
plugin steers. :class:`ResidReader` is the one reader of it, used by activation
collection, training evaluation, feature statistics, the token-dependence check and the
dashboards alike: forward hooks store the requested layers' outputs and the deepest one
raises a private exception, so the layers above it and the LM head never run (for layer
18 of 30 that saves ~40% of the forward). ``output_hidden_states`` has no such switch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from sae_training.errors import ModelLoadError

#: Where transformers keeps the decoder blocks, by family: Llama/Mistral/Qwen
#: (``model.layers``), a bare decoder (``layers``), multimodal wrappers
#: (``model.model.layers``), GPT-2 (``transformer.h``), GPT-NeoX (``gpt_neox.layers``),
#: OPT (``model.decoder.layers``).
DECODER_LAYER_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.model.layers",
    "layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The list of decoder blocks of a transformers causal LM (see :data:`DECODER_LAYER_PATHS`)."""
    for path in DECODER_LAYER_PATHS:
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise ModelLoadError(f"cannot find the decoder layers of {type(model).__name__}")


def model_or_default(path: str | Path | None) -> Path:
    """``path``, or the default model's folder (converted on first use) when it is None."""
    if path is not None:
        return Path(path)
    from sae_steer_vllm.default_model import prepare_default_model

    return prepare_default_model()


def hidden_size(path: str | Path) -> int | None:
    """``hidden_size`` from an HF folder's ``config.json`` (None if absent or unreadable)."""
    import json

    try:
        return int(json.loads((Path(path) / "config.json").read_text())["hidden_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def load_model(
    path: str | Path, device: str | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from an HF folder (weights only, no hub access), model in eval mode.

    Defaults: the first GPU when there is one, else CPU; bfloat16 on a GPU, float32 on
    CPU. The reader returns float32 either way.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if not (p / "config.json").is_file():
        raise ModelLoadError(f"{p}: not a Hugging Face model folder (no config.json)")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(str(p))
        model: Any = AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    except Exception as e:  # transformers raises many types for broken folders
        raise ModelLoadError(f"{p}: cannot load model ({type(e).__name__}: {e})") from None
    model = model.to(torch.device(device)).eval()
    return model, tok


class _StopForward(Exception):
    pass


class ResidReader:
    """Callable: token ids ``[B, T]`` -> ``{layer: resid_post [B, T, d_model]}`` (float32).

    The result lies on the model's device; collection moves it to the CPU itself.
    ``layers`` is one layer index or several; the forward stops after the deepest.
    """

    def __init__(self, model: Any, layers: int | Sequence[int]) -> None:
        self.layers = [layers] if isinstance(layers, int) else list(layers)
        blocks = decoder_layers(model)
        n = len(blocks)
        if not self.layers:
            raise ModelLoadError("no layer requested")
        for layer in self.layers:
            if not 0 <= layer < n:
                raise ModelLoadError(
                    f"layer {layer} out of range: the model has {n} decoder layers (0..{n - 1})"
                )
        self.model = model
        self._blocks = blocks
        self._last = max(self.layers)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}

        def make_hook(layer: int) -> Callable[..., None]:
            def hook(_mod: torch.nn.Module, _inp: Any, output: Any) -> None:
                h = output if torch.is_tensor(output) else output[0]
                out[layer] = h.detach().float()
                if layer == self._last:
                    raise _StopForward

            return hook

        handles = [self._blocks[ly].register_forward_hook(make_hook(ly)) for ly in set(self.layers)]
        try:
            # the full model, not its ``.model`` base: forward(input_ids) is the one entry
            # every causal LM has, and the hook stops it before the LM head anyway
            self.model(input_ids=input_ids.to(model_device(self.model)), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [ly for ly in self.layers if ly not in out]
        if missing:
            raise ModelLoadError(f"layer(s) {missing} never ran during the forward pass")
        return out

    def read_one(self, input_ids: torch.Tensor) -> torch.Tensor:
        """resid_post ``[B, T, d_model]`` of a single-layer reader."""
        if len(self.layers) != 1:
            raise ModelLoadError(
                f"read_one needs a single-layer reader, this one reads {self.layers}"
            )
        return self(input_ids)[self.layers[0]]
