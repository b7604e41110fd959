"""Lazy package exports: a public name is imported from its module on first use.

Why: ``import sae_steer_vllm`` happens in every vLLM process at plugin registration, and
``sae-steer eval --help`` must answer without torch or vLLM; a package ``__init__`` that
imported its public names eagerly would pull all of that in. The three packages' public
APIs use this one helper (each lists its names in ``__all__`` and under TYPE_CHECKING so
type checkers and readers see them).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Module ``__getattr__`` and ``__dir__`` serving ``exports`` (name -> module path;
    a path starting with ``.`` is relative to ``package``)."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module, package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
