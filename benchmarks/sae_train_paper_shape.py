"""SAE training speed at the paper's shape: tokens/s, peak memory, hours for 819.2M tokens.

The paper's SAE (``--recipe paper-r1``): d_in 4096 (layer 19 of R1-Distill-Llama-8B),
65,536 features, batch 4,096, 819.2M tokens = 200,000 steps; the authors report about 30
hours on one H100 with SAELens. This trains that shape with our trainer and the recipe's
settings (topk / batchtopk keep their own init and clipping: ``K_SPARSE_OWN``) for
``--warmup-steps`` + ``--steps`` steps, times the steps after the warm-up (a timestamp
per step, after a CUDA synchronize; the trainer then logs every step, a few reductions)
and projects the paper's run at that speed. The final checkpoint is not timed.

No model is needed: the activations are synthetic (:class:`SyntheticActivations`), made
batch by batch on the training device: sparse sums of a fixed random dictionary plus a
mean offset and noise, at a mean norm of ``--token-norm`` (14: Llama Scope declares 10.8
for Llama-3.1-8B's layer-15 residual). Not Gaussian noise, which never becomes sparse:
an L1 SAE's speed depends on its sparsity (our standard-SAE kernels switch to sparse
products when few features fire). The trainer rescales to mean norm sqrt(d_in) anyway.

Caveat: a few hundred steps are the start of a 200,000-step run; the standard SAE's L0 is
still high then (its L1 ramps over 5% of *this* run), so its speed is its early, denser
speed. L0 is reported beside every speed for that reason.

    python -m benchmarks.sae_train_paper_shape                  # a GPU: the paper's shape
    python -m benchmarks.sae_train_paper_shape --tf32           # TF32 matrix products
    python -m benchmarks.sae_train_paper_shape --smoke          # CPU: d_in 64, d_sae 512
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from pydantic import Field

from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.files import atomic_write_json
from sae_training import RunOptions, TrainConfig, Trainer
from sae_training.recipe import RECIPES

PROG = "python -m benchmarks.sae_train_paper_shape"
PAPER = RECIPES["paper-r1"].train
"""The paper's SAE settings (their one owner is the recipe)."""
PAPER_REFERENCE = "about 30 hours on one H100 with SAELens (the authors)"
PAPER_REFERENCE_HOURS = 30.0
ARCHS = list(get_args(TrainConfig.model_fields["architecture"].annotation))
K_SPARSE_OWN = {"decoder_init", "init_dec_norm", "apply_b_dec_to_input", "grad_clip"}
"""Paper settings that are the standard SAE's own: topk / batchtopk keep the trainer's
defaults for these (Gaussian decoder init, b_dec on the input, no clipping) and take the
rest (lr, betas, schedule, seed) from the paper."""
SMOKE = {"d_in": 64, "d_sae": 512, "batch_size": 256, "steps": 8, "warmup_steps": 2, "k": 16}
"""The reduced CPU shape of ``--smoke`` (options given explicitly still win)."""


class PaperShapeConfig(CommandConfig):
    """Train the paper's SAE shape on synthetic activations; report tokens/s, peak memory
    and the projected time for the paper's 819.2M tokens."""

    arch: list[str] = Field(
        default_factory=lambda: ["standard", "batchtopk"],
        json_schema_extra={"cli": {"choices": ARCHS}},
    )
    """architectures to train, one after the other"""
    d_in: int = Field(4096, gt=0)
    """residual width (Llama-8B: 4096)"""
    d_sae: int = Field(PAPER["d_sae"], gt=0)
    """number of features"""
    batch_size: int = Field(PAPER["batch_size"], gt=0)
    """tokens per step"""
    steps: int = Field(300, gt=0)
    """timed steps (after the warm-up)"""
    warmup_steps: int = Field(20, gt=0)
    """untimed steps first (allocation, kernel selection)"""
    k: int = Field(64, gt=0)
    """features per token for topk / batchtopk"""
    l1_coeff: float = Field(PAPER["l1_coeff"], ge=0)
    """L1 coefficient for standard"""
    lr: float = Field(PAPER["lr"], gt=0)
    """Adam learning rate"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = the first GPU if one is visible (the trainer's own rule); cpu hides the GPUs"""
    tf32: bool = False
    """TF32 matrix products (float32 matmul precision 'high'); default exact fp32 ('highest'), as SAELens"""
    token_norm: float = Field(14.0, gt=0)
    """mean norm of the synthetic tokens (about a Llama-8B mid-layer residual's; the trainer
    rescales to sqrt(d_in) anyway)"""
    active: int = Field(32, gt=0)
    """true features summed per synthetic token"""
    paper_tokens: int = Field(PAPER["train_tokens"], gt=0)
    """training tokens to project the time for"""
    out: Path = Path("runs/sae_train_paper_shape.json")
    """results JSON"""
    smoke: bool = False
    """reduced CPU shape (d_in 64, d_sae 512, batch 256, 8 steps, 2 warm-up, k 16)"""


def _seed(*parts: object) -> int:
    """A 63-bit seed from a tuple: independent streams per (source, run seed, epoch, batch)."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big") >> 1


class SyntheticActivations:
    """An :class:`~sae_training.activation_sources.ActivationSource` of residual-like
    tokens, generated on ``device`` batch by batch (never all ``num_tokens`` at once),
    deterministic per (source seed, run seed, epoch, batch index).

    A token is the sum of ``active`` of ``4 x d_in`` fixed random unit directions with
    Exp(1) magnitudes, plus a fixed offset (half the signal's RMS norm) and Gaussian noise
    (a tenth of it), scaled to mean norm ``mean_norm``. ``num_tokens`` is nominal (one
    epoch); ``head(n)`` is its own fixed stream, in chunks: ``head(m) == head(n)[:m]``.
    """

    HEAD_CHUNK = 4096

    def __init__(
        self,
        d_in: int,
        num_tokens: int,
        *,
        device: torch.device | str = "cpu",
        active: int = 32,
        mean_norm: float = 14.0,
        seed: int = 0,
    ) -> None:
        self.d_in, self.num_tokens, self.active, self.seed = d_in, num_tokens, active, seed
        self.device = torch.device(device)
        self.n_true = 4 * d_in
        g = torch.Generator().manual_seed(seed)  # on the CPU: the same dictionary on every device
        dictionary = torch.randn(self.n_true, d_in, generator=g)
        self.dictionary = (dictionary / dictionary.norm(dim=-1, keepdim=True)).to(self.device)
        signal_rms = math.sqrt(2 * active)  # E[m^2] = 2 for Exp(1); directions nearly orthogonal
        mean_dir = torch.randn(d_in, generator=g)
        self.offset = (0.5 * signal_rms * mean_dir / mean_dir.norm()).to(self.device)
        self.noise_std = 0.1 * signal_rms / math.sqrt(d_in)
        self.scale = 1.0
        calibration = self._generate(_seed(seed, "calibration"), self.HEAD_CHUNK)
        self.scale = mean_norm / float(calibration.norm(dim=-1).mean())

    @torch.no_grad()
    def _generate(self, seed: int, n: int) -> torch.Tensor:
        g = torch.Generator(device=self.device).manual_seed(seed)
        idx = torch.randint(self.n_true, (n, self.active), generator=g, device=self.device)
        mag = torch.empty(n, self.active, device=self.device).exponential_(generator=g)
        x = F.embedding_bag(idx, self.dictionary, per_sample_weights=mag, mode="sum")
        x += self.offset
        x += torch.randn(n, self.d_in, generator=g, device=self.device) * self.noise_std
        return x * self.scale

    def batches(self, batch_size: int, epoch: int, seed: int) -> Iterator[torch.Tensor]:
        for i in range(self.num_tokens // batch_size):
            yield self._generate(_seed(self.seed, seed, epoch, i), batch_size)

    def head(self, n: int) -> torch.Tensor:
        chunks = range(-(-n // self.HEAD_CHUNK))
        parts = [self._generate(_seed(self.seed, "head", j), self.HEAD_CHUNK) for j in chunks]
        return torch.cat(parts)[:n]


def select_device(choice: str) -> torch.device:
    """The device the trainer will use (it takes the first GPU whenever one is visible, so
    ``cpu`` hides the GPUs, which works only before CUDA is initialised in this process)."""
    if choice == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        if torch.cuda.is_available():
            raise UsageError(
                "--device cpu: CUDA was initialised in this process before the GPUs could be "
                "hidden; run with CUDA_VISIBLE_DEVICES= in the environment instead"
            )
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if choice == "cuda":
        raise UsageError(
            f"--device cuda: no CUDA device is visible (torch {torch.__version__}, CUDA "
            f"{torch.version.cuda}); use --device cpu (with --smoke for the reduced shape)"
        )
    return torch.device("cpu")


def _proc_status_bytes(key: str) -> float:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024.0
    return float("nan")


def _reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; return what is in use now (the baseline)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return float(torch.cuda.memory_allocated(device))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    return _proc_status_bytes("VmRSS")


def train_config(cfg: PaperShapeConfig, arch: str) -> TrainConfig:
    """The paper's settings at this run's shape and length (validated by TrainConfig)."""
    tokens = (cfg.warmup_steps + cfg.steps) * cfg.batch_size
    skip = {"train_tokens", "norm_tokens"} | (set() if arch == "standard" else K_SPARSE_OWN)
    settings = {k: v for k, v in PAPER.items() if k not in skip}
    settings.update(
        architecture=arch, d_sae=cfg.d_sae, k=cfg.k, l1_coeff=cfg.l1_coeff, lr=cfg.lr,
        batch_size=cfg.batch_size, train_tokens=tokens, norm_tokens=min(32768, tokens),
    )  # fmt: skip
    return TrainConfig(**settings)


def train_one(
    cfg: PaperShapeConfig, train_cfg: TrainConfig, device: torch.device
) -> dict[str, Any]:
    """Train ``warmup_steps + steps`` steps of one architecture; time the steps after warm-up."""
    source = SyntheticActivations(
        cfg.d_in, train_cfg.train_tokens, device=device, active=cfg.active, mean_norm=cfg.token_norm
    )
    stamps: list[float] = []

    def on_log(_rec: dict[str, float]) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())

    baseline = _reset_peak(device)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="paper-shape-") as tmp:
        opts = RunOptions(log_every=1, checkpoint_every=10**9, progress=False)
        trainer = Trainer(train_cfg, source, Path(tmp), opts)
        result = trainer.train(on_log=on_log)
        cuda = device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(device) if cuda else _proc_status_bytes("VmHWM")
    wall = time.perf_counter() - started
    timed = stamps[-1] - stamps[cfg.warmup_steps - 1]
    tps = cfg.steps * cfg.batch_size / timed
    last = result.history[-1]
    return {
        "arch": train_cfg.architecture,
        "device": str(device),
        "dtype": str(next(trainer.sae.parameters()).dtype),
        "timed_steps": cfg.steps,
        "timed_seconds": timed,
        "tokens_per_second": tps,
        "ms_per_step": 1000 * timed / cfg.steps,
        "wall_seconds_incl_setup": wall,
        "peak_memory_bytes": peak,
        "baseline_memory_bytes": baseline,
        "memory_kind": "cuda max_memory_allocated" if cuda else "process VmHWM",
        "l0": last["l0"],
        "explained_variance": last["explained_variance"],
        "dead_fraction": last["dead_fraction"],
        "projected_hours": cfg.paper_tokens / tps / 3600,
        "train_config": train_cfg.model_dump(),
    }


def run(cfg: PaperShapeConfig) -> int:
    configs = [train_config(cfg, arch) for arch in dict.fromkeys(cfg.arch)]  # all checked first
    device = select_device(cfg.device)
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if cfg.tf32 else "highest")
    try:
        cuda = device.type == "cuda"
        env = {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.machine(),
            "cpu_threads": torch.get_num_threads(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
            "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
        rows = []
        for tc in configs:
            print(f"[paper-shape] {tc.architecture} on {env['device_name']} ...", file=sys.stderr)
            rows.append(train_one(cfg, tc, device))
    finally:
        torch.set_float32_matmul_precision(before)
    results = {
        "config": cfg.model_dump(mode="json"),
        "environment": env,
        "reference": {"text": PAPER_REFERENCE, "hours": PAPER_REFERENCE_HOURS},
        "rows": rows,
    }
    atomic_write_json(cfg.out, results)
    print(markdown_table(results))
    return 0


def markdown_table(results: dict[str, Any]) -> str:
    env, c = results["environment"], results["config"]
    precision = "TF32" if env["float32_matmul_precision"] != "highest" else "exact fp32"
    lines = [
        f"d_in {c['d_in']}, d_sae {c['d_sae']}, batch {c['batch_size']}, {c['steps']} timed "
        f"steps after {c['warmup_steps']}; {env['device_name']}, torch {env['torch']}, "
        f"{precision} matmuls; reference: {results['reference']['text']}",
        *(["(smoke shape: proves it runs, measures nothing)"] if c["smoke"] else []),
        "",
        f"| arch | tokens/s | ms/step | peak memory (GiB) | L0 | EV | hours for "
        f"{c['paper_tokens'] / 1e6:g}M tokens |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        lines.append(
            f"| {r['arch']} | {r['tokens_per_second']:,.0f} | {r['ms_per_step']:.1f} | "
            f"{r['peak_memory_bytes'] / 2**30:.2f} ({r['memory_kind']}) | {r['l0']:.1f} | "
            f"{r['explained_variance']:.3f} | {r['projected_hours']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_options(parser, PaperShapeConfig)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    preset = SMOKE if getattr(args, "smoke", False) else {}
    given = {k: v for k, v in preset.items() if k not in vars(args)}
    return run_command(PROG, lambda: run(model_from_args(PaperShapeConfig, args, **given)))


if __name__ == "__main__":
    raise SystemExit(main())
