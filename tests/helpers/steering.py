"""A plain-transformers reference for steered prompt logprobs (the serving tests' oracle).

The reference deliberately does NOT reuse the plugin's math: it encodes with
``SAE.encode``, sets the feature, decodes, and adds the SAE error back, the way the
paper defines ``clamp``. ``site: mlp_out`` is implemented the way the authors' hook did it
(encode, set, decode + error on the MLP output, put back in its place): HF's decoder layer
returns the whole residual stream, so that edit is a forward hook on the layer's ``mlp``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.sae import SAE, load_max_activation
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec, VectorIntervention


def _targets(spec: SteeringSpec, saes: dict[str, SAE], max_acts: dict[str, torch.Tensor]) -> list:
    out = []
    for iv in spec.interventions:
        if isinstance(iv, FeatureIntervention):
            c = (
                iv.value
                if iv.value is not None
                else iv.strength * float(max_acts[iv.sae][iv.feature])
            )  # type: ignore[operator]
            out.append((iv, c))
        else:
            out.append((iv, None))
    return out


def _load_reference(
    model_path: str, saes: dict[str, Path]
) -> tuple[Any, dict[str, SAE], dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model.eval()
    loaded = {n: SAE.load(p) for n, p in saes.items()}
    max_acts = {}
    for n, p in saes.items():
        m = load_max_activation(p)
        if m is not None:
            max_acts[n] = m
    return model, loaded, max_acts


def _steering_hooks(
    model: Any, spec: SteeringSpec | None, loaded: dict[str, SAE], max_acts: dict[str, Any]
) -> list[Any]:
    """Forward hooks that apply ``spec`` at every position (the caller removes them)."""
    hooks: list[Any] = []
    if spec is None:
        return hooks
    per_site: dict[tuple[int, str], list[tuple[Any, float | None]]] = {}
    for iv, c in _targets(spec, loaded, max_acts):
        if isinstance(iv, VectorIntervention):
            key = (iv.layer, "resid_post")
        else:
            key = (loaded[iv.sae].cfg.hook_layer, iv.site)
        per_site.setdefault(key, []).append((iv, c))

    def make_hook(items: list[tuple[Any, float | None]]) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> Any:
            h = out[0] if isinstance(out, tuple) else out
            new = h.clone()
            for iv, c in items:
                if isinstance(iv, VectorIntervention):
                    new = new + iv.scale * torch.tensor(iv.vector, dtype=h.dtype)
                    continue
                sae = loaded[iv.sae]
                if iv.mode == "add":
                    new = new + c * sae.W_dec[iv.feature]
                else:
                    # clamps are evaluated on the unsteered h, then summed
                    f = sae.encode(h)
                    err = h - sae.decode(f)
                    f2 = f.clone()
                    f2[..., iv.feature] = c
                    new = new + (sae.decode(f2) + err - h)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook

    for (layer, site), items in per_site.items():
        block = model.model.layers[layer]
        module = block.mlp if site == "mlp_out" else block
        hooks.append(module.register_forward_hook(make_hook(items)))
    return hooks


def reference_prompt_logprobs(
    model_path: str,
    prompt_ids: list[int],
    spec: SteeringSpec | None,
    saes: dict[str, Path],
) -> list[float]:
    """log p(token_t | tokens_<t) for t >= 1, with the spec applied at every position."""
    model, loaded, max_acts = _load_reference(model_path, saes)
    hooks = _steering_hooks(model, spec, loaded, max_acts)
    try:
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()
    lp = torch.log_softmax(logits.double(), dim=-1)
    return [float(lp[t - 1, prompt_ids[t]]) for t in range(1, len(prompt_ids))]


def reference_features(
    model_path: str,
    ids: list[int],
    spec: SteeringSpec | None,
    saes: dict[str, Path],
    read: list[str],
) -> dict[str, torch.Tensor]:
    """Each SAE in ``read``: its encode of resid_post at its layer ([T, d_sae]), with the spec
    applied at every position; resid_post is taken *before* that layer's own intervention
    (a hook registered ahead of the steering hooks sees the layer's unmodified output)."""
    model, loaded, max_acts = _load_reference(model_path, saes)
    seen: dict[int, torch.Tensor] = {}

    def capture(layer: int) -> Any:
        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            seen[layer] = (out[0] if isinstance(out, tuple) else out)[0].detach().clone()

        return hook

    hooks = [
        model.model.layers[layer].register_forward_hook(capture(layer))
        for layer in {loaded[n].cfg.hook_layer for n in read}
    ]
    hooks += _steering_hooks(model, spec, loaded, max_acts)
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
            return {n: loaded[n].encode(seen[loaded[n].cfg.hook_layer]) for n in read}
    finally:
        for h in hooks:
            h.remove()


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1))
