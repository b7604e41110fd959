"""The sparse training kernels give autograd's values and gradients, in both their sparse
and their dense branch, for every selection rule (architectures/sparse_ops.py)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch

from sae_training.architectures import sparse_ops
from sae_training.architectures.sparse_ops import (
    Active,
    batch_topk,
    positive,
    relu_encode,
    row_topk,
    sparse_decode,
    sparse_encode,
)

B, d, D = 16, 8, 32


def _params(g: torch.Generator, hot_zero: bool = False) -> dict[str, torch.Tensor]:
    p = {
        "W_enc": torch.randn(d, D, generator=g, dtype=torch.float64),
        "b_enc": torch.randn(D, generator=g, dtype=torch.float64),
        "b_dec": torch.randn(d, generator=g, dtype=torch.float64),
        "W_dec": torch.randn(D, d, generator=g, dtype=torch.float64),
    }
    if hot_zero:
        p["b_enc"][0] = 20.0  # feature 0 fires everywhere
    return p


def _dense_reference(rule: str, pre: torch.Tensor, k: int) -> torch.Tensor:
    """The dense ``f [B, D]`` each rule means, written the obvious way."""
    if rule == "topk":
        v, i = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    if rule == "batchtopk":
        v, i = pre.reshape(-1).topk(k * pre.shape[0])
        return torch.zeros(pre.numel(), dtype=pre.dtype).scatter(0, i, torch.relu(v)).view_as(pre)
    return torch.relu(pre)


RULES: dict[str, Callable[[torch.Tensor, int], Active]] = {
    "topk": lambda pre, k: row_topk(pre, k),
    "batchtopk": lambda pre, k: batch_topk(pre, k),
    "relu": lambda pre, k: positive(pre),
}


@pytest.mark.parametrize(
    ("rule", "hot_zero", "massive", "k", "branch"),
    [
        ("topk", False, False, 3, "sparse"),
        ("topk", True, False, 3, "sparse"),
        ("batchtopk", False, False, 3, "sparse"),
        ("batchtopk", True, False, 3, "sparse"),
        ("batchtopk", False, True, 1, "sparse"),
        ("batchtopk", False, False, 9, "sparse"),  # 4k >= d_sae: the flat selection
        ("relu", False, False, 0, "sparse"),
        ("relu", True, True, 0, "sparse"),
        ("relu", False, False, 0, "dense"),
        ("relu", True, True, 0, "dense"),
    ],
)
def test_encode_decode_match_autograd(
    rule: str, hot_zero: bool, massive: bool, k: int, branch: str, monkeypatch: Any
) -> None:
    """Values and all four gradients equal the dense autograd computation.

    ``massive`` gives one token 100x the norm, so it holds more of the batch's winners than
    the per-row candidate stage keeps (4k = 4 of 32 features): its whole row must join.
    ``branch`` forces the L1 SAE's sparse kernels or its dense path (:func:`relu_encode`).
    """
    monkeypatch.setattr(sparse_ops, "DENSE_ABOVE", 1.0 if branch == "sparse" else 0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, d, generator=g, dtype=torch.float64)
    if massive:
        x[0] *= 100.0
    params = _params(g, hot_zero)
    upstream = torch.randn(B, d, generator=g, dtype=torch.float64)
    l1_weight = torch.rand(D, generator=g, dtype=torch.float64)

    def grads(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Any:
        ps = {n: t.clone().requires_grad_(True) for n, t in params.items()}
        out = fn(ps)
        out.backward()
        return out.detach(), {n: t.grad for n, t in ps.items()}

    def ours(p: dict[str, torch.Tensor]) -> torch.Tensor:
        if rule == "relu":
            enc = relu_encode(x, p["b_dec"], p["W_enc"], p["b_enc"])
            assert isinstance(enc, torch.Tensor) == (branch == "dense")
            if isinstance(enc, torch.Tensor):
                recon = enc @ p["W_dec"] + p["b_dec"]
                return (recon * upstream).sum() + (enc * l1_weight).sum()
        a = sparse_encode(x, p["b_dec"], p["W_enc"], p["b_enc"], partial(RULES[rule], k=k))
        assert bool((a.crow[1:] >= a.crow[:-1]).all())
        if rule == "batchtopk":
            assert int((a.vals > 0).sum()) == k * B
        recon = sparse_decode(a, p["W_dec"]) + p["b_dec"]
        # a per-feature weighted L1 reaches the values through a gather, as the L1 SAE's does
        return (recon * upstream).sum() + (a.vals * l1_weight[a.cols]).sum()

    def reference(p: dict[str, torch.Tensor]) -> torch.Tensor:
        pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
        f = _dense_reference(rule, pre, k)
        recon = f @ p["W_dec"] + p["b_dec"]
        return (recon * upstream).sum() + (f * l1_weight).sum()

    out, g_ours = grads(ours)
    ref, g_ref = grads(reference)
    torch.testing.assert_close(out, ref)
    for name in params:
        torch.testing.assert_close(g_ours[name], g_ref[name], msg=name)


@pytest.mark.parametrize("seed", range(6))
def test_batch_topk_selects_exactly_the_flat_topk(seed: int) -> None:
    """The candidate stage with whole-row expansion picks the set a flat topk picks, in CSR
    order, for batches with zero, one or several massive tokens."""
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(64, 256, generator=g)
    pre[torch.randperm(64, generator=g)[: seed % 3]] *= 50.0
    k = 4
    a = batch_topk(pre, k)
    v, i = pre.reshape(-1).topk(k * 64)
    want = set(i[v > 0].tolist())
    rows = a.rows()
    got = (rows * 256 + a.cols).tolist()
    assert set(got) == want and len(got) == len(want)
    assert got == sorted(got)  # tokens in order, features ascending within a token
    torch.testing.assert_close(a.vals, pre[rows, a.cols])


def test_decode_bags_other_than_tokens() -> None:
    """The decoder sums any CSR bags (the Matryoshka levels use (level, token) bags);
    empty bags decode to zero."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(10, 4, generator=g)
    a = Active(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0, 5, 9]), torch.tensor([0, 2, 2, 3]))
    out = sparse_decode(a, W)
    torch.testing.assert_close(out, torch.stack([W[0] + 2 * W[5], torch.zeros(4), 3 * W[9]]))


def test_encoder_refuses_to_differentiate_the_data() -> None:
    g = torch.Generator().manual_seed(2)
    p = _params(g)
    x = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="input activations"):
        sparse_encode(x, p["b_dec"], p["W_enc"].requires_grad_(), p["b_enc"], positive)


def test_matryoshka_loss_is_the_sum_of_nested_prefix_losses() -> None:
    """Matryoshka's one-pass level decode equals decoding each prefix ``[0, w)`` of the
    dictionary densely (SAELens's definition), in value and in every gradient."""
    from sae_training.architectures import build

    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, d, generator=g)
    sae = build("matryoshka_batchtopk", d, D, k=4, matryoshka_widths=[3, 10, 20])
    assert sae.widths == [3, 10, 20, D]  # type: ignore[attr-defined]
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D, generator=g))
        sae.b_dec.copy_(torch.randn(d, generator=g))

    def grads(loss_fn: Callable[[], torch.Tensor]) -> Any:
        sae.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}

    def ours() -> torch.Tensor:
        return sae.training_forward(x, 0.0).loss

    def reference() -> torch.Tensor:
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        f = _dense_reference("batchtopk", pre, 4)
        return sum(
            ((f[:, :w] @ sae.W_dec[:w] + sae.b_dec - x).pow(2).sum(-1).mean() for w in sae.widths),  # type: ignore[attr-defined]
            torch.tensor(0.0),
        )

    out, g_ours = grads(ours)
    ref, g_ref = grads(reference)
    torch.testing.assert_close(out, ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], msg=name)


def test_matryoshka_widths_are_checked() -> None:
    from sae_training.architectures.matryoshka import check_widths, default_widths
    from sae_training.trainer import TrainConfig

    assert default_widths(9216) == [144, 576, 2304, 9216]
    assert check_widths([4, 8], 16) == [4, 8, 16]
    for bad, msg in (([], "empty"), ([8, 4], "increasing"), ([0, 4], "lie in"), ([32], "lie in")):
        with pytest.raises(ValueError, match=msg):
            check_widths(bad, 16)
    with pytest.raises(ValueError, match="only for --arch matryoshka"):
        TrainConfig(
            architecture="batchtopk", matryoshka_widths=[4], d_sae=16, k=2, train_tokens=8192
        )
    with pytest.raises(ValueError, match="increasing"):
        TrainConfig(
            architecture="matryoshka_batchtopk",
            matryoshka_widths=[8, 4],
            d_sae=16,
            k=2,
            train_tokens=8192,
        )


@pytest.mark.parametrize("massive", [0, 1, 3])
def test_batchtopk_calibration_is_the_pooled_batch_rule(massive: int) -> None:
    """The saved threshold is the (k * N)-th largest activation over the N sample tokens,
    however many of the batch's winners a few massive tokens hold."""
    from sae_training.architectures import build

    g = torch.Generator().manual_seed(massive)
    sae = build("batchtopk", d, 64, k=2)
    sample = torch.randn(300, d, generator=g)
    sample[:massive] *= 100.0
    sae.finalize(sample, chunk=64)  # type: ignore[call-arg]
    with torch.no_grad():
        pooled = torch.relu(sae.pre_acts(sample)).reshape(-1).topk(2 * 300).values.min()
    assert float(sae.threshold) == float(pooled)  # type: ignore[arg-type]


@pytest.mark.parametrize("branch", ["sparse", "dense"])
def test_standard_sae_loss_and_gradients_match_the_dense_formula(
    branch: str, monkeypatch: Any
) -> None:
    """The L1 SAE's training loss (MSE + coeff * sum f_i ||W_dec[i]||) and all gradients,
    on either path, equal the plain dense autograd computation."""
    from sae_training.architectures import build

    monkeypatch.setattr(sparse_ops, "DENSE_ABOVE", 1.0 if branch == "sparse" else 0.0)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(B, d, generator=g)
    sae = build("standard", d, D, l1_coeff=3.0, l1_warmup=0.5)
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(D, generator=g) - 0.5)

    def grads(loss_fn: Callable[[], torch.Tensor]) -> Any:
        sae.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in sae.named_parameters()}

    out = sae.training_forward(x, 0.25)
    f_ref = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert float(out.l0) == pytest.approx(float((f_ref > 0).sum()) / B)
    assert out.fired.equal((f_ref > 0).any(0))

    def reference() -> torch.Tensor:
        f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
        mse = (f @ sae.W_dec + sae.b_dec - x).pow(2).sum(-1).mean()
        return mse + 1.5 * (f * sae.W_dec.norm(dim=-1)).sum(-1).mean()

    loss, g_ours = grads(lambda: sae.training_forward(x, 0.25).loss)
    ref, g_ref = grads(reference)
    torch.testing.assert_close(loss, ref)
    for name in g_ref:
        torch.testing.assert_close(g_ours[name], g_ref[name], msg=name)
