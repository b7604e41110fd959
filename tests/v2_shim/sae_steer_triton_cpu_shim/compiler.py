"""The ``cpu`` compiler: claims the ``cpu`` target and refuses to compile anything.

Under ``TRITON_INTERPRET=1`` Triton never calls a backend's compile stages, so reaching
``add_stages`` means the interpreter was off: fail with that explanation.
"""

from __future__ import annotations

import hashlib
from types import ModuleType
from typing import Any

from triton.backends.compiler import BaseBackend, GPUTarget


class InterpreterCPUBackend(BaseBackend):
    @staticmethod
    def supports_target(target: GPUTarget) -> bool:
        return target.backend == "cpu"

    def hash(self) -> str:
        return hashlib.sha256(b"sae-steer-triton-cpu-shim").hexdigest()

    def parse_options(self, options: dict) -> Any:
        return dict(options)

    def add_stages(self, stages: dict, options: Any, language: Any) -> None:
        raise RuntimeError(
            "sae-steer's test-only Triton 'cpu' backend cannot compile kernels; "
            "set TRITON_INTERPRET=1 (tests/v2_shim/activate.py does)"
        )

    def load_dialects(self, context: Any) -> None:
        return None

    def get_module_map(self) -> dict[str, ModuleType]:
        return {}
