"""Per-token steering inside the model: slot tables and the op applied after a decoder layer.

Every running request owns a *slot* (0 = unsteered, all zeros). Each forward,
the worker writes ``tok_slot[t]`` = slot of token ``t``; the decoder-layer hook
then gathers that slot's add vector and entries (clamp, scale, gated add). The tables are
persistent buffers registered on the layers and only ever written in place, so a
torch.compile graph (or a CUDA graph) traced while they were zero still reads
the current values: buffers are graph inputs, not constants.

Gates (which tokens an intervention touches) are computed per token from its position and
its slot's prompt length and think span (:mod:`sae_steer_vllm.think_phase`), and per entry
from the entry's positions, window and condition: all with static shapes, so they trace
once for every batch size.

Unsteered tokens get an exact ``+ 0.0``: their outputs are bit-identical to a
model without the plugin.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .steering_plan import WINDOW_END, LayerPlan, PositionMode

assert [int(m) for m in PositionMode] == [0, 1, 2, 3, 4]  # the column order of TokenPhase.member


class TokenPhase(NamedTuple):
    """Where each token of the step is, computed once per layer hook."""

    member: torch.Tensor
    """``[n, 5]`` bool: the token is in ``all``, ``prompt``, ``generated``, ``thinking``,
    ``answer`` (columns in :class:`PositionMode` order)."""
    gen_index: torch.Tensor
    """``[n]`` int64: generated-token index (negative for prompt tokens)."""


def token_phase(
    positions: torch.Tensor,
    idx: torch.Tensor,
    slot_prompt_len: torch.Tensor,
    slot_think_start: torch.Tensor,
    slot_think_end: torch.Tensor,
) -> TokenPhase:
    """Per-token membership in every scope (think_phase.py defines S and E)."""
    g = positions - slot_prompt_len[idx]
    generated = g >= 0
    start, end = slot_think_start[idx], slot_think_end[idx]
    thinking = (positions >= start) & (positions <= end)
    answer = (positions > end) & generated
    member = torch.stack(
        [torch.ones_like(generated), ~generated, generated, thinking, answer], dim=1
    )
    return TokenPhase(member, g)


class LayerTables(torch.nn.Module):
    """The steering state of one decoder layer, for every slot at once.

    ``add``: ``[S, d]`` (model dtype), summed ungated add-mode/vector contributions.
    Entries (only on layers with an SAE or runtime clamp tables), ``E = (S - 1) * K``,
    entry ``e`` belonging to slot ``1 + e // K``: encoder column, effective bias, threshold,
    decoder row, target and slope (float32, for an exact encode; :class:`EntryRow`), its
    positions mode and window, and its condition's encoder column, bias, threshold and band;
    ``resid_keep``: ``[S]`` (model dtype), 1 where the slot's clamps read resid_post,
    0 where they read the MLP output (spec ``site: mlp_out``).
    """

    add: torch.Tensor
    enc: torch.Tensor
    dec: torch.Tensor
    bias: torch.Tensor
    thr: torch.Tensor
    target: torch.Tensor
    slope: torch.Tensor
    mode: torch.Tensor
    win_lo: torch.Tensor
    win_hi: torch.Tensor
    c_enc: torch.Tensor
    c_bias: torch.Tensor
    c_thr: torch.Tensor
    c_above: torch.Tensor
    c_below: torch.Tensor
    owner: torch.Tensor
    resid_keep: torch.Tensor

    def __init__(
        self,
        num_slots: int,
        d_model: int,
        clamp_per_slot: int,
        dtype: torch.dtype,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        inf = float("inf")
        self.num_slots = num_slots
        self.k = clamp_per_slot
        f32 = torch.float32
        self.register_buffer(
            "add", torch.zeros(num_slots, d_model, dtype=dtype, device=device), persistent=False
        )
        e = (num_slots - 1) * clamp_per_slot
        self.has_clamp = clamp_per_slot > 0
        self.register_buffer(
            "enc", torch.zeros(e, d_model, dtype=f32, device=device), persistent=False
        )
        self.register_buffer(
            "dec", torch.zeros(e, d_model, dtype=f32, device=device), persistent=False
        )
        self.register_buffer("bias", torch.zeros(e, dtype=f32, device=device), persistent=False)
        self.register_buffer("thr", torch.zeros(e, dtype=f32, device=device), persistent=False)
        self.register_buffer("target", torch.zeros(e, dtype=f32, device=device), persistent=False)
        self.register_buffer("slope", torch.zeros(e, dtype=f32, device=device), persistent=False)
        i64 = torch.int64
        self.register_buffer("mode", torch.zeros(e, dtype=i64, device=device), persistent=False)
        for name, fill in (("win_lo", -WINDOW_END), ("win_hi", WINDOW_END)):
            self.register_buffer(
                name, torch.full((e,), fill, dtype=i64, device=device), persistent=False
            )
        self.register_buffer(
            "c_enc", torch.zeros(e, d_model, dtype=f32, device=device), persistent=False
        )
        for fname, ffill in (("c_bias", 0.0), ("c_thr", 0.0), ("c_above", -inf), ("c_below", inf)):
            self.register_buffer(
                fname, torch.full((e,), ffill, dtype=f32, device=device), persistent=False
            )
        owner = torch.arange(1, num_slots, device=device).repeat_interleave(max(clamp_per_slot, 0))
        self.register_buffer("owner", owner.to(torch.int64), persistent=False)
        self.register_buffer(
            "resid_keep", torch.ones(num_slots, dtype=dtype, device=device), persistent=False
        )

    @torch.no_grad()
    def write(self, slot: int, plan: LayerPlan | None) -> None:
        """Put one request's plan for this layer into ``slot`` (None clears it)."""
        if plan is None or plan.add is None:
            self.add[slot].zero_()
        else:
            self.add[slot].copy_(plan.add.to(self.add.dtype))
        if not self.has_clamp:
            return
        lo = (slot - 1) * self.k
        rows = plan.entries if plan is not None else []
        mlp_out = plan is not None and plan.clamp_site == "mlp_out"
        self.resid_keep[slot] = 0.0 if mlp_out else 1.0
        if len(rows) > self.k:
            raise ValueError(f"{len(rows)} entries exceed {self.k} per layer")
        inf = float("inf")
        for j in range(self.k):
            e = lo + j
            r = rows[j] if j < len(rows) else None
            if r is None:
                for t in (self.enc, self.dec, self.c_enc):
                    t[e].zero_()
                for t, v in ((self.bias, 0.0), (self.thr, 0.0), (self.target, 0.0)):
                    t[e] = v
                self.slope[e] = 0.0
                self.mode[e] = 0
                self.win_lo[e], self.win_hi[e] = -WINDOW_END, WINDOW_END
                self.c_bias[e], self.c_thr[e], self.c_above[e], self.c_below[e] = 0, 0, -inf, inf
                continue
            self.enc[e].copy_(r.enc)
            self.dec[e].copy_(r.dec)
            self.bias[e] = r.bias
            self.thr[e] = r.threshold
            self.target[e] = r.target
            self.slope[e] = r.slope
            self.mode[e] = int(r.positions)
            self.win_lo[e], self.win_hi[e] = r.window
            c = r.when
            if c is None:
                self.c_enc[e].zero_()
                self.c_bias[e], self.c_thr[e], self.c_above[e], self.c_below[e] = 0, 0, -inf, inf
            else:
                self.c_enc[e].copy_(c.enc)
                self.c_bias[e], self.c_thr[e] = c.bias, c.threshold
                self.c_above[e], self.c_below[e] = c.above, c.below


def steering_delta(
    tables: LayerTables,
    idx: torch.Tensor,
    phase: TokenPhase,
    slot_mode: torch.Tensor,
    hidden: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """The change to the residual stream for each token ([n, d], model dtype).

    ``idx``: slot per token; ``phase``: where each token is (:func:`token_phase`);
    ``slot_mode``: each slot's request-level positions, which gate its summed add vector.
    ``hidden`` is the layer's MLP output, ``residual`` the stream before it: an entry encodes
    their sum (resid_post), or ``hidden`` alone where the slot's ``resid_keep`` is 0 (``site:
    mlp_out``; ``x 1.0`` and ``+ 0.0`` are exact, so resid_post is computed as it was without
    sites); a condition always reads resid_post before this layer's interventions. Written
    with static shapes only, so it traces once into the compiled graph for every batch size.
    """
    slot_gate = phase.member.gather(1, slot_mode[idx].unsqueeze(1)).to(torch.float32)
    delta = tables.add[idx].to(torch.float32) * slot_gate
    if tables.has_clamp:
        keep = tables.resid_keep[idx].unsqueeze(1)
        h = (hidden + residual * keep).to(torch.float32)  # only where a clamp needs it
        pre = h @ tables.enc.T + tables.bias  # [n, E]
        f = pre * (pre > tables.thr).to(pre.dtype)
        resid = (hidden + residual).to(torch.float32)
        cpre = resid @ tables.c_enc.T + tables.c_bias
        cf = cpre * (cpre > tables.c_thr).to(cpre.dtype)
        n = idx.shape[0]
        g = phase.gen_index.unsqueeze(1)
        gate = (
            (tables.owner.unsqueeze(0) == idx.unsqueeze(1))
            & phase.member.gather(1, tables.mode.unsqueeze(0).expand(n, -1))
            & (g >= tables.win_lo)
            & (g < tables.win_hi)
            & (cf > tables.c_above)
            & (cf < tables.c_below)
        )
        coef = torch.where(gate, tables.target + tables.slope * f, torch.zeros_like(f))
        delta = delta + coef @ tables.dec
    return delta.to(residual.dtype)
