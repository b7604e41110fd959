"""Pickled SAE checkpoints (``.pt`` / ``.pth``) -> the canonical SAE, for ``sae-steer convert``.

The server never unpickles (a pickle can run code); this module is only ever called by the
``convert`` command, once, on a file the user chose, and even then reads it with
``torch.load(weights_only=True)``: tensors and plain containers only, anything else refused.
The result is saved in the SAELens safetensors layout, which the server loads.

Each project's file is recognised by its exact key set (its module's ``state_dict``), and
its encode rule is written beside it with the source it was taken from:

* ``dictionary_learning`` (saprmarks/dictionary_learning, ``dictionary.py`` and
  ``trainers/top_k.py``, ``trainers/batch_top_k.py``): ``AutoEncoder`` (``encoder.weight``,
  ``encoder.bias``, ``decoder.weight``, ``bias``): ``relu(encoder(x - bias))``,
  ``decoder(f) + bias``; ``AutoEncoderTopK`` / ``BatchTopKSAE`` (``encoder.*``,
  ``decoder.weight``, ``b_dec``, ``k``, ``threshold``): the same pre-activations, then top-k
  (TopK) or ``> threshold`` (BatchTopK at inference); ``JumpReluAutoEncoder`` (``W_enc``,
  ``b_enc``, ``W_dec``, ``b_dec``, ``threshold``; ``apply_b_dec_to_input`` false).
  ``GatedAutoEncoder`` is refused (no gated canonical SAE).
* Goodfire (``Llama-3.1-8B-Instruct-SAE-l19.pth``, ``Llama-3.3-70B-Instruct-SAE-l50.pt``;
  their model card's ``SparseAutoEncoder``): ``encoder_linear`` / ``decoder_linear``
  ``nn.Linear`` pairs, ``relu(encoder_linear(x))``, ``decoder_linear(f)``.
* qresearch (``DeepSeek-R1-Distill-Llama-8B-SAE-l19.pt``; SAELens's ``deepseek_r1``
  converter): ``encoder.weight``/``encoder.bias``/``decoder.weight``/``decoder.bias``,
  ``relu(encoder(x))``, ``decoder(f)`` (no decoder bias subtracted from the input).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import SAEConfig, SAEFormatError, layer_from_text, resid_post_hook_name
from .model import SAE

PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
DICT_CLASSES = ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE", "JumpReluAutoEncoder")

_KEYS: dict[str, frozenset[str]] = {
    "goodfire": frozenset(
        {
            "encoder_linear.weight",
            "encoder_linear.bias",
            "decoder_linear.weight",
            "decoder_linear.bias",
        }
    ),
    "qresearch": frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}),
    "dictionary_learning AutoEncoder": frozenset(
        {"encoder.weight", "encoder.bias", "decoder.weight", "bias"}
    ),
    "dictionary_learning TopK/BatchTopK": frozenset(
        {"encoder.weight", "encoder.bias", "decoder.weight", "b_dec", "k", "threshold"}
    ),
    "dictionary_learning JumpReluAutoEncoder": frozenset(
        {"W_enc", "b_enc", "W_dec", "b_dec", "threshold"}
    ),
}
_GATED = frozenset(
    {"encoder.weight", "decoder.weight", "decoder_bias", "r_mag", "gate_bias", "mag_bias"}
)


@dataclass(frozen=True)
class PickleHints:
    """What the user knows that a pickle does not hold."""

    layer: int | None = None
    hook_name: str | None = None
    model_name: str = ""
    dict_class: str | None = None
    """dictionary_learning class, when no ``config.json`` beside the file names it."""


def read_pickled_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a pickle, loaded with ``weights_only=True``.

    A pickle holding any object other than tensors and plain containers is refused by torch
    itself (nothing of it runs); one that loads but is not a flat dict of tensors is refused
    here, naming the offending keys.
    """
    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SAEFormatError(
            f"{path}: refused: not a tensors-only pickle (torch.load(weights_only=True): {first})"
        ) from None
    if not isinstance(obj, dict):
        raise SAEFormatError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = {str(k): type(v).__name__ for k, v in obj.items() if not isinstance(v, torch.Tensor)}
    if bad or not all(isinstance(k, str) for k in obj):
        raise SAEFormatError(f"{path}: refused: entries that are not tensors: {bad}")
    return dict(obj)


def _sibling_trainer(path: Path) -> dict[str, Any]:
    """dictionary_learning writes ``config.json`` with a ``trainer`` block beside ``ae.pt``."""
    cfg = path.parent / "config.json"
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    trainer = raw.get("trainer") if isinstance(raw, dict) else None
    return trainer if isinstance(trainer, dict) else {}


def _linear_pair(t: dict[str, torch.Tensor], enc: str, dec: str) -> dict[str, torch.Tensor]:
    """``nn.Linear`` encoder ``[d_sae, d_in]`` and decoder ``[d_in, d_sae]`` -> canonical."""
    return {
        "W_enc": t[f"{enc}.weight"].T,
        "b_enc": t[f"{enc}.bias"],
        "W_dec": t[f"{dec}.weight"].T,
        "b_dec": t[f"{dec}.bias"],
    }


def _identify(keys: frozenset[str], path: Path) -> str:
    for name, wanted in _KEYS.items():
        if keys == wanted:
            return name
    if keys == _GATED:
        raise SAEFormatError(
            f"{path}: a dictionary_learning GatedAutoEncoder: gated SAEs are not supported"
        )
    near = min(_KEYS.items(), key=lambda kv: len(kv[1] ^ keys))
    raise SAEFormatError(
        f"{path}: keys {sorted(keys)} match no known pickled SAE layout; nearest is "
        f"{near[0]} (missing {sorted(near[1] - keys)}, unexpected {sorted(keys - near[1])})"
    )


def sae_from_pickle(path: str | Path, hints: PickleHints) -> tuple[SAE, str]:
    """The canonical SAE of a pickled checkpoint, and the name of the layout recognised."""
    path = Path(path)
    t = read_pickled_tensors(path)
    kind = _identify(frozenset(t), path)
    trainer = _sibling_trainer(path)
    arch, k, apply_b_dec, threshold = "standard", None, False, None
    if kind == "goodfire":
        canon = _linear_pair(t, "encoder_linear", "decoder_linear")
    elif kind == "qresearch":
        canon = _linear_pair(t, "encoder", "decoder")
    elif kind == "dictionary_learning JumpReluAutoEncoder":
        canon = {n: t[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")}
        arch, threshold = "jumprelu", t["threshold"]
        apply_b_dec = bool(trainer.get("apply_b_dec_to_input", False))
    else:
        b_dec = t["bias"] if kind == "dictionary_learning AutoEncoder" else t["b_dec"]
        canon = {
            "W_enc": t["encoder.weight"].T,
            "b_enc": t["encoder.bias"],
            "W_dec": t["decoder.weight"].T,
            "b_dec": b_dec,
        }
        apply_b_dec = True
        if kind != "dictionary_learning AutoEncoder":
            dict_class = hints.dict_class or trainer.get("dict_class")
            if dict_class == "AutoEncoderTopK":
                arch, k = "topk", int(t["k"].item())
            elif dict_class == "BatchTopKSAE":
                learned = float(t["threshold"].item())
                if learned < 0:
                    raise SAEFormatError(
                        f"{path}: BatchTopK threshold is {learned} (never learned), so it cannot "
                        "run per token; convert a checkpoint saved after threshold_start_step"
                    )
                arch, threshold = "jumprelu", torch.full((canon["b_enc"].shape[0],), learned)
            else:
                raise SAEFormatError(
                    f"{path}: a dictionary_learning TopK-family file, but is it AutoEncoderTopK "
                    "or BatchTopKSAE (same tensors, different inference rule)? No config.json "
                    "beside it says; pass --dict-class"
                )
    d_sae, d_in = canon["W_dec"].shape
    if tuple(canon["W_enc"].shape) != (d_in, d_sae):
        raise SAEFormatError(
            f"{path}: encoder {tuple(canon['W_enc'].shape)} and decoder "
            f"{tuple(canon['W_dec'].shape)} disagree on d_in/d_sae"
        )
    layer = hints.layer
    if layer is None and hints.hook_name:
        layer = layer_from_text(hints.hook_name)
    if layer is None and isinstance(trainer.get("layer"), int):
        layer = trainer["layer"]
    if layer is None:
        raise SAEFormatError(f"{path}: the file does not say which layer it reads; pass --layer")
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture=arch,  # type: ignore[arg-type]
        hook_layer=int(layer),
        hook_name=hints.hook_name or resid_post_hook_name(int(layer)),
        model_name=hints.model_name or str(trainer.get("lm_name", "")),
        k=k,
        apply_b_dec_to_input=apply_b_dec,
        extra_metadata={"converted_from": f"{kind} ({path.name})"},
    )
    tensors = {n: v.detach().float().contiguous() for n, v in canon.items()}
    thr = None if threshold is None else threshold.detach().float().reshape(-1)
    try:
        sae = SAE(cfg, tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"], thr)
    except SAEFormatError as e:
        raise SAEFormatError(f"{path}: {e}") from None
    return sae, kind
