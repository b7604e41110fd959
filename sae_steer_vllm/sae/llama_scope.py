"""Llama Scope / lm-saes folders (OpenMOSS ``fnlp/Llama-Scope-R1-Distill``) as a canonical SAE.

Provenance. The layout is what OpenMOSS's ``lm-saes`` (github.com/OpenMOSS/Language-Model-SAEs,
``src/lm_saes/sae.py``, ``abstract_sae.py``, ``config.py`` at commit 03f1b5ed, June 2025, the
last with these ``nn.Linear`` names; later versions call them ``W_E``/``W_D``) writes with
``save_pretrained``: ``config.json`` (its ``SAEConfig``: ``d_model``, ``expansion_factor``,
``hook_point_in``/``hook_point_out``, ``act_fn``, ``norm_activation``,
``sparsity_include_decoder_norm``, ``apply_decoder_bias_to_pre_encoder``, ...) beside
``sae_weights.safetensors`` holding ``nn.Linear`` weights: ``encoder.weight [d_sae, d_model]``,
``encoder.bias [d_sae]``, ``decoder.weight [d_model, d_sae]``, ``decoder.bias [d_model]``,
``log_jumprelu_threshold [d_sae]`` and one scalar ``dataset_average_activation_norm.<hook>``
per hook point (``full_state_dict``). SAELens's own ``llama_scope_r1_distill`` converter reads
the same tensor names but does not read the stored norm (it records
``normalize_activations: expected_average_only_in``) nor ``sparsity_include_decoder_norm``;
we follow the code that trained the SAE instead.

Semantics, from lm-saes's ``SparseAutoEncoder.encode`` and ``compute_norm_factor``. With
``norm_activation: dataset-wise`` the caller scales the input by ``s = sqrt(d_model) / norm``
(``norm`` the stored dataset average norm of the hook) and unscales the reconstruction::

    h      = (s·x [- b_D]) @ encoder.weight.T + b_E
    mask   = h · ‖decoder.weight[:, i]‖ > exp(log_jumprelu_threshold)   (decoder norm only
             when sparsity_include_decoder_norm)
    f      = h · mask
    x_hat  = (f @ decoder.weight.T + b_D) / s

Folded here into the canonical JumpReLU with feature activations on the scale of the raw
residual, as lm-saes's own ``inference`` mode reports them (``f / s``, its
``standardize_parameters_of_dataset_norm``): ``W_enc = encoder.weight.T``,
``b_enc = b_E / s``, ``W_dec = decoder.weight.T``, ``b_dec = b_D / s`` and
``threshold = θ / (s · ‖decoder column‖)``. Unlike lm-saes's fold (which leaves the JumpReLU
threshold unscaled and so changes which features fire) this one gives exactly the mask and
reconstruction of the ``dataset-wise`` computation above. The matrices are not rescaled
(a same-hook SAE has one ``s`` in and out), so single-feature rows are read from the file
as stored; only the small vectors are computed (:func:`llama_scope_vectors`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..constants import LM_SAES_CFG
from .config import SAEConfig, SAEFormatError, layer_from_text
from .tensor_file import Shapes, opened

ENC_W, ENC_B, DEC_W, DEC_B = "encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"
LOG_THRESHOLD = "log_jumprelu_threshold"
NORM_PREFIX = "dataset_average_activation_norm."
_DECODER_CHUNK = 4096
"""Decoder columns read at a time for their norms (bounded memory for multi-GB files)."""


def _hooks(raw: dict[str, Any]) -> tuple[str, str]:
    hook_in = raw.get("hook_point_in")
    if not isinstance(hook_in, str) or not hook_in:
        raise SAEFormatError("lm-saes config has no hook_point_in")
    hook_out = raw.get("hook_point_out") or hook_in
    return hook_in, str(hook_out)


def llama_scope_config(raw: dict[str, Any], folder: Path, shapes: Shapes) -> SAEConfig:
    """lm-saes ``config.json`` -> canonical config; checks the exact tensor set and shapes."""
    sae_type = raw.get("sae_type", "sae")
    if sae_type != "sae":
        raise SAEFormatError(f"lm-saes sae_type {sae_type!r} is not a single-layer SAE")
    try:
        d_model = int(raw["d_model"])
        d_sae = d_model * int(raw["expansion_factor"])
        stated = int(raw.get("d_sae", d_sae))
    except (KeyError, TypeError, ValueError):
        raise SAEFormatError("lm-saes config needs integer d_model and expansion_factor") from None
    if stated != d_sae:
        raise SAEFormatError(f"d_sae {stated} is not d_model x expansion_factor = {d_sae}")
    hook_in, hook_out = _hooks(raw)
    if hook_out != hook_in:
        raise SAEFormatError(
            f"hook_point_out {hook_out!r} differs from hook_point_in {hook_in!r}: a transcoder, "
            "which reads one site and writes another, cannot be served as a resid_post SAE"
        )
    if "resid_post" not in hook_in:
        raise SAEFormatError(
            f"hook {hook_in!r} is not a residual-stream-after-layer hook (resid_post)"
        )
    layer = layer_from_text(hook_in)
    if layer is None:
        raise SAEFormatError(f"no layer number in hook_point_in {hook_in!r}")
    act_fn = str(raw.get("act_fn", "relu")).lower()
    if act_fn not in ("jumprelu", "relu"):
        raise SAEFormatError(
            f"lm-saes act_fn {act_fn!r} is not supported (jumprelu and relu are); its "
            "TopK ranks pre-activations scaled by the decoder norm, which no canonical SAE does"
        )
    if raw.get("use_glu_encoder"):
        raise SAEFormatError("lm-saes use_glu_encoder: a gated (GLU) encoder is not supported")
    if raw.get("use_decoder_bias", True) is False:
        raise SAEFormatError("lm-saes use_decoder_bias: false is not supported")
    norm_mode = raw.get("norm_activation", "dataset-wise")
    if norm_mode not in ("dataset-wise", "inference"):
        raise SAEFormatError(
            f"norm_activation {norm_mode!r} scales each token or batch by its own norm at run "
            "time, which cannot be folded into fixed weights (dataset-wise and inference can)"
        )
    if norm_mode == "dataset-wise" and NORM_PREFIX + hook_in not in shapes:
        norm_scale(raw, None)  # the config must hold it then; raises naming both places
    expected = {
        ENC_W: (d_sae, d_model),
        ENC_B: (d_sae,),
        DEC_W: (d_model, d_sae),
        DEC_B: (d_model,),
    }
    if act_fn == "jumprelu" and "jump_relu_threshold" not in raw:
        expected[LOG_THRESHOLD] = (d_sae,)
    optional = {LOG_THRESHOLD: (d_sae,)} if act_fn == "jumprelu" else {}
    missing = sorted(n for n in expected if n not in shapes)
    extra = sorted(
        n
        for n in shapes
        if n not in expected and n not in optional and not n.startswith(NORM_PREFIX)
    )
    if missing or extra:
        parts = [f"missing tensor(s) {missing}" if missing else ""]
        if extra:
            why = " (W_skip: a skip transcoder)" if any("skip" in n for n in extra) else ""
            parts.append(f"unexpected tensor(s) {extra}{why}")
        raise SAEFormatError("lm-saes weights: " + "; ".join(p for p in parts if p))
    for name, shape in {**expected, **optional}.items():
        if name in shapes and tuple(shapes[name]) != shape:
            raise SAEFormatError(
                f"{name} has shape {tuple(shapes[name])}, expected {shape} "
                f"(nn.Linear orientation; d_model={d_model} d_sae={d_sae})"
            )
    return SAEConfig(
        d_in=d_model,
        d_sae=d_sae,
        architecture="jumprelu" if act_fn == "jumprelu" else "standard",
        hook_layer=layer,
        hook_name=hook_in,
        model_name=str(raw.get("model_name", "")),
        apply_b_dec_to_input=bool(raw.get("apply_decoder_bias_to_pre_encoder", False)),
        extra_metadata={"converted_from": "lm-saes (Llama Scope)"},
    )


def _config_norm(raw: dict[str, Any], hook: str) -> float | None:
    """``dataset_average_activation_norm`` given in the config (``{"in", "out"}`` or by hook)."""
    norms = raw.get("dataset_average_activation_norm")
    if not isinstance(norms, dict):
        return None
    try:
        values = {float(norms[k]) for k in ("in", "out", hook) if norms.get(k) is not None}
    except (TypeError, ValueError):
        raise SAEFormatError(f"dataset_average_activation_norm {norms} is not numeric") from None
    if len(values) > 1:
        raise SAEFormatError(
            f"dataset_average_activation_norm {norms} has different input and output norms: "
            "the output scale would differ from the input's, as only transcoders need"
        )
    return values.pop() if values else None


def norm_scale(raw: dict[str, Any], stored_norm: float | None) -> float:
    """``s = sqrt(d_model) / dataset_average_activation_norm`` (1 when already folded)."""
    if raw.get("norm_activation", "dataset-wise") == "inference":
        return 1.0
    hook, _ = _hooks(raw)
    from_cfg = _config_norm(raw, hook)
    if (
        stored_norm is not None
        and from_cfg is not None
        and not math.isclose(stored_norm, from_cfg, rel_tol=1e-3)
    ):
        raise SAEFormatError(
            f"{NORM_PREFIX}{hook} is {stored_norm} in the weights but {from_cfg} in config.json"
        )
    norm = stored_norm if stored_norm is not None else from_cfg
    if norm is None:
        raise SAEFormatError(
            f"norm_activation is dataset-wise but neither the weights ({NORM_PREFIX}{hook}) nor "
            "config.json (dataset_average_activation_norm) hold the dataset norm"
        )
    if not (math.isfinite(norm) and norm > 0):
        raise SAEFormatError(f"dataset_average_activation_norm {norm} is not a positive number")
    return math.sqrt(int(raw["d_model"])) / norm


def read_raw_config(folder: Path) -> dict[str, Any]:
    """The lm-saes ``config.json`` of ``folder`` as a dict."""
    path = folder / LM_SAES_CFG
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{path}: expected a JSON object")
    return raw


def llama_scope_vectors(cfg: SAEConfig, weights: Path) -> dict[str, torch.Tensor]:
    """The canonical ``b_enc``, ``b_dec`` and ``threshold`` (float32), the fold applied."""
    try:
        return _vectors(cfg, weights)
    except SAEFormatError as e:
        msg = str(e)
        raise SAEFormatError(msg if msg.startswith(str(weights)) else f"{weights}: {msg}") from None


def _vectors(cfg: SAEConfig, weights: Path) -> dict[str, torch.Tensor]:
    raw = read_raw_config(weights.parent)
    hook, _ = _hooks(raw)
    with opened(weights) as f:
        keys = set(f.keys())  # noqa: SIM118 - safe_open is not a dict
        norm_key = NORM_PREFIX + hook
        stored = float(f.get_tensor(norm_key).float().item()) if norm_key in keys else None
        s = norm_scale(raw, stored)
        out = {
            "b_enc": f.get_tensor(ENC_B).float() / s,
            "b_dec": f.get_tensor(DEC_B).float() / s,
        }
        if cfg.architecture != "jumprelu":
            return out
        if LOG_THRESHOLD in keys:
            theta = torch.exp(f.get_tensor(LOG_THRESHOLD).float())
        else:
            theta = torch.full((cfg.d_sae,), float(raw["jump_relu_threshold"]))
        scale = torch.full((cfg.d_sae,), s)
        if raw.get("sparsity_include_decoder_norm", True):
            dec = f.get_slice(DEC_W)
            norms = [
                dec[:, j : j + _DECODER_CHUNK].float().norm(dim=0)
                for j in range(0, cfg.d_sae, _DECODER_CHUNK)
            ]
            col_norm = torch.cat(norms)
            if not bool((col_norm > 0).all()):
                raise SAEFormatError(
                    f"{weights}: a decoder column has norm 0, so its JumpReLU gate is undefined"
                )
            scale = scale * col_norm
    out["threshold"] = theta / scale
    return out
