"""Worker -> API server messages of the readout: one multipart ZMQ message per step.

Why a side channel: vLLM 0.32 carries nothing per token from a worker to the API server
beyond tokens and logprobs, and a model cannot add fields to an engine output. So the
worker that reads (tensor-parallel rank 0) pushes each step's values to the API server
process that admitted the request, over a ZMQ socket that process bound
(:mod:`sae_steer_vllm.readout_server`); the address and a per-request readout id travel
with the request in ``vllm_xargs`` (:data:`READOUT_ID_KEY`, :data:`READOUT_TO_KEY`),
written by the admission middleware and never taken from a client.

Only top-k pairs and watched values travel, never dense vectors. The format is a JSON
header plus raw little-endian arrays, so the API server never unpickles anything a
worker (or anyone who can reach the socket) sent: a frame that does not match its header
is dropped.

This module imports numpy only.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

READOUT_ID_KEY = "steering_readout_id"
"""``vllm_xargs`` key: this request's readout id (a fresh hex uuid per HTTP request)."""
READOUT_TO_KEY = "steering_readout_to"
"""``vllm_xargs`` key: the ZMQ address of the API server process that collects it."""
INTERNAL_KEYS = (READOUT_ID_KEY, READOUT_TO_KEY)

ADDRESS_RE = re.compile(r"^ipc://[A-Za-z0-9_./-]{1,200}/sae-steer-readout-[0-9a-f]{8,64}\.sock\Z")
"""What a worker accepts as an address: only sockets named by
:func:`sae_steer_vllm.readout_server.socket_address` (defence in depth: the middleware
already overwrites these keys)."""
ID_RE = re.compile(r"^[0-9a-f]{32}\Z")

_VERSION = 1
_I64, _I32, _F32 = np.dtype("<i8"), np.dtype("<i4"), np.dtype("<f4")


@dataclass(frozen=True)
class ReadoutBlock:
    """One request's values from one SAE in one step (``m`` positions)."""

    readout_id: str
    sae: str
    positions: np.ndarray  # [m] int64
    top_ids: np.ndarray  # [m, k] int32, largest activation first
    top_vals: np.ndarray  # [m, k] float32 (0.0 where fewer than k features are active)
    watched: np.ndarray  # [m, w] float32

    @property
    def nbytes(self) -> int:
        return int(
            self.positions.nbytes + self.top_ids.nbytes + self.top_vals.nbytes + self.watched.nbytes
        )


def encode(blocks: list[ReadoutBlock]) -> list[bytes]:
    """Frames of one message: a JSON header, then four arrays per block."""
    header: dict[str, Any] = {"v": _VERSION, "blocks": []}
    frames: list[bytes] = [b""]
    for b in blocks:
        m = int(b.positions.shape[0])
        k = int(b.top_ids.shape[1]) if b.top_ids.ndim == 2 else 0
        w = int(b.watched.shape[1]) if b.watched.ndim == 2 else 0
        header["blocks"].append({"id": b.readout_id, "sae": b.sae, "m": m, "k": k, "w": w})
        frames += [
            np.ascontiguousarray(b.positions, _I64).tobytes(),
            np.ascontiguousarray(b.top_ids, _I32).tobytes(),
            np.ascontiguousarray(b.top_vals, _F32).tobytes(),
            np.ascontiguousarray(b.watched, _F32).tobytes(),
        ]
    frames[0] = json.dumps(header).encode()
    return frames


class WireError(ValueError):
    """A message that does not follow this format (dropped by the receiver)."""


def decode(frames: list[bytes]) -> list[ReadoutBlock]:
    """The blocks of one message; raises :class:`WireError` on anything malformed."""
    if not frames:
        raise WireError("empty message")
    try:
        header = json.loads(frames[0])
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise WireError(f"bad header: {e}") from None
    if not isinstance(header, dict) or header.get("v") != _VERSION:
        raise WireError("unknown header version")
    blocks = header.get("blocks")
    if not isinstance(blocks, list) or len(frames) != 1 + 4 * len(blocks):
        raise WireError("frame count does not match the header")
    out: list[ReadoutBlock] = []
    for i, h in enumerate(blocks):
        try:
            rid, sae = str(h["id"]), str(h["sae"])
            m, k, w = int(h["m"]), int(h["k"]), int(h["w"])
        except (KeyError, TypeError, ValueError, OverflowError):  # e.g. "m": Infinity
            raise WireError(f"block {i}: bad header entry") from None
        if min(m, k, w) < 0:
            raise WireError(f"block {i}: negative size")
        f = frames[1 + 4 * i : 5 + 4 * i]
        sizes = (m * 8, m * k * 4, m * k * 4, m * w * 4)
        if any(len(x) != n for x, n in zip(f, sizes, strict=True)):
            raise WireError(f"block {i}: array sizes do not match the header")
        out.append(
            ReadoutBlock(
                readout_id=rid,
                sae=sae,
                positions=np.frombuffer(f[0], _I64).copy(),
                top_ids=np.frombuffer(f[1], _I32).reshape(m, k).copy(),
                top_vals=np.frombuffer(f[2], _F32).reshape(m, k).copy(),
                watched=np.frombuffer(f[3], _F32).reshape(m, w).copy(),
            )
        )
    return out
