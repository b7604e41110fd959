"""The API-server half of the readout transport: a ZMQ socket per API process, and the
bounded store of values that running requests have been sent so far.

Each API server process (vLLM may run several) binds its own socket at a fresh address
(:func:`socket_address`), which the admission middleware writes into each readout
request next to a fresh readout id (:mod:`sae_steer_vllm.readout_wire`). Workers push
blocks there; :class:`ReadoutStore` keeps them only for ids that are open, i.e. whose
HTTP request is still being answered: a block for an unknown id (the client left, the
response went out) is dropped on arrival, and :meth:`ReadoutStore.close`, called when the
response ends however it ends, frees everything of that request. The memory held is
bounded by ``readout_max_pending_bytes``: a block that would exceed it is dropped, and the
response reports its positions as missing instead of guessing.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .readout_wire import ReadoutBlock, WireError, decode
from .spec import ReadoutSpec

logger = logging.getLogger("sae_steer_vllm")


def socket_address(folder: str | None = None) -> tuple[str, Path]:
    """A fresh ``ipc://`` address in the temp folder, and the socket file it creates."""
    path = Path(folder or tempfile.gettempdir()) / f"sae-steer-readout-{uuid.uuid4().hex}.sock"
    return f"ipc://{path}", path


@dataclass
class PendingReadout:
    """What one running request has received so far, per SAE (blocks in arrival order)."""

    spec: ReadoutSpec
    blocks: dict[str, list[ReadoutBlock]] = field(default_factory=dict)
    nbytes: int = 0
    dropped: int = 0
    """blocks refused because the store was full (their positions end up missing)"""
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def positions(self, sae: str) -> set[int]:
        out: set[int] = set()
        for b in self.blocks.get(sae, []):
            out.update(int(p) for p in b.positions)
        return out

    async def wait_for(self, expected: Callable[[], bool], timeout_s: float) -> bool:
        """Until ``expected()`` holds or ``timeout_s`` passed; True when it holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not expected():
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)
        return True


class ReadoutStore:
    """Open readouts of one API process, with their memory bounded by ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._open: dict[str, PendingReadout] = {}
        self.stale_blocks = 0
        self.dropped_blocks = 0

    def __len__(self) -> int:
        return len(self._open)

    def open(self, readout_id: str, spec: ReadoutSpec) -> PendingReadout:
        pending = PendingReadout(spec)
        self._open[readout_id] = pending
        return pending

    def get(self, readout_id: str) -> PendingReadout | None:
        return self._open.get(readout_id)

    def close(self, readout_id: str) -> None:
        pending = self._open.pop(readout_id, None)
        if pending is not None:
            self.nbytes -= pending.nbytes
            pending.blocks.clear()

    def add(self, block: ReadoutBlock) -> None:
        pending = self._open.get(block.readout_id)
        if pending is None or block.sae not in {r.sae for r in pending.spec.saes}:
            self.stale_blocks += 1
            return
        size = block.nbytes
        if self.nbytes + size > self.max_bytes:
            self.dropped_blocks += 1
            pending.dropped += 1
            if self.dropped_blocks == 1 or self.dropped_blocks % 1000 == 0:
                logger.warning(
                    "sae-steer: readout store full (%d bytes, readout_max_pending_bytes); "
                    "%d blocks dropped so far, reported as missing_positions",
                    self.nbytes,
                    self.dropped_blocks,
                )
        else:
            pending.blocks.setdefault(block.sae, []).append(block)
            pending.nbytes += size
            self.nbytes += size
        pending.changed.set()


class ReadoutReceiver:
    """The socket of this API process and the task that files what arrives into the store."""

    def __init__(self, max_bytes: int) -> None:
        self.address, self._path = socket_address()
        self.store = ReadoutStore(max_bytes)
        self._task: asyncio.Task[None] | None = None
        self._sock: Any = None
        self.bad_messages = 0

    def ensure_started(self) -> None:
        """Bind and start receiving (idempotent; call inside the server's event loop)."""
        if self._task is not None and not self._task.done():
            return
        import zmq
        import zmq.asyncio

        if self._sock is None:
            ctx = zmq.asyncio.Context.instance()
            self._sock = ctx.socket(zmq.PULL)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.setsockopt(zmq.RCVHWM, 0)  # the store, not the socket, bounds memory
            self._sock.bind(self.address)
            atexit.register(_unlink, self._path)
        self._task = asyncio.get_running_loop().create_task(self._receive())

    async def _receive(self) -> None:
        while True:
            frames = await self._sock.recv_multipart()
            try:
                blocks = decode(list(frames))
                for b in blocks:
                    self.store.add(b)
            except WireError as e:
                self.bad_messages += 1
                logger.error("sae-steer: malformed readout message dropped: %s", e)
            except Exception:  # noqa: BLE001 - one bad message must not end the receiving
                self.bad_messages += 1
                logger.exception("sae-steer: readout message dropped")


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def merged(
    pending: PendingReadout, sae: str
) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Position -> (top ids, top values, watched) for one SAE; the first value received
    for a position wins (a preempted request's recomputed positions are reported once)."""
    out: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for b in pending.blocks.get(sae, []):
        for i, p in enumerate(b.positions.tolist()):
            if p not in out:
                out[p] = (b.top_ids[i], b.top_vals[i], b.watched[i])
    return out
