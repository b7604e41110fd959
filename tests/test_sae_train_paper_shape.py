"""The paper-shape training benchmark at a reduced shape on CPU: what it reports, its
synthetic activations, and its errors (the paper's shape itself needs a GPU:
scripts/gpu_paper_shape.sh)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks.sae_train_paper_shape import SyntheticActivations, main


def test_smoke_reports_speed_memory_and_projection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # what --device cpu sets, undone afterwards
    if torch.cuda.is_available():
        pytest.skip("CUDA was initialised in this process before the GPUs could be hidden")
    out = tmp_path / "r.json"
    precision = torch.get_float32_matmul_precision()
    assert main(["--smoke", "--device", "cpu", "--out", str(out)]) == 0
    assert torch.get_float32_matmul_precision() == precision  # restored
    res = json.loads(out.read_text())
    assert res["config"]["d_in"] == 64 and res["config"]["steps"] == 8
    env = res["environment"]
    assert env["torch"] == torch.__version__
    assert env["float32_matmul_precision"] == "highest"
    assert env["cuda_matmul_allow_tf32"] is False
    assert res["reference"]["hours"] == 30.0
    assert [r["arch"] for r in res["rows"]] == ["standard", "batchtopk"]
    for r in res["rows"]:
        assert r["device"] == "cpu" and r["dtype"] == "torch.float32"
        assert math.isfinite(r["tokens_per_second"]) and r["tokens_per_second"] > 0
        assert r["tokens_per_second"] == pytest.approx(8 * 256 / r["timed_seconds"])
        assert r["peak_memory_bytes"] > 0 and math.isfinite(r["peak_memory_bytes"])
        assert r["projected_hours"] == pytest.approx(819_200_000 / r["tokens_per_second"] / 3600)
        assert math.isfinite(r["l0"]) and r["l0"] > 0
        assert math.isfinite(r["explained_variance"])
        tc = r["train_config"]
        assert (tc["d_sae"], tc["batch_size"], tc["train_tokens"]) == (512, 256, 10 * 256)
        assert tc["lr"] == 5e-5 and tc["architecture"] == r["arch"]
    std, btk = res["rows"]
    # the paper's own init for the standard SAE; batchtopk keeps the trainer's
    assert std["train_config"]["decoder_init"] == "saelens-heuristic"
    assert std["train_config"]["apply_b_dec_to_input"] is False
    assert btk["train_config"]["decoder_init"] == "gaussian"
    assert btk["l0"] == pytest.approx(16, rel=0.5)
    table = capsys.readouterr().out
    assert "hours for 819.2M tokens" in table and "smoke shape" in table
    assert "| standard |" in table and "| batchtopk |" in table
    assert "exact fp32" in table


def test_synthetic_source_is_deterministic_and_has_the_requested_norm() -> None:
    def batches(src: SyntheticActivations, epoch: int, seed: int) -> list[torch.Tensor]:
        return list(src.batches(256, epoch, seed))

    a = SyntheticActivations(32, 1024, active=8, mean_norm=14.0, seed=3)
    b = SyntheticActivations(32, 1024, active=8, mean_norm=14.0, seed=3)
    first = batches(a, 0, 1)
    assert len(first) == 4 and all(x.shape == (256, 32) for x in first)
    assert all(torch.equal(x, y) for x, y in zip(first, batches(a, 0, 1)))
    assert all(torch.equal(x, y) for x, y in zip(first, batches(b, 0, 1)))
    assert not torch.equal(first[0], first[1])
    assert not torch.equal(first[0], batches(a, 1, 1)[0])  # another epoch
    assert not torch.equal(first[0], batches(a, 0, 2)[0])  # another run seed
    other = SyntheticActivations(32, 1024, active=8, mean_norm=14.0, seed=4)
    assert not torch.equal(first[0], batches(other, 0, 1)[0])  # another dictionary
    head = a.head(5000)
    assert head.shape == (5000, 32)
    assert torch.equal(a.head(100), head[:100])
    assert float(head.norm(dim=-1).mean()) == pytest.approx(14.0, rel=0.03)
    train = torch.cat(first)
    assert float(train.norm(dim=-1).mean()) == pytest.approx(14.0, rel=0.03)


def test_synthetic_tokens_are_sparse_codes_not_noise() -> None:
    """Each token projects strongly onto a few dictionary directions (its active features),
    far more than Gaussian noise of the same shape does."""
    src = SyntheticActivations(256, 1024, active=8, seed=0)
    x = torch.cat(list(src.batches(256, 0, 0))) / src.scale - src.offset

    def peakiness(t: torch.Tensor) -> float:
        proj = (t @ src.dictionary.T).abs()
        return float(proj.topk(8, dim=-1).values.mean() / proj.median())

    # (a noise seed other than the dictionary's: the same seed would replay its rows)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(12345))
    assert peakiness(x) > 1.5 * peakiness(noise)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--smoke", "--k", "1024"], "k=1024 exceeds d_sae=512"),
        (["--smoke", "--steps", "0"], "--steps"),
        (["--smoke", "--warmup-steps", "0"], "--warmup-steps"),
        pytest.param(
            ["--smoke", "--device", "cuda"],
            "no CUDA device is visible",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible"),
        ),
    ],
)
def test_bad_input_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], needle: str
) -> None:
    out = tmp_path / "r.json"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
