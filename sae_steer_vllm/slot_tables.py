"""Per-token steering inside the model: slot tables and the op applied after a decoder layer.

Every running request owns a *slot* (0 = unsteered, all zeros). Each forward,
the worker writes ``tok_slot[t]`` = slot of token ``t``; the decoder-layer hook
then gathers that slot's add vector and clamp rows. The tables are persistent
buffers registered on the layers and only ever written in place, so a
torch.compile graph (or a CUDA graph) traced while they were zero still reads
the current values: buffers are graph inputs, not constants.

Unsteered tokens get an exact ``+ 0.0``: their outputs are bit-identical to a
model without the plugin.
"""

from __future__ import annotations

import torch

from .steering_plan import LayerPlan, PositionMode

# plain ints: the gate is traced into the compiled graph, where they are constants
_ALL, _PROMPT, _GENERATED = (
    int(PositionMode.ALL),
    int(PositionMode.PROMPT),
    int(PositionMode.GENERATED),
)


class LayerTables(torch.nn.Module):
    """The steering state of one decoder layer, for every slot at once.

    ``add``: ``[S, d]`` (model dtype), summed add-mode/vector contributions.
    Clamp rows (only on layers with a clampable SAE), ``E = (S - 1) * K`` entries,
    entry ``e`` belonging to slot ``1 + e // K``: encoder column, effective
    bias, threshold, decoder row and target (float32, for an exact encode);
    ``resid_keep``: ``[S]`` (model dtype), 1 where the slot's clamps read resid_post,
    0 where they read the MLP output (spec ``site: mlp_out``).
    """

    add: torch.Tensor
    enc: torch.Tensor
    dec: torch.Tensor
    bias: torch.Tensor
    thr: torch.Tensor
    target: torch.Tensor
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
        rows = plan.clamps if plan is not None else []
        mlp_out = plan is not None and plan.clamp_site == "mlp_out"
        self.resid_keep[slot] = 0.0 if mlp_out else 1.0
        if len(rows) > self.k:
            raise ValueError(f"{len(rows)} clamps exceed {self.k} per layer")
        for j in range(self.k):
            e = lo + j
            if j < len(rows):
                r = rows[j]
                self.enc[e].copy_(r.enc)
                self.dec[e].copy_(r.dec)
                self.bias[e] = r.bias
                self.thr[e] = r.threshold
                self.target[e] = r.target
            else:
                self.enc[e].zero_()
                self.dec[e].zero_()
                self.bias[e] = 0.0
                self.thr[e] = 0.0
                self.target[e] = 0.0


def steering_delta(
    tables: LayerTables,
    idx: torch.Tensor,
    gate: torch.Tensor,
    hidden: torch.Tensor,
    residual: torch.Tensor,
) -> torch.Tensor:
    """The change to the residual stream for each token ([n, d], model dtype).

    ``idx``: slot per token; ``gate``: 1.0 where the request's ``positions``
    setting admits the token. ``hidden`` is the layer's MLP output, ``residual`` the
    stream before it: a clamp encodes their sum (resid_post), or ``hidden`` alone where
    the slot's ``resid_keep`` is 0 (``site: mlp_out``; ``x 1.0`` and ``+ 0.0`` are exact,
    so resid_post is computed as it was without sites). Written with static shapes only,
    so it traces once into the compiled graph for every batch size.
    """
    delta = tables.add[idx].to(torch.float32)
    if tables.has_clamp:
        keep = tables.resid_keep[idx].unsqueeze(1)
        h = (hidden + residual * keep).to(torch.float32)  # only where a clamp needs it
        pre = h @ tables.enc.T + tables.bias  # [n, E]
        f = pre * (pre > tables.thr).to(pre.dtype)
        own = tables.owner.unsqueeze(0) == idx.unsqueeze(1)  # [n, E]
        coef = torch.where(own, tables.target - f, torch.zeros_like(f))
        delta = delta + coef @ tables.dec
    return (delta * gate.unsqueeze(1)).to(residual.dtype)


def position_gate(
    positions: torch.Tensor,
    idx: torch.Tensor,
    slot_mode: torch.Tensor,
    slot_prompt_len: torch.Tensor,
) -> torch.Tensor:
    """1.0 for tokens the request's ``positions`` setting (:class:`PositionMode`) steers."""
    mode = slot_mode[idx]
    is_prompt = positions < slot_prompt_len[idx]
    keep = (mode == _ALL) | ((mode == _PROMPT) & is_prompt) | ((mode == _GENERATED) & ~is_prompt)
    return keep.to(torch.float32)
