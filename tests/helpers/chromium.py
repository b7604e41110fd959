"""Headless Chromium for the tests that check our HTML pages really render.

Chromium (Debian package ``chromium``) is installed by the CI set-up; a test calls
:func:`chromium_or_skip`, which skips it, saying so, only when the binary is absent.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch


def chromium_binary() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name) or (
            f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None
        )
        if path:
            return path
    return None


def chromium_or_skip() -> str:
    path = chromium_binary()
    if path is None:
        pytest.skip("chromium is not installed (CI installs the Debian 'chromium' package)")
    return path


def _flags(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


def dump_dom(chromium: str, html_file: Path, profile: Path, fragment: str = "") -> str:
    """The DOM after the page's scripts ran (``fragment``: ``#...`` added to the address)."""
    return subprocess.run(
        [chromium, *_flags(profile), "--dump-dom", html_file.as_uri() + fragment],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout


def screenshot_pixels(chromium: str, html_file: Path, profile: Path) -> torch.Tensor:
    """A 1200x900 screenshot of the page as float RGB pixels ``[N, 3]``."""
    from PIL import Image

    shot = profile.parent / f"{html_file.stem}.png"
    subprocess.run(
        [
            chromium,
            *_flags(profile),
            f"--screenshot={shot}",
            "--window-size=1200,900",
            html_file.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 900)
    return torch.from_numpy(np.asarray(img).reshape(-1, 3).astype(np.float32))


def orange_pixels(px: torch.Tensor) -> int:
    """Pixels of the orange token highlighting both our pages use."""
    return int(((px[:, 0] > 200) & (px[:, 1] > 60) & (px[:, 1] < 190) & (px[:, 2] < 120)).sum())
