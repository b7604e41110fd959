"""SAE files: one canonical in-memory SAE, a table of on-disk layouts, the statistics file.

Importable without vLLM (torch + safetensors only). Modules, in reading order:

* :mod:`.config`: :class:`SAEConfig` (sizes, layer, architecture) and the error type;
* :mod:`.saelens_format`: SAELens ``cfg.json`` (6.x / pre-6.0) read as SAELens reads it;
* :mod:`.loaders`: the table of layouts (SAELens v6 / flat, sparsify, lm-saes) -> canonical tensors;
* :mod:`.llama_scope`: lm-saes / Llama Scope ``config.json`` and its dataset-norm fold;
* :mod:`.hub`: ``hf:owner/repo[/subfolder][@revision]`` -> a local folder (the one resolver);
* :mod:`.pickled`, :mod:`.convert`: ``sae-steer convert``, the only reader of ``.pt``/``.pth``;
* :mod:`.model`: :class:`SAE` (encode / decode / save) and :func:`load_sae`;
* :mod:`.rows`: :class:`SAERows`, single features' rows for the server;
* :mod:`.stats_file`: ``feature_stats.safetensors`` (read, write, the ``strength`` units);
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
from .stats_file import load_max_activation, load_units, read_stats, stats_path, write_stats

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
    "load_units",
    "load_sae",
    "random_sae",
    "read_config",
    "read_stats",
    "resid_post_hook_name",
    "stats_path",
    "write_stats",
]
