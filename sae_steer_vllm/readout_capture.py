"""The in-graph half of the readout: copy each step's resid_post at a layer into a buffer.

The model cannot compute top-k features inside vLLM's compiled, static-shape graph for
only the tokens that asked (that needs data-dependent shapes, and encoding every token
of an 8k-token prefill chunk against 65k features would need gigabytes). So the graph
only copies ``hidden + residual`` (resid_post *before* this layer's intervention: what
the SAE itself sees) and the token positions into persistent buffers, at a cost of one
``[n, d]`` copy per readout layer; :mod:`sae_steer_vllm.readout_worker` then encodes the
rows of the requests that read, eagerly, after the forward.

The copy is a custom op that declares what it mutates, so torch.compile treats it as an
opaque write to a graph input (no functionalisation copy-back of the whole buffer), and
CUDA graphs replay it into the same fixed addresses.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("sae_steer::capture_rows", mutates_args=("out", "out_pos"))
def capture_rows(
    x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, out_pos: torch.Tensor
) -> None:
    """``out[:n] = x`` and ``out_pos[:n] = positions`` (``n`` = tokens in this step)."""
    n = x.shape[0]
    out[:n].copy_(x)
    out_pos[:n].copy_(positions)


@capture_rows.register_fake
def _capture_rows_fake(
    x: torch.Tensor, positions: torch.Tensor, out: torch.Tensor, out_pos: torch.Tensor
) -> None:
    return None


class ReadoutCapture(torch.nn.Module):
    """One readout layer's buffers: resid_post per token (model dtype) and the shared
    position buffer (int64), both ``max_tokens`` long."""

    resid: torch.Tensor
    pos: torch.Tensor

    def __init__(self, max_tokens: int, d_model: int, dtype: torch.dtype, pos: torch.Tensor):
        super().__init__()
        self.register_buffer(
            "resid", torch.zeros(max_tokens, d_model, dtype=dtype), persistent=False
        )
        self.register_buffer("pos", pos, persistent=False)

    def forward(self, resid_post: torch.Tensor, positions: torch.Tensor) -> None:
        torch.ops.sae_steer.capture_rows(resid_post, positions, self.resid, self.pos)
