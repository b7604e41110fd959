"""The ``cpu`` driver: active, CPU target, no launcher (kernels run in the interpreter)."""

from __future__ import annotations

import os
from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase

TARGET = GPUTarget("cpu", 0, 1)


class InterpreterCPUDriver(DriverBase):
    """Reports itself active only under ``TRITON_INTERPRET=1``: without the interpreter this
    backend cannot run a kernel, and an active driver would make Triton try."""

    @classmethod
    def is_active(cls) -> bool:
        return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("test-only interpreter backend: nothing is compiled")

    def get_current_target(self) -> GPUTarget:
        return TARGET

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: Any = None) -> int:
        return 0

    def get_benchmarker(self) -> Any:
        from triton.testing import do_bench

        return do_bench

    def get_device_interface(self) -> Any:
        return torch.cpu

    def get_empty_cache_for_benchmark(self) -> torch.Tensor:
        return torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32)

    def clear_cache(self, cache: torch.Tensor) -> None:
        cache.zero_()
