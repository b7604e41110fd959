"""Checkpoints: exact resume, config mismatch, NaN stop, never clobbering a good checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.activations import one_thread, synthetic_acts

from sae_training import MemoryActivations, TrainJob, run_training
from sae_training.trainer import (
    CHECKPOINT_FILE,
    RunOptions,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    TrainingError,
    load_checkpoint,
)

CFG = TrainConfig(
    architecture="topk",
    d_sae=64,
    k=4,
    batch_size=128,
    train_tokens=40 * 128,
    lr=3e-3,
    norm_tokens=2048,
)


class Killed(Exception):
    pass


def _kill_at(step: int):  # type: ignore[no-untyped-def]
    def on_log(rec: dict[str, float]) -> None:
        if rec["step"] >= step:
            raise Killed

    return on_log


@pytest.mark.parametrize(
    ("arch", "old_layout"),
    [
        ("standard", False),
        ("topk", False),
        ("batchtopk", False),
        ("matryoshka_batchtopk", False),
        ("topk", True),
    ],
)
def test_resume_equals_uninterrupted_run(arch: str, old_layout: bool, tmp_path: Path) -> None:
    """``old_layout``: the checkpoint is rewritten as versions before the feature-major
    encoder wrote it (W_enc's Adam moments row-major, no layout field); resuming it must
    still continue the run exactly."""
    cfg = CFG.model_copy(update={"architecture": arch})
    # 40 steps on 2048 tokens = 2.5 epochs, so the resume point crosses an epoch boundary
    src = MemoryActivations(synthetic_acts(n=2048, d=16))
    opts = RunOptions(log_every=1, checkpoint_every=10, progress=False)
    with one_thread():
        full = Trainer(cfg, src, tmp_path / "full", opts).train()
        killed = Trainer(cfg, src, tmp_path / "killed", opts)
        with pytest.raises(Killed):
            killed.train(on_log=_kill_at(23))  # dies after step 23; last checkpoint is step 20
        assert load_checkpoint(tmp_path / "killed" / CHECKPOINT_FILE)["step"] == 20
        if old_layout:
            _to_row_major_checkpoint(tmp_path / "killed" / CHECKPOINT_FILE)
        resumed = Trainer(cfg, src, tmp_path / "killed", opts)
        assert resumed.resume() and resumed.step == 20
        again = resumed.train()
    for (name, a), (_, b) in zip(
        full.sae.state_dict().items(), again.sae.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    assert [h["loss"] for h in full.history] == [h["loss"] for h in again.history]


def _to_row_major_checkpoint(path: Path) -> None:
    state = load_checkpoint(path)
    assert state.pop("encoder_layout") == "feature-major"
    enc = list(state["sae"]).index("W_enc")
    moments = state["optimizer"]["state"][enc]
    for key in ("exp_avg", "exp_avg_sq"):
        assert moments[key].shape == (64, 16)  # [d_sae, d_in]
        moments[key] = moments[key].T.contiguous()
    torch.save(state, path)


def test_resume_rejects_a_different_config(tmp_path: Path) -> None:
    src = MemoryActivations(synthetic_acts(n=1024, d=16))
    with one_thread():
        Trainer(CFG, src, tmp_path, RunOptions(progress=False)).train()
    other = Trainer(
        CFG.model_copy(update={"lr": 1e-4, "k": 8}), src, tmp_path, RunOptions(progress=False)
    )
    with pytest.raises(
        TrainingError, match=r"different configuration(.|\n)*k: checkpoint=4 now=8(.|\n)*lr:"
    ):
        other.resume()


def test_existing_run_needs_resume_flag(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"x")
    job = TrainJob(out_dir=tmp_path, train=CFG, layer=0, activations=tmp_path / "none")
    with pytest.raises(TrainingError, match="--resume"):
        run_training(job)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    t = Trainer(
        CFG, MemoryActivations(synthetic_acts(n=1024, d=16)), tmp_path, RunOptions(progress=False)
    )
    with pytest.raises(TrainingError, match="unreadable checkpoint"):
        t.resume()


class PoisonedSource:
    """Good batches until ``bad_from``, then NaN activations (a corrupt shard, say)."""

    def __init__(self, acts: torch.Tensor, bad_from: int) -> None:
        self.inner = MemoryActivations(acts)
        self.d_in, self.num_tokens = self.inner.d_in, self.inner.num_tokens
        self.bad_from = bad_from
        self.served = 0

    def head(self, n: int) -> torch.Tensor:
        return self.inner.head(n)

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        for b in self.inner.batches(batch_size, epoch, seed):
            self.served += 1
            yield b * float("nan") if self.served > self.bad_from else b


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path) -> None:
    src = PoisonedSource(synthetic_acts(n=2048, d=16), bad_from=25)
    t = Trainer(CFG, src, tmp_path, RunOptions(checkpoint_every=10, progress=False))
    with (
        one_thread(),
        pytest.raises(TrainingDiverged, match=r"loss became nan at step 25(.|\n)*step 20"),
    ):
        t.train()
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    assert state["step"] == 20
    assert all(torch.isfinite(v).all() for v in state["sae"].values() if v.is_floating_point())
    assert not (tmp_path / (CHECKPOINT_FILE + ".tmp")).exists()


def test_training_leaves_process_state_alone(tmp_path: Path) -> None:
    """No global RNG seeding or restoring, no process-wide warning filters (the sparse
    kernels silence torch's sparse-format notices only around their own calls)."""
    import importlib
    import warnings

    from sae_training.architectures import sparse_ops

    filters = list(warnings.filters)
    importlib.reload(sparse_ops)
    assert warnings.filters == filters
    torch.manual_seed(1234)
    rng = torch.get_rng_state()
    src = MemoryActivations(synthetic_acts(n=1024, d=16))
    cfg = CFG.model_copy(update={"architecture": "batchtopk", "train_tokens": 4 * 128})
    with one_thread():
        Trainer(cfg, src, tmp_path, RunOptions(progress=False)).train()
    assert torch.equal(torch.get_rng_state(), rng)
    assert warnings.filters == filters
