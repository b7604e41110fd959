"""The worker half of the readout: which slots read what, and each step's top-k, shipped.

Each running request that asks for a readout owns a steering slot (all zeros when it
does not steer, so its outputs are those of an unsteered request, exactly). After every
forward, :meth:`WorkerReadout.ship` (called from the model's ``compute_logits``, which
both runners call eagerly after the forward, outside any compiled or CUDA graph) takes
the captured resid_post rows (:mod:`sae_steer_vllm.readout_capture`) of the tokens of
reading slots, filtered by each request's ``positions``, encodes them with the SAE's own
:meth:`~sae_steer_vllm.sae.SAE.encode` in float32, and pushes the top-k pairs and watched
values to the API server that admitted the request (:mod:`sae_steer_vllm.readout_wire`).

Nothing is kept between steps: a slot's reading state is dropped when vLLM removes the
request (finished, aborted on disconnect, or preempted; a resumed request is added again
and its recomputed positions are de-duplicated by the API server). Only tensor-parallel
rank 0 encodes and sends; the other ranks only capture (one copy per layer).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .readout_wire import ADDRESS_RE, ID_RE, READOUT_ID_KEY, READOUT_TO_KEY, ReadoutBlock, encode
from .sae import SAE, load_sae

if TYPE_CHECKING:
    from .readout_capture import ReadoutCapture
    from .spec import ReadoutSpec, SAEReadout
    from .steering_plan import SAECatalog

logger = logging.getLogger("sae_steer_vllm")

ENCODE_ROWS = 256
"""Rows encoded at once: bounds the dense ``[rows, d_sae]`` float32 temporary (64 MB at
65,536 features)."""
_SEND_HWM = 100_000


@dataclass(frozen=True)
class ReadTarget:
    """Where one slot's readout goes and what it reads."""

    readout_id: str
    address: str
    spec: ReadoutSpec
    prompt_len: int


def read_target(params: Any, spec: ReadoutSpec | None, prompt_len: int) -> ReadTarget | None:
    """The slot's target from the request's ``extra_args``; None when it reads nothing or
    the admission middleware did not give it an id and an address (the offline API)."""
    if spec is None:
        return None
    extra = getattr(params, "extra_args", None) or {}
    rid, addr = extra.get(READOUT_ID_KEY), extra.get(READOUT_TO_KEY)
    if not (isinstance(rid, str) and ID_RE.match(rid)):
        return None
    if not (isinstance(addr, str) and ADDRESS_RE.match(addr)):
        return None
    return ReadTarget(rid, addr, spec, prompt_len)


class WorkerReadout:
    """Capture buffers, per-slot targets, the SAE encoders and the sockets of one worker."""

    def __init__(self, catalog: SAECatalog) -> None:
        self.catalog = catalog
        self.captures: dict[int, ReadoutCapture] = {}
        self.targets: dict[int, ReadTarget] = {}
        self._encoders: dict[str, tuple[str, SAE]] = {}
        self._tok: np.ndarray | None = None
        self._pending = False
        self._reporting: bool | None = None
        self._ctx: Any = None
        self._sockets: dict[str, Any] = {}
        self.dropped_messages = 0

    # ------------------------------------------------------------ set-up
    def add_capture(self, layer: int, capture: ReadoutCapture) -> None:
        self.captures[layer] = capture

    def preload(self) -> None:
        """Load every start-up SAE's encoder now, while vLLM builds the model, so its
        memory is counted before the KV cache is sized."""
        if self.captures and self.is_reporting():
            for name in list(self.catalog.saes):
                self.encoder(name)

    def is_reporting(self) -> bool:
        if self._reporting is None:
            try:
                from vllm.distributed import get_tensor_model_parallel_rank

                self._reporting = get_tensor_model_parallel_rank() == 0
            except (AssertionError, RuntimeError, ImportError):  # no TP group: one rank
                self._reporting = True
        return self._reporting

    def encoder(self, name: str) -> SAE:
        """The SAE's encoder on the capture device (float32; the decoder stays on the meta
        device, readout never decodes). Reloaded when the name now means another folder."""
        info = self.catalog.saes[name]
        cached = self._encoders.get(name)
        if cached is not None and cached[0] == str(info.path):
            return cached[1]
        device = next(iter(self.captures.values())).resid.device
        sae = load_sae(info.path)
        light = SAE(
            sae.cfg,
            sae.W_enc.detach().to(device),
            sae.b_enc.detach().to(device),
            sae.W_dec.detach().to("meta"),
            sae.b_dec.detach().to(device),
            None if sae.threshold is None else sae.threshold.to(device),
        ).requires_grad_(False)
        self._encoders[name] = (str(info.path), light)
        return light

    # ------------------------------------------------------------ slots
    def attach(self, slot: int, target: ReadTarget | None) -> None:
        if target is None:
            self.targets.pop(slot, None)
        else:
            self.targets[slot] = target

    def release(self, slot: int) -> None:
        self.targets.pop(slot, None)

    def step_tokens(self, tok: np.ndarray) -> None:
        """This step's token -> slot map (the one the hooks read), noted for :meth:`ship`.
        A step whose ``compute_logits`` never ran (V2's batch-sharded sampling calls
        ``compute_logits_local``) is shipped here, before the forward overwrites it."""
        if self._pending:
            self.ship()
        if self.targets:
            self._tok = tok.copy()
            self._pending = True
        else:
            self._tok, self._pending = None, False

    # ------------------------------------------------------------ after the forward
    @torch.no_grad()
    def ship(self) -> None:
        """Encode and send this step's reading rows (once per step; later calls no-op)."""
        if not self._pending:
            return
        self._pending = False
        tok = self._tok
        if tok is None or not self.targets or not self.is_reporting():
            return
        n = len(tok)
        reading = np.isin(tok, np.fromiter(self.targets, dtype=np.int64))
        if not reading.any():
            return
        any_cap = next(iter(self.captures.values()))
        pos = any_cap.pos[:n].cpu().numpy()
        # per SAE, every reading request's rows at once: one matmul per SAE and step, not one
        # per request (a GEMV per request would read the whole encoder each time)
        by_sae: dict[str, list[tuple[ReadTarget, SAEReadout, np.ndarray]]] = {}
        for slot, tgt in list(self.targets.items()):
            rows = np.flatnonzero(tok == slot)
            if tgt.spec.positions == "generated":
                rows = rows[pos[rows] >= tgt.prompt_len]
            elif tgt.spec.positions == "prompt":
                rows = rows[pos[rows] < tgt.prompt_len]
            if rows.size:
                for r in tgt.spec.saes:
                    by_sae.setdefault(r.sae, []).append((tgt, r, rows))
        blocks: dict[str, list[ReadoutBlock]] = {}
        for name, groups in by_sae.items():
            for group, block in zip(groups, self._read(name, groups, pos), strict=True):
                if block is not None:
                    blocks.setdefault(group[0].address, []).append(block)
        for address, bl in blocks.items():
            self._send(address, bl)

    def _read(
        self,
        name: str,
        groups: list[tuple[ReadTarget, SAEReadout, np.ndarray]],
        pos: np.ndarray,
    ) -> list[ReadoutBlock | None]:
        """One SAE's values for every reading request of this step (one block each)."""
        info = self.catalog.saes.get(name)
        if info is None or info.cfg.hook_layer not in self.captures:
            return [None] * len(groups)  # unregistered since admission: reported missing
        sae = self.encoder(name)
        resid = self.captures[info.cfg.hook_layer].resid
        rows = np.concatenate([g[2] for g in groups])
        idx = torch.from_numpy(rows).to(resid.device)
        kmax = min(max(r.top_k for _, r, _ in groups), sae.cfg.d_sae)
        union = sorted({f for _, r, _ in groups for f in r.features})
        col = {f: j for j, f in enumerate(union)}
        w_idx = torch.tensor(union, dtype=torch.int64, device=resid.device)
        ids, vals, watched = [], [], []
        for lo in range(0, len(rows), ENCODE_ROWS):
            f = sae.encode(resid[idx[lo : lo + ENCODE_ROWS]].to(torch.float32))
            v, i = torch.topk(f, kmax, dim=-1) if kmax else (f[:, :0], f[:, :0].long())
            ids.append(i.to(torch.int32).cpu())
            vals.append(v.cpu())
            watched.append(f[:, w_idx].cpu())
        top_ids = torch.cat(ids).numpy()
        top_vals = torch.cat(vals).numpy()
        all_watched = torch.cat(watched).numpy()
        out: list[ReadoutBlock | None] = []
        lo = 0
        for tgt, r, g_rows in groups:
            sl = slice(lo, lo + len(g_rows))
            lo += len(g_rows)
            k = min(r.top_k, kmax)  # topk is sorted: a request's top k is the prefix
            out.append(
                ReadoutBlock(
                    readout_id=tgt.readout_id,
                    sae=name,
                    positions=pos[g_rows].astype(np.int64),
                    top_ids=top_ids[sl, :k],
                    top_vals=top_vals[sl, :k],
                    watched=all_watched[sl][:, [col[f] for f in r.features]],
                )
            )
        return out

    def _send(self, address: str, blocks: list[ReadoutBlock]) -> None:
        import zmq

        sock = self._sockets.get(address)
        if sock is None:
            if self._ctx is None:
                self._ctx = zmq.Context()
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, _SEND_HWM)
            sock.connect(address)
            self._sockets[address] = sock
        try:
            sock.send_multipart(encode(blocks), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # the API server is not draining: never stall the engine
            self.dropped_messages += 1
            logger.warning(
                "sae-steer: readout message to %s dropped (queue full; %d so far); the "
                "response reports those positions as missing",
                address,
                self.dropped_messages,
            )
