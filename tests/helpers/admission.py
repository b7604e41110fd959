"""A small SAE catalog and the admission call the admission tests (unit and fuzz) share."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sae_steer_vllm.admission import admit
from sae_steer_vllm.plugin_config import PluginConfig
from sae_steer_vllm.sae import random_sae
from sae_steer_vllm.spec import SteeringSpec
from sae_steer_vllm.steering_plan import SAECatalog, check_spec

D, LAYERS = 16, 3
"""The catalog's model: hidden size and decoder layers."""


def small_catalog(folder: Path) -> SAECatalog:
    """One SAE named ``s`` (32 features, layer 1) and a 4 KB spec limit."""
    random_sae(folder, d_in=D, d_sae=32, layer=1)
    cfg = PluginConfig(saes={"s": str(folder)}, max_spec_bytes=4096)
    return SAECatalog.load(cfg, num_layers=LAYERS, d_model=D)


def spec_json(feature: int = 2, sae: str = "s") -> str:
    return json.dumps(
        {"interventions": [{"sae": sae, "feature": feature, "value": 3.0, "mode": "add"}]}
    )


def admit_with(cat: SAECatalog, method: str, path: str, data: Any) -> SteeringSpec | None:
    """:func:`sae_steer_vllm.admission.admit` with the API server's check on ``cat``."""
    return admit(
        method,
        path,
        data,
        check=lambda s: check_spec(s, cat),
        max_spec_bytes=cat.limits.max_spec_bytes,
        request_id="req-1",
    )
