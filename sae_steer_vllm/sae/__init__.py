"""SAE files: one canonical in-memory SAE, a table of on-disk layouts, the statistics file.

Importable without vLLM (torch + safetensors only). Modules, in reading order:

* :mod:`.config`: :class:`SAEConfig` (sizes, layer, architecture) and the error type;
* :mod:`.loaders`: the table of layouts (SAELens v6 / flat, sparsify) -> canonical tensors;
* :mod:`.model`: :class:`SAE` (encode / decode / save) and :func:`load_sae`;
* :mod:`.rows`: :class:`SAERows`, single features' rows for the server;
* :mod:`.stats_file`: ``feature_stats.safetensors`` (read, write, ``max_activation``);
* :mod:`.random`: :func:`random_sae` for tests and benchmarks;
* :mod:`.tensor_file`: safetensors reading/writing with errors that name the file.
"""

from __future__ import annotations

from ..constants import SAELENS_CFG, SAELENS_WEIGHTS, SPARSIFY_WEIGHTS, STATS_FILE
from .config import ARCHITECTURES, Architecture, SAEConfig, SAEFormatError, resid_post_hook_name
from .loaders import LAYOUTS, load_canonical, read_config
from .model import SAE, load_sae
from .random import random_sae
from .rows import SAERows
from .stats_file import load_max_activation, read_stats, stats_path, write_stats

__all__ = [
    "ARCHITECTURES",
    "LAYOUTS",
    "SAE",
    "SAELENS_CFG",
    "SAELENS_WEIGHTS",
    "SPARSIFY_WEIGHTS",
    "STATS_FILE",
    "Architecture",
    "SAEConfig",
    "SAEFormatError",
    "SAERows",
    "load_canonical",
    "load_max_activation",
    "load_sae",
    "random_sae",
    "read_config",
    "read_stats",
    "resid_post_hook_name",
    "stats_path",
    "write_stats",
]
