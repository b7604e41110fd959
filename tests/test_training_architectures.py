"""Each architecture learns a synthetic sparse code, and its saved file encodes identically."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.activations import one_thread, synthetic_acts

from sae_steer_vllm.sae import SAE
from sae_training import MemoryActivations
from sae_training.architectures import ARCHITECTURES, build
from sae_training.trainer import RunOptions, TrainConfig, Trainer, export_sae

HPARAMS = {
    "standard": {"l1_coeff": 2.0, "lr": 1e-2, "train_tokens": 8 * 8192},
    "topk": {"k": 6, "lr": 3e-3, "train_tokens": 3 * 8192},
    "batchtopk": {"k": 6, "lr": 3e-3, "train_tokens": 3 * 8192},
    "matryoshka_batchtopk": {
        "k": 6,
        "lr": 3e-3,
        "train_tokens": 3 * 8192,
        "matryoshka_widths": [32, 96],
    },
}
MIN_EV = {"standard": 0.75, "topk": 0.85, "batchtopk": 0.85, "matryoshka_batchtopk": 0.85}
SAVED_AS = {
    "standard": "standard",
    "topk": "topk",
    "batchtopk": "jumprelu",
    "matryoshka_batchtopk": "jumprelu",
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_trains_and_round_trips(arch: str, tmp_path: Path) -> None:
    acts = synthetic_acts()
    cfg = TrainConfig(
        architecture=arch, d_sae=128, batch_size=256, norm_tokens=4096, **HPARAMS[arch]
    )
    with one_thread():
        result = Trainer(
            cfg, MemoryActivations(acts), tmp_path, RunOptions(log_every=8, progress=False)
        ).train()
    hist = result.history
    assert result.steps == cfg.total_steps
    assert hist[-1]["loss"] < 0.75 * max(h["loss"] for h in hist), hist  # after the L1 warm-up peak
    assert hist[-1]["explained_variance"] > MIN_EV[arch], hist[-1]
    assert 0 < hist[-1]["l0"] <= 20, hist[-1]
    sae = export_sae(result, hook_layer=3, model_name="synthetic")
    sae.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.cfg.architecture == SAVED_AS[arch]
    assert loaded.W_enc.shape == (32, 128) and loaded.W_dec.shape == (128, 32)
    x = acts[:512]
    with torch.no_grad():
        # Raw-space SAE on x == training-space SAE on x*scale (scale folded in), divided back.
        pre = result.sae.pre_acts(x * result.scale)
        f_loaded = loaded.encode(x)
        recon = loaded(x)
    if arch == "topk":
        vals, idx = pre.topk(6, dim=-1)
        f_train = torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        thr = float(result.sae.threshold)
        f_train = torch.where(pre > thr, pre, torch.zeros_like(pre))
        # the threshold is calibrated on the normalisation sample (the first 4096
        # tokens): there, the saved JumpReLU keeps exactly k features per token on average
        with torch.no_grad():
            l0 = (loaded.encode(acts[: cfg.norm_tokens]) > 0).sum(-1).float().mean()
        assert abs(float(l0) - 6) < 0.01, float(l0)
        assert result.finalized["threshold_calibrated"] == pytest.approx(thr)
    else:
        f_train = torch.relu(pre)
    torch.testing.assert_close(f_loaded, f_train, atol=1e-4, rtol=1e-4)
    ev = 1 - (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert (
        ev > MIN_EV[arch] - 0.1
    )  # batchtopk at inference uses one threshold instead of the batch rule


def test_l1_warmup_and_lr_schedule() -> None:
    cfg = TrainConfig(train_tokens=100 * 4096, lr=1.0, lr_warmup=0.1, lr_decay=0.2)
    assert cfg.lr_at(0) == pytest.approx(0.1)
    assert cfg.lr_at(9) == pytest.approx(1.0)
    assert cfg.lr_at(50) == 1.0
    assert cfg.lr_at(80) == pytest.approx(1.0)
    assert cfg.lr_at(99) == pytest.approx(0.05)
    sae = build("standard", 8, 16, l1_coeff=5.0, l1_warmup=0.05)
    assert sae.current_l1(0.0) == 0.0  # type: ignore[attr-defined]
    assert sae.current_l1(0.025) == pytest.approx(2.5)  # type: ignore[attr-defined]
    assert sae.current_l1(0.5) == 5.0  # type: ignore[attr-defined]


def test_unit_norm_decoder_kept_and_encoder_is_transpose_at_init() -> None:
    sae = build("topk", 16, 64, k=4)
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    out = sae.training_forward(torch.randn(32, 16), 0.0)
    out.loss.backward()
    sae.before_optimizer_step()
    opt.step()
    sae.after_optimizer_step()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    std = build("standard", 16, 64, init_dec_norm=0.1)
    torch.testing.assert_close(std.W_dec.norm(dim=1), torch.full((64,), 0.1))


def test_unknown_architecture_and_bad_config() -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build("gated", 8, 16)
    with pytest.raises(ValueError, match="less than one batch"):
        TrainConfig(train_tokens=10, batch_size=4096)
    with pytest.raises(ValueError, match="exceeds d_sae"):
        TrainConfig(architecture="topk", d_sae=8, k=16, train_tokens=8192)


def test_grad_clip_is_applied_each_step(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[float] = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **kw):  # type: ignore[no-untyped-def]
        calls.append(float(max_norm))
        return real(params, max_norm, *a, **kw)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    acts = synthetic_acts()[:2048]
    cfg = TrainConfig(
        architecture="standard", d_sae=64, batch_size=256, train_tokens=1024, norm_tokens=1024
    )
    steps = cfg.total_steps

    def run(name: str, **update: object) -> list[float]:
        calls.clear()
        c = TrainConfig(**{**cfg.model_dump(), **update})
        Trainer(c, MemoryActivations(acts), tmp_path / name, RunOptions(progress=False)).train()
        return list(calls)

    assert run("std") == [1.0] * steps  # standard clips at 1.0 by default, as SAELens
    assert run("std-off", grad_clip=0.0) == []
    assert run("std-half", grad_clip=0.5) == [0.5] * steps
    assert run("topk", architecture="topk", k=4) == []  # k-sparse: off by default
    assert run("topk-on", architecture="topk", k=4, grad_clip=2.0) == [2.0] * steps


def test_reconstruction_metrics_report_typical_tokens_apart_from_massive_ones() -> None:
    """One "massive activation" token can hold most of the variance: the plain EV then
    says little about the other tokens, which ``explained_variance_typical`` measures."""
    from sae_steer_vllm.sae import SAEConfig
    from sae_training.evaluation import reconstruction_metrics

    d = 4
    eye = torch.eye(d)
    sae = SAE(
        SAEConfig(d_in=d, d_sae=d, architecture="standard", hook_layer=0),
        eye.clone(),
        torch.zeros(d),
        eye.clone(),
        torch.zeros(d),
    )
    g = torch.Generator().manual_seed(0)
    typical = -torch.rand(99, d, generator=g) - 0.5  # negative: ReLU features never fire
    massive = torch.full((1, d), 500.0)  # positive: reconstructed exactly
    m = reconstruction_metrics(sae, torch.cat([typical, massive]))
    assert m["explained_variance"] > 0.95
    assert m["explained_variance_typical"] < 0.0  # reconstructs 0 for tokens far from the mean
    assert m["typical_fraction"] == pytest.approx(0.99)
    assert m["l0_typical"] == 0.0 and m["l0"] == pytest.approx(0.04)
