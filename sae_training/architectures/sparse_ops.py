"""Sparse kernels for SAEs whose features are mostly inactive, on CPU and GPU, in plain torch.

Every architecture here activates few of its ``d_sae`` features per token: k of them for
TopK and BatchTopK, a few hundred of 9,216 for a trained L1 SAE. The encoder's forward still
needs the dense ``[B, d_in] @ [d_in, d_sae]`` product to find them, but nothing else does:
the decoder reads only the active rows, and in the backward only the active
pre-activations receive gradient. Autograd through a dense ``f @ W_dec`` (or through
``torch.topk``) pays three more full products (the decoder, its two gradients, the
encoder's weight gradient) and builds dense ``[B, d_sae]`` gradients; the functions below
compute each of them from the active entries alone (this is the CPU counterpart of
sparsify's Triton kernels).

The active entries of a batch are an :class:`Active`: flat values, feature indices and
CSR row offsets, rows in order and features ascending within a row. A variable number per
token needs no padding (BatchTopK, L1), and CSR is what ``embedding_bag`` (decoder
forward) and ``sampled_addmm`` (gradient of the values) take directly. When a batch is
dense after all (an L1 SAE early in training has half its features active), the L1 SAE
gets a dense ``[B, d_sae]`` tensor and dense products instead (:func:`relu_encode`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

#: Above this fraction of positive entries the L1 SAE runs dense (:func:`relu_encode`). Measured at
#: B=1024, 9,216 features, d_in 576 on 2 CPU cores: a dense product takes ~110 ms; the sparse
#: kernels of one step take ~25 ms at 0.7% active (TopK k=64), ~100 ms at 4%, ~250 ms at 11%
#: against ~450 ms dense, so they break even near 20%; the switch sits a little below.
DENSE_ABOVE = 0.15


class Active(NamedTuple):
    """A batch's active features in CSR order: token ``b`` owns entries
    ``crow[b]:crow[b + 1]`` of ``vals`` (ReLU'd, may hold zeros that get no gradient)
    and ``cols`` (feature indices, ascending within a token)."""

    vals: torch.Tensor
    cols: torch.Tensor
    crow: torch.Tensor
    #: a stable argsort of ``cols`` (the entries feature by feature) when already known:
    #: the encoder's and the decoder's weight gradients both need it, so it is sorted once
    by_feature: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.crow.numel() - 1

    def rows(self) -> torch.Tensor:
        """The token of each entry."""
        return rows_of(self.crow, self.cols.numel())


def rows_of(crow: torch.Tensor, n: int) -> torch.Tensor:
    """The row (token, or bag) of each of the ``n`` entries that ``crow`` delimits."""
    counts = crow[1:] - crow[:-1]
    return torch.repeat_interleave(
        torch.arange(counts.numel(), device=crow.device), counts, output_size=n
    )


def features_fired(cols: torch.Tensor, d_sae: int) -> torch.Tensor:
    """``[d_sae]`` bool: which features appear among the active entries ``cols``."""
    fired = torch.zeros(d_sae, dtype=torch.bool, device=cols.device)
    fired[cols] = True
    return fired


def crow_of(counts: torch.Tensor) -> torch.Tensor:
    """CSR row offsets for rows holding ``counts`` entries each."""
    return F.pad(torch.cumsum(counts, 0), (1, 0))


@contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silence torch's notices about its sparse formats around our own use of them only
    (CSR is "beta"; invariant checks are off on purpose), not for the whole process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


# ------------------------------------------------------------------ selection rules
def row_topk(pre: torch.Tensor, k: int) -> Active:
    """TopK's rule: each token's ``k`` largest pre-activations, ReLU'd."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    cols, order = idx.sort(dim=-1)
    vals = torch.relu(vals.gather(-1, order))
    crow = torch.arange(0, pre.shape[0] * k + 1, k, device=pre.device)
    return Active(vals.reshape(-1), cols.reshape(-1), crow)


def positive(pre: torch.Tensor, mask: torch.Tensor | None = None) -> Active:
    """ReLU's rule: every positive pre-activation (the standard SAE); ``mask`` is
    ``pre > 0`` when the caller has it already."""
    B, d_sae = pre.shape
    flat = (pre > 0 if mask is None else mask).view(-1).nonzero().squeeze(1)  # row-major
    # the row offsets without a pass over the dense mask: where each row starts in ``flat``
    bounds = torch.arange(0, (B + 1) * d_sae, d_sae, device=pre.device)
    return Active(pre.view(-1)[flat], flat % d_sae, torch.searchsorted(flat, bounds))


def batch_topk(pre: torch.Tensor, k: int) -> Active:
    """BatchTopK's rule: the ``k * B`` largest positive pre-activations of the whole batch.

    A flat ``topk`` over all ``B * d_sae`` values is ~10x slower on CPU than a row-wise one,
    so candidates come from each token's ``4k`` largest first. A token whose smallest
    candidate reaches the threshold those candidates give (a "massive activation" taking
    most of the batch's budget) may hold more winners: its whole row joins the candidates
    and the selection is repeated. That is exact, because more candidates can only raise the
    threshold, so the other tokens' dropped values stay below it.
    """
    B, d_sae = pre.shape
    n_keep = min(k * B, B * d_sae)
    k1 = min(d_sae, 4 * k)
    if k1 < d_sae:
        cand_vals, cand_idx = pre.topk(k1, dim=-1, sorted=False)
        vals, pos = cand_vals.reshape(-1).topk(n_keep, sorted=False)
        full = cand_vals.min(dim=-1).values >= vals.min()
        rows = torch.div(pos, k1, rounding_mode="floor")
        cols = cand_idx.reshape(-1)[pos]
        if bool(full.any()):
            part = ~full
            full_rows = full.nonzero().squeeze(1)
            n_part = int(part.sum()) * k1
            cand = torch.cat([cand_vals[part].reshape(-1), pre[full_rows].reshape(-1)])
            vals, pos = cand.topk(min(n_keep, cand.numel()), sorted=False)
            in_part = pos < n_part
            part_rows = part.nonzero().squeeze(1)
            p_pos, f_pos = pos[in_part], pos[~in_part] - n_part
            rows = torch.cat(
                [
                    part_rows[torch.div(p_pos, k1, rounding_mode="floor")],
                    full_rows[torch.div(f_pos, d_sae, rounding_mode="floor")],
                ]
            )
            cols = torch.cat([cand_idx[part].reshape(-1)[p_pos], f_pos % d_sae])
            vals = torch.cat([vals[in_part], vals[~in_part]])
    else:
        vals, flat = pre.reshape(-1).topk(n_keep, sorted=False)
        rows, cols = torch.div(flat, d_sae, rounding_mode="floor"), flat % d_sae
    keep = vals > 0
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    order = torch.argsort(rows * d_sae + cols)
    return Active(vals[order], cols[order], crow_of(torch.bincount(rows, minlength=B)))


# ------------------------------------------------------------------ encoder
def _pre_acts(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x - b_dec, (x - b_dec) @ W_enc + b_enc)`` outside autograd: the encode functions
    below take them as data and differentiate the weights themselves. ``x`` gets no
    gradient (activations are data), which lets the ``b_dec`` gradient be one mat-vec:
    ``-W_enc @ dL/db_enc``."""
    if x.requires_grad:
        raise RuntimeError("the SAE encoders do not differentiate the input activations")
    with torch.no_grad():
        x_c = x - b_dec
        return x_c, torch.addmm(b_enc, x_c, W_enc)


def _encoder_grads(
    ctx: Any,
    x_c: torch.Tensor,
    W_enc: torch.Tensor,
    grad_W: Callable[[], torch.Tensor],
    grad_b: torch.Tensor,
) -> tuple[Any, Any, Any]:
    """``(dL/db_dec, dL/dW_enc, dL/db_enc)`` as far as they are needed (inputs 2-4)."""
    need_bdec, need_W, need_b = ctx.needs_input_grad[2:5]
    return (
        -(W_enc @ grad_b) if need_bdec else None,
        grad_W() if need_W else None,
        grad_b if need_b else None,
    )


class SparseEncode(torch.autograd.Function):
    """``select(pre)`` -> :class:`Active`, with a sparse backward: only the selected
    entries with a positive value get gradient, and ``dL/dW_enc`` touches only them."""

    @staticmethod
    def forward(
        ctx: Any,
        x_c: torch.Tensor,
        pre: torch.Tensor,
        b_dec: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        select: Callable[[torch.Tensor], Active],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # type: ignore[override]
        a = select(pre)
        order = torch.argsort(a.cols, stable=True)
        ctx.save_for_backward(x_c, W_enc, a.vals, a.cols, a.crow, order)
        ctx.mark_non_differentiable(a.cols, a.crow, order)
        return a.vals, a.cols, a.crow, order

    @staticmethod
    def backward(ctx: Any, grad_vals: torch.Tensor, *_: Any) -> tuple[Any, ...]:  # type: ignore[override]
        x_c, W_enc, vals, cols, crow, order = ctx.saved_tensors
        g = grad_vals * (vals > 0)
        d_sae = W_enc.shape[1]
        grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(0, cols, g)
        grads = _encoder_grads(
            ctx,
            x_c,
            W_enc,
            # [d_sae, d_in] seen as [d_in, d_sae]: the encoder's own layout (base.py)
            lambda: _weight_grad(g, cols, crow, x_c, d_sae, order).T,
            grad_b,
        )
        return None, None, *grads, None


class DenseReluEncode(torch.autograd.Function):
    """``relu(pre)`` as a dense ``[B, d_sae]`` tensor: the L1 SAE while most features fire."""

    @staticmethod
    def forward(
        ctx: Any,
        x_c: torch.Tensor,
        pre: torch.Tensor,
        b_dec: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
    ) -> torch.Tensor:  # type: ignore[override]
        f = torch.relu(pre)
        ctx.save_for_backward(x_c, W_enc, f)
        return f

    @staticmethod
    def backward(ctx: Any, grad_f: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x_c, W_enc, f = ctx.saved_tensors
        g = grad_f * (f > 0)
        # (g.T @ x_c).T: the gradient in the encoder's feature-major layout (base.py)
        return None, None, *_encoder_grads(ctx, x_c, W_enc, lambda: (g.T @ x_c).T, g.sum(0))


def _weight_grad(
    g: torch.Tensor,
    cols: torch.Tensor,
    crow: torch.Tensor,
    dense: torch.Tensor,
    d_sae: int,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``G^T @ dense`` -> ``[d_sae, d]`` for the sparse ``G [rows, d_sae]`` given in CSR.

    Sparse: row ``j`` of the result is the ``g``-weighted sum of the ``dense`` rows of the
    tokens where feature ``j`` is active, which is an ``embedding_bag`` over the entries
    sorted by feature (4-7x faster here than ``torch.sparse.mm`` of the transposed COO
    matrix, 2.5x than MKL's CSR product).
    """
    rows = rows_of(crow, cols.numel())
    if order is None:
        order = torch.argsort(cols, stable=True)
    ccol = crow_of(torch.bincount(cols, minlength=d_sae))
    return F.embedding_bag(
        rows[order],
        dense,
        ccol,
        per_sample_weights=g[order],
        mode="sum",
        include_last_offset=True,
    )


def sparse_encode(
    x: torch.Tensor,
    b_dec: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    select: Callable[[torch.Tensor], Active],
) -> Active:
    """The entries ``select`` picks from ``(x - b_dec) @ W_enc + b_enc``, differentiable in
    ``b_dec``, ``W_enc`` and ``b_enc``."""
    x_c, pre = _pre_acts(x, b_dec, W_enc, b_enc)
    return Active(*SparseEncode.apply(x_c, pre, b_dec, W_enc, b_enc, select))  # type: ignore[no-untyped-call]


def topk_encode(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> Active:
    """Each token's ``k`` largest pre-activations (:func:`row_topk`)."""
    return sparse_encode(x, b_dec, W_enc, b_enc, partial(row_topk, k=k))


def batchtopk_encode(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> Active:
    """The batch's ``k * B`` largest pre-activations (:func:`batch_topk`)."""
    return sparse_encode(x, b_dec, W_enc, b_enc, partial(batch_topk, k=k))


def relu_encode(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor
) -> Active | torch.Tensor:
    """``relu((x - b_dec) @ W_enc + b_enc)``: the positive entries as an :class:`Active`
    when at most :data:`DENSE_ABOVE` of them are positive, else the dense ``[B, d_sae]``
    tensor (a pure function of the batch, so a resumed run takes the same path)."""
    x_c, pre = _pre_acts(x, b_dec, W_enc, b_enc)
    mask = pre > 0
    if int(torch.count_nonzero(mask)) > DENSE_ABOVE * pre.numel():
        f: torch.Tensor = DenseReluEncode.apply(x_c, pre, b_dec, W_enc, b_enc)  # type: ignore[no-untyped-call]
        return f
    select = partial(positive, mask=mask)
    return Active(*SparseEncode.apply(x_c, pre, b_dec, W_enc, b_enc, select))  # type: ignore[no-untyped-call]


# ------------------------------------------------------------------ decoder
class SparseDecode(torch.autograd.Function):
    """Bag ``b`` -> ``sum_j vals[j] * W_dec[cols[j]]`` over its entries
    ``crow[b]:crow[b + 1]``, with a sparse backward.

    A bag is usually a token; the Matryoshka SAE decodes (level, token) bags. Forward is
    ``embedding_bag`` (gathers only the active rows). Backward: ``dL/dvals`` with
    ``sampled_addmm`` (only the needed dot products), ``dL/dW_dec`` as another
    ``embedding_bag``, over the entries sorted by feature (``embedding_bag``'s own backward
    fills a dense gradient: 0.6 s per step at B=1024 here).
    """

    @staticmethod
    def forward(
        ctx: Any,
        vals: torch.Tensor,
        cols: torch.Tensor,
        crow: torch.Tensor,
        by_feature: torch.Tensor | None,
        W_dec: torch.Tensor,
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(vals, cols, crow, by_feature, W_dec)
        return F.embedding_bag(
            cols, W_dec, crow, per_sample_weights=vals, mode="sum", include_last_offset=True
        )

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        vals, cols, crow, by_feature, W_dec = ctx.saved_tensors
        n_bags, d_sae = crow.numel() - 1, W_dec.shape[0]
        grad_out = grad_out.contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            with _quiet_sparse():
                pattern = torch.sparse_csr_tensor(
                    crow, cols, torch.zeros_like(vals), (n_bags, d_sae)
                )
                grad_vals = torch.sparse.sampled_addmm(
                    pattern, grad_out, W_dec.T, beta=0.0
                ).values()
        if ctx.needs_input_grad[4]:
            grad_W = _weight_grad(vals, cols, crow, grad_out, d_sae, by_feature)
        return grad_vals, None, None, None, grad_W


def sparse_decode(a: Active, W_dec: torch.Tensor) -> torch.Tensor:
    """``[bags, d_in]``: each bag's active decoder rows, weighted and summed (no bias)."""
    out: torch.Tensor = SparseDecode.apply(a.vals, a.cols, a.crow, a.by_feature, W_dec)  # type: ignore[no-untyped-call]
    return out
