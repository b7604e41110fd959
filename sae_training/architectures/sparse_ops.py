"""Sparse kernels for k-sparse encoders on CPU (and GPU), in plain torch.

A TopK encoder's forward needs the dense ``[B, d_in] @ [d_in, d_sae]``
product to find the k winners, but its backward does not: only k of d_sae
pre-activations per token receive gradient. Autograd through ``torch.topk``
scatters that gradient into a dense ``[B, d_sae]`` matrix and pays a second
full matmul for ``dL/dW_enc``; :class:`KSparseEncode` computes it as a sparse
``[d_sae, B] @ [B, d_in]`` product instead (5x less time at k=64 of 9216 on
this machine). This is the CPU counterpart of sparsify's Triton kernels.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

Selection = tuple[torch.Tensor, torch.Tensor]


@contextmanager
def _quiet_sparse() -> Iterator[None]:
    """Silence torch's notices about its sparse formats around our own use of them only
    (CSR is "beta"; invariant checks are off on purpose), not for the whole process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
        yield


def _row_topk(pre: torch.Tensor, k: int) -> Selection:
    """TopK's rule: each row's ``k`` largest pre-activations, ReLU'd."""
    vals, idx = pre.topk(k, dim=-1, sorted=False)
    return torch.relu(vals), idx


class KSparseEncode(torch.autograd.Function):
    """``select((x - b_dec) @ W_enc + b_enc)`` -> ``(vals [B, k], idx [B, k])``, sparse backward.

    ``select`` picks each token's winners (:func:`_row_topk` for TopK,
    :func:`_padded_batch_topk` for BatchTopK) with values already ReLU'd; entries with
    value 0 get no gradient. ``x`` itself gets no gradient (activations are data), which
    lets the ``b_dec`` gradient be one mat-vec: ``-W_enc @ dL/db_enc``.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        b_dec: torch.Tensor,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        select: Callable[[torch.Tensor], Selection],
    ) -> Selection:  # type: ignore[override]
        x_c = x - b_dec
        vals, idx = select(torch.addmm(b_enc, x_c, W_enc))
        ctx.save_for_backward(x_c, W_enc, vals, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx: Any, grad_vals: torch.Tensor, _grad_idx: Any) -> tuple[Any, ...]:  # type: ignore[override]
        with _quiet_sparse():
            x_c, W_enc, vals, idx = ctx.saved_tensors
            g = grad_vals * (vals > 0)
            B, k = idx.shape
            d_sae = W_enc.shape[1]
            flat_idx, flat_g = idx.reshape(-1), g.reshape(-1)
            grad_W = grad_b = grad_bdec = None
            if ctx.needs_input_grad[2]:
                rows = torch.arange(B, device=idx.device).repeat_interleave(k)
                G_t = torch.sparse_coo_tensor(
                    torch.stack([flat_idx, rows]), flat_g, (d_sae, B), check_invariants=False
                )
                grad_W = torch.sparse.mm(G_t, x_c).T  # [d_in, d_sae] view of a [d_sae, d_in] result
            if ctx.needs_input_grad[3] or ctx.needs_input_grad[1]:
                grad_b = torch.zeros(d_sae, dtype=g.dtype, device=g.device).index_add_(
                    0, flat_idx, flat_g
                )
                if ctx.needs_input_grad[1]:
                    grad_bdec = -(W_enc @ grad_b)
            if ctx.needs_input_grad[0]:
                raise RuntimeError(
                    "KSparseEncode does not differentiate with respect to the input activations"
                )
            return None, grad_bdec, grad_W, grad_b, None


def topk_encode(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> Selection:
    """``(vals [B, k], idx [B, k])``: each token's ``k`` largest pre-activations."""
    out: Selection = KSparseEncode.apply(x, b_dec, W_enc, b_enc, partial(_row_topk, k=k))  # type: ignore[no-untyped-call]
    return out


def _padded_batch_topk(pre: torch.Tensor, k: int) -> Selection:
    """BatchTopK's rule: the ``k * B`` largest pre-activations of the whole batch.

    Tokens keep a varying number of features, so the result is padded to the
    largest count in the batch (``[B, kmax]``; padding has value 0 at index 0,
    which gets no gradient because the backward masks ``vals > 0``). In that
    shape :class:`KSparseEncode`'s sparse backward and :class:`SparseDecode` apply
    unchanged, so BatchTopK trains at TopK's speed instead of paying for the
    dense ``[B, d_sae]`` gradient that autograd through a flat ``topk`` builds.
    """
    B = pre.shape[0]
    rows, cols, flat_vals = _batch_topk(pre, k)
    order = torch.argsort(rows, stable=True)
    rows, cols, flat_vals = rows[order], cols[order], flat_vals[order]
    counts = torch.bincount(rows, minlength=B)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(rows.numel(), device=pre.device) - starts[rows]
    kmax = max(int(counts.max()) if rows.numel() else 0, 1)
    idx = torch.zeros(B, kmax, dtype=torch.long, device=pre.device)
    vals = torch.zeros(B, kmax, dtype=pre.dtype, device=pre.device)
    idx[rows, slot] = cols
    vals[rows, slot] = flat_vals
    return vals, idx


def _batch_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, cols, values) of the ``k * B`` largest positive entries of ``pre [B, d_sae]``.

    A flat ``topk`` over all ``B * d_sae`` values is ~10x slower on CPU than a row-wise
    one, so candidates come from each row's ``8k`` largest first. That is exact unless a
    row could hold more winners than its candidates (its smallest candidate reaches the
    batch threshold: e.g. one "massive activation" token taking most of the batch's
    budget); then the flat ``topk`` over everything runs instead.
    """
    B, d_sae = pre.shape
    n_keep = min(k * B, B * d_sae)
    k1 = min(d_sae, 8 * k)
    if k1 < d_sae:
        cand_vals, cand_idx = pre.topk(k1, dim=-1, sorted=False)
        vals, pos = cand_vals.reshape(-1).topk(n_keep, sorted=False)
        if not bool((cand_vals.min(dim=-1).values >= vals.min()).any()):
            rows = torch.div(pos, k1, rounding_mode="floor")
            cols = cand_idx.reshape(-1)[pos]
            keep = vals > 0
            return rows[keep], cols[keep], vals[keep]
    vals, flat_idx = pre.reshape(-1).topk(n_keep, sorted=False)
    keep = vals > 0
    vals, flat_idx = vals[keep], flat_idx[keep]
    rows = torch.div(flat_idx, d_sae, rounding_mode="floor")
    return rows, flat_idx - rows * d_sae, vals


def batchtopk_encode(
    x: torch.Tensor, b_dec: torch.Tensor, W_enc: torch.Tensor, b_enc: torch.Tensor, k: int
) -> Selection:
    """``(vals [B, kmax], idx [B, kmax])``, zero-padded; see :func:`_padded_batch_topk`."""
    select = partial(_padded_batch_topk, k=k)
    out: Selection = KSparseEncode.apply(x, b_dec, W_enc, b_enc, select)  # type: ignore[no-untyped-call]
    return out


class SparseDecode(torch.autograd.Function):
    """``sum_j vals[:, j] * W_dec[idx[:, j]]`` with a sparse backward.

    ``embedding_bag``'s own backward sorts all indices and fills a dense
    gradient (0.6 s per step at B=1024 here); this one computes
    ``dL/dW_dec`` as a sparse ``[d_sae, B] @ [B, d_in]`` product and
    ``dL/dvals`` with ``sampled_addmm`` (only the B*k needed dot products).
    """

    @staticmethod
    def forward(
        ctx: Any, idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor
    ) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(idx, vals, W_dec)
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        with _quiet_sparse():
            idx, vals, W_dec = ctx.saved_tensors
            B, k = idx.shape
            d_sae = W_dec.shape[0]
            grad_vals = grad_W = None
            if ctx.needs_input_grad[1]:
                sidx, order = idx.sort(dim=1)
                crow = torch.arange(0, B * k + 1, k, device=idx.device)
                pattern = torch.sparse_csr_tensor(
                    crow,
                    sidx.reshape(-1),
                    torch.zeros(B * k, dtype=vals.dtype, device=vals.device),
                    (B, d_sae),
                )
                sampled = torch.sparse.sampled_addmm(
                    pattern, grad_out.contiguous(), W_dec.T, beta=0.0
                )
                grad_vals = torch.empty_like(vals).scatter_(1, order, sampled.values().view(B, k))
            if ctx.needs_input_grad[2]:
                rows = torch.arange(B, device=idx.device).repeat_interleave(k)
                V_t = torch.sparse_coo_tensor(
                    torch.stack([idx.reshape(-1), rows]),
                    vals.reshape(-1),
                    (d_sae, B),
                    check_invariants=False,
                )
                grad_W = torch.sparse.mm(V_t, grad_out)
            return None, grad_vals, grad_W


def sparse_decode_rows(idx: torch.Tensor, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = SparseDecode.apply(idx, vals, W_dec)  # type: ignore[no-untyped-call]
    return out
