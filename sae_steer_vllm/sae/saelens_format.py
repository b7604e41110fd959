"""SAELens ``cfg.json`` -> :class:`SAEConfig`, with SAELens's own reading of every field.

The standard is SAELens itself (``SAE.load_from_disk``: ``handle_config_defaulting``
then the architecture's config class): a file means here exactly what it means
there, or it is refused with a message that says why. What SAELens does, and so
what this module does:

* **Generations.** A config whose ``sae_lens_version`` (top level or under
  ``metadata``) is below 6.0 is the old flat layout: ``hook_point`` is
  ``hook_name``, ``activation_fn_str`` is ``activation_fn``, ``activation_fn:
  topk`` with ``activation_fn_kwargs.k`` makes a TopK SAE, a boolean
  ``normalize_activations`` means ``expected_average_only_in`` when true,
  ``apply_b_dec_to_input`` defaults to true. A 6.x config keeps the architecture's
  fields at the top and the hook and model under ``metadata``.
* **Architectures.** ``standard`` (ReLU), ``topk`` (``k`` defaults to 100 in
  SAELens's ``TopKSAEConfig``), ``jumprelu`` (``threshold`` tensor) and ``gated``
  (``b_gate``, ``b_mag``, ``r_mag``: loaded as the exactly equivalent JumpReLU, see
  :class:`~sae_steer_vllm.sae.loaders.StoredNames`). ``batchtopk`` with a stored
  threshold is read as the JumpReLU SAELens saves it as (SAELens itself has no
  inference class of that name). Others (transcoders, ``abstopk``, ``temporal``,
  ``matching_pursuit``) are refused.
* **normalize_activations.** See :data:`~sae_steer_vllm.sae.config.Normalization`.
  ``covariance_whitening`` is refused: SAELens folds it before a final save, so a
  file that still says it is a mid-training checkpoint whose whitening matrices
  are not in the weights (SAELens's ``load_from_disk`` would silently ignore them).
* **Unfolded checkpoints.** A 6.x checkpoint saved mid-training keeps its factor in
  ``activation_scaler.json``; SAELens's ``load_from_disk`` ignores it, we refuse to
  encode or serve until the factor is passed explicitly (``SAEConfig.unfolded_message``).
* **Hooks.** :func:`~sae_steer_vllm.sae.config.resid_post_layer`; ``hook_z``
  reshaping and heads are refused (not a residual-stream SAE).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..constants import SAELENS_SCALER
from .config import ARCHITECTURES, SAEConfig, SAEFormatError, resid_post_layer
from .tensor_file import Shapes

TOPK_DEFAULT_K = 100
"""SAELens ``TopKSAEConfig.k`` default, used when a topk config names no k."""
GATED_TENSORS = ("b_gate", "b_mag", "r_mag")


def saelens_major_version(raw: dict[str, Any]) -> int | None:
    """Major ``sae_lens_version`` of a cfg.json (top level, else under ``metadata``)."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("sae_lens_version") or (meta or {}).get("sae_lens_version")
    if not version:
        return None
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        return None


def _flat_to_v6(raw: dict[str, Any]) -> dict[str, Any]:
    """SAELens's ``handle_pre_6_0_config``: one flat dict, fields and metadata alike."""
    renames = {
        "hook_point": "hook_name",
        "hook_point_head_index": "hook_head_index",
        "activation_fn_str": "activation_fn",
    }
    cfg = {renames.get(k, k): v for k, v in raw.items()}
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("prepend_bos", True)
    kwargs = cfg.get("activation_fn_kwargs") or {}
    if cfg.get("activation_fn") == "topk" and isinstance(kwargs, dict) and kwargs.get("k"):
        cfg["architecture"] = "topk"
        cfg["k"] = kwargs["k"]
    norm = cfg.get("normalize_activations")
    if isinstance(norm, bool):
        cfg["normalize_activations"] = "expected_average_only_in" if norm else "none"
    elif norm is None:
        cfg["normalize_activations"] = "none"
    return cfg


def saelens_config(raw: dict[str, Any], folder: Path, shapes: Shapes) -> SAEConfig:
    """Parse a SAELens ``cfg.json`` (6.x nested or pre-6.0 flat) as SAELens reads it."""
    major = saelens_major_version(raw)
    if major is not None and major >= 6:
        top = raw
        meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        assert isinstance(meta, dict)
    else:
        top = flat = _flat_to_v6(raw)
        nested = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
        meta = {**(nested or {}), **flat}
    if "W_dec" not in shapes:
        raise SAEFormatError("weights file has no W_dec tensor")
    d_sae, d_in = shapes["W_dec"]
    arch = str(top.get("architecture", "standard"))
    if arch == "batchtopk":
        # SAELens saves BatchTopK for inference as JumpReLU with a threshold
        if "threshold" not in shapes and "log_threshold" not in shapes:
            raise SAEFormatError("batchtopk SAE without a threshold tensor cannot run at inference")
        arch = "jumprelu"
    if arch == "gated":
        missing = [n for n in GATED_TENSORS if n not in shapes]
        if missing:
            raise SAEFormatError(f"gated SAE without tensor(s) {missing}")
        arch = "jumprelu"  # exactly equivalent; the loader derives threshold and scales
    if arch not in ARCHITECTURES:
        raise SAEFormatError(
            f"unsupported architecture {arch!r} (supported: {(*ARCHITECTURES, 'gated')})"
        )
    k = top.get("k")
    if arch == "topk":
        k = TOPK_DEFAULT_K if k is None else k
        if top.get("rescale_acts_by_decoder_norm"):
            raise SAEFormatError(
                "rescale_acts_by_decoder_norm: true is not supported; fold it first "
                "(SAELens: sae.fold_W_dec_norm(), then save)"
            )
    norm = top.get("normalize_activations", "none") or "none"
    if norm == "covariance_whitening":
        raise SAEFormatError(
            "normalize_activations='covariance_whitening': SAELens folds the whitening into "
            "the weights before its final save, so this is a mid-training checkpoint whose "
            "whitening matrices are not in the weights; fold them first (SAELens: "
            "sae.fold_activation_whitening(...), then save)"
        )
    unfolded = _checkpoint_scaling_factor(folder) if norm == "expected_average_only_in" else None
    if top.get("reshape_activations", "none") not in (None, "none") or meta.get(
        "hook_head_index"
    ) not in (None, 0):
        raise SAEFormatError("hook_z / per-head SAEs do not read the residual stream")
    # hf_hook_name: SAELens's name for a Hugging Face module hook (model.layers.N)
    hook_name = str(meta.get("hook_name") or top.get("hook_name") or meta.get("hf_hook_name") or "")
    if hook_name:
        layer = resid_post_layer(hook_name)
    else:
        hook_layer = meta.get("hook_layer", top.get("hook_layer"))
        if hook_layer is None:
            raise SAEFormatError("no hook_layer and no layer number in hook_name")
        layer = int(hook_layer)
    ctx = meta.get("context_size")
    return SAEConfig(
        d_in=int(top.get("d_in", d_in)),
        d_sae=int(top.get("d_sae", d_sae)),
        architecture=arch,  # type: ignore[arg-type]
        hook_layer=layer,
        hook_name=hook_name,
        model_name=str(meta.get("model_name") or ""),
        k=None if k is None else int(k),
        apply_b_dec_to_input=bool(top.get("apply_b_dec_to_input", True)),
        dtype=str(top.get("dtype", "float32")),
        context_size=None if ctx is None else int(ctx),
        normalize_activations=norm,  # type: ignore[arg-type]  # SAEConfig checks it
        prepend_bos=bool(meta.get("prepend_bos", True)),
        unfolded_norm_scaling_factor=unfolded,
    )


def _checkpoint_scaling_factor(folder: Path) -> float | None:
    """The factor a SAELens 6.x checkpoint's ``activation_scaler.json`` holds, if any.

    SAELens writes ``{"scaling_factor": null}`` after folding (final save) and the
    number while training (checkpoints, weights not folded).
    """
    path = folder / SAELENS_SCALER
    if not path.is_file():
        return None
    try:
        factor = json.loads(path.read_text()).get("scaling_factor")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        raise SAEFormatError(f"{path}: not a SAELens activation scaler ({e})") from None
    if factor is None:
        return None
    if not isinstance(factor, int | float) or not factor > 0:
        raise SAEFormatError(f"{path}: scaling_factor {factor!r} is not a positive number")
    return float(factor)
