"""Writing files so that a crash never leaves half a file, and content digests.

Every file sae-steer writes goes through :func:`atomic_write` (write a temporary file in
the same folder, then ``os.replace``): a reader sees the old file or the new one, never a
truncated one, which is what makes ``--resume`` and step skipping safe after Ctrl-C.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``). On an
    exception the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = 2) -> Path:
    """``obj`` as JSON (non-JSON values via ``str``), written atomically, newline-terminated."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_save(path: str | Path, save: Callable[[Path], Any]) -> Path:
    """Call ``save(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        save(tmp)
    return Path(path)


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks (SAE files can be GBs)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def json_digest(obj: Any, length: int = 16) -> str:
    """Short, stable digest of a JSON-able object (keys sorted): a fingerprint for configs."""
    canon = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:length]
