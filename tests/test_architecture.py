"""The house rules, checked: imports flow benchmarks -> sae_training -> sae_steer_vllm only,
the SAE format and the spec import without vLLM, and no module grows past 500 lines.

Parsed from source (``ast``), so imports inside functions count too: a lazy upward import
is still an upward dependency. The one exception is ``sae_steer_vllm/cli.py``, whose
command table names higher modules as strings and imports them only on dispatch.
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = ("sae_steer_vllm", "sae_training", "benchmarks")
"""Lowest first: a package may import only packages at or below its own position."""
MAX_LINES = 500


def _modules(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def _imported_roots(path: Path) -> set[tuple[str, int]]:
    """(top-level package, line) of every absolute import in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[tuple[str, int]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update((a.name.split(".")[0], node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add((node.module.split(".")[0], node.lineno))
    return out


def test_imports_only_flow_downward() -> None:
    upward = []
    for rank, package in enumerate(LAYERS):
        higher = set(LAYERS[rank + 1 :])
        for path in _modules(package):
            for root, line in sorted(_imported_roots(path)):
                if root in higher:
                    upward.append(f"{path.relative_to(REPO)}:{line} imports {root}")
    assert not upward, (
        "upward imports (benchmarks -> sae_training -> sae_steer_vllm):\n" + "\n".join(upward)
    )


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The checker itself sees a lazy import inside a function."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from benchmarks.eval import main\n    return main\n")
    assert ("benchmarks", 2) in _imported_roots(f)


@pytest.mark.parametrize("package", [*LAYERS, "tests"])
def test_no_module_over_500_lines(package: str) -> None:
    long = {
        str(p.relative_to(REPO)): n
        for p in _modules(package)
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (> {MAX_LINES} lines): {long}"


@pytest.mark.parametrize("package", [*LAYERS, "benchmarks.demo", "sae_steer_vllm.sae"])
def test_every_public_name_resolves(package: str) -> None:
    """Each package's ``__all__`` is its public API; a lazy export pointing at a moved
    module would otherwise fail only when a user first touches the name."""
    mod = importlib.import_module(package)
    missing = [n for n in mod.__all__ if getattr(mod, n, None) is None]
    assert not missing, f"{package}.__all__ names that do not resolve: {missing}"


def test_importing_the_packages_stays_light() -> None:
    """``import sae_steer_vllm`` runs in every vLLM process and ``sae-steer eval --help``
    must answer at once: the package roots import neither torch nor vLLM."""
    code = (
        "import sys, sae_steer_vllm, sae_training, benchmarks; "
        "bad = [m for m in ('torch', 'vllm', 'transformers', 'matplotlib') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
