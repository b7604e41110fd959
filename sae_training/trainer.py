"""The SAE training loop: schedules, normalisation, data parallelism, checkpoints.

Architecture-agnostic: it calls the :class:`TrainableSAE` hooks and never asks
which architecture it has. Determinism is a design goal, because ``--resume``
must continue a killed run exactly: the batch order is a pure function of
``(seed, epoch)``, so the checkpoint needs only the step count, the weights,
the optimizer state and the dead-feature counters.

Data parallelism: every rank reads the same batch order and takes its
``1/world`` slice; gradients are averaged with ``all_reduce``; every rank
then takes the identical Adam step. Since the loss is a per-token mean over
equal slices, the averaged gradient equals the 1-process gradient of the
whole batch (up to float summation order).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from tqdm import tqdm

from sae_steer_vllm.constants import CHECKPOINT_FILE
from sae_steer_vllm.files import atomic_save
from sae_steer_vllm.sae import SAE
from sae_training.activation_sources import ActivationSource, estimate_norm_scale
from sae_training.architectures import ARCHITECTURES, TrainableSAE, build
from sae_training.architectures.base import DecoderInit
from sae_training.architectures.matryoshka import check_widths
from sae_training.errors import TrainingDiverged, TrainingError


class TrainConfig(BaseModel):
    """Everything that determines the trained weights (and nothing that does not).

    The field defaults are the paper's loss and optimiser (a standard ReLU SAE, Adam 5e-5,
    batch 4096) with this project's init and input rule; the recipes
    (:mod:`sae_training.recipe`: the default model's, and ``paper-r1``, the authors'
    release) override some of them. Each field's docstring is its ``sae-steer train --help`` text.

    ``--resume`` compares these fields with the checkpoint's and refuses to
    continue if any differs, because mixing two configurations silently gives
    an SAE that neither config describes.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    architecture: Literal["standard", "topk", "batchtopk", "matryoshka_batchtopk"] = Field(
        "standard", json_schema_extra={"cli": {"aliases": ["--arch"]}}
    )
    """SAE architecture (batchtopk and matryoshka_batchtopk save as jumprelu)"""
    d_sae: int = Field(9216, gt=0)
    """number of features (CLI without --recipe: 16 x d_in)"""
    l1_coeff: float = Field(5.0, ge=0)
    """L1 coefficient for standard"""
    l1_warmup: float = Field(0.05, ge=0, le=1)
    """fraction of training over which L1 ramps up"""
    k: int = Field(64, gt=0)
    """active features per token for topk/batchtopk/matryoshka_batchtopk"""
    matryoshka_widths: list[int] | None = None
    """nested dictionary sizes for matryoshka_batchtopk, ending at d_sae (default: d_sae/64,
    d_sae/16, d_sae/4, d_sae)"""
    lr: float = Field(5e-5, gt=0)
    """Adam learning rate"""
    lr_warmup: float = Field(0.0, ge=0, le=1)
    """fraction of training with linear lr warm-up"""
    lr_decay: float = Field(0.2, ge=0, le=1)
    """fraction of training with linear lr decay to 0"""
    beta1: float = Field(0.9, ge=0, lt=1)
    """Adam beta1"""
    beta2: float = Field(0.999, ge=0, lt=1)
    """Adam beta2"""
    grad_clip: float | None = Field(None, ge=0)
    """clip the gradient norm (default: 1.0 for standard, as SAELens; off for topk and
    batchtopk; 0 = off)"""
    batch_size: int = Field(4096, gt=0)
    """tokens per optimizer step over all processes"""
    train_tokens: int = Field(..., gt=0)
    """total training tokens (epochs over the data if larger)"""
    init_dec_norm: float = Field(0.1, gt=0)
    """initial decoder-row norm (standard)"""
    decoder_init: DecoderInit = "gaussian"
    """decoder rows at init (encoder = their transpose): gaussian = random directions;
    saelens-heuristic = SAELens 5.5 decoder_heuristic_init, uniform [0,1) entries (the
    paper's release)"""
    apply_b_dec_to_input: bool = True
    """subtract b_dec from the input before encoding; --no-apply-b-dec-to-input encodes x
    itself, as the paper's release (saved in cfg.json, so loaders do the same)"""
    norm_tokens: int = Field(32768, gt=0)
    """tokens used to estimate the input normalisation (and calibrate batchtopk)"""
    dead_window: int = Field(1_000_000, gt=0)
    """a feature that has not fired for this many tokens counts as dead"""
    seed: int = 0
    """seed for init and batch order"""

    @property
    def clip_norm(self) -> float | None:
        """The gradient-norm clip in effect, or None.

        Why 1.0 for the standard SAE: its L1 loss's early gradients are huge, and without
        clipping it trailed SAELens (which always clips at 1.0) badly: held-out EV 0.32 at
        L0 378 vs 0.73 at L0 437 after the same 65k tokens; with it, 0.73 at L0 395. The
        k-sparse recipes were measured without it.
        """
        if self.grad_clip is None:
            return 1.0 if self.architecture == "standard" else None
        return self.grad_clip or None

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.train_tokens < self.batch_size:
            raise ValueError(
                f"train_tokens={self.train_tokens} is less than one batch ({self.batch_size})"
            )
        if self.architecture != "standard" and self.k > self.d_sae:
            raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}")
        if self.matryoshka_widths is not None:
            if self.architecture != "matryoshka_batchtopk":
                raise ValueError("matryoshka_widths is only for --arch matryoshka_batchtopk")
            check_widths(self.matryoshka_widths, self.d_sae)
        return self

    @property
    def total_steps(self) -> int:
        return self.train_tokens // self.batch_size

    def lr_at(self, step: int) -> float:
        """Linear warm-up, constant, linear decay to 0 over the last ``lr_decay``."""
        total = self.total_steps
        warm = int(self.lr_warmup * total)
        decay = int(self.lr_decay * total)
        if warm and step < warm:
            return self.lr * (step + 1) / warm
        if decay and step >= total - decay:
            return self.lr * (total - step) / decay
        return self.lr


@dataclass(frozen=True)
class RunOptions:
    """How to run (free to change between a run and its resume)."""

    log_every: int = 50
    checkpoint_every: int = 200
    progress: bool = True


# ------------------------------------------------------------------ distributed helpers
def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join the process group torchrun describes (gloo on CPU, nccl with CUDA)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


def training_device() -> torch.device:
    """This process's GPU under torchrun (LOCAL_RANK), else the first GPU, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _all_reduce(t: torch.Tensor, op: Any = None) -> torch.Tensor:
    if world()[1] > 1:
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


# ------------------------------------------------------------------ checkpoints
ENCODER_LAYOUT = "feature-major"
"""How checkpoints hold W_enc's optimizer moments (older ones: row-major ``[d_in, d_sae]``)."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write-then-rename; a checkpoint with non-finite weights is refused."""
    for k, v in state["sae"].items():
        if torch.is_floating_point(v) and not torch.isfinite(v).all():
            raise TrainingDiverged(f"refusing to checkpoint non-finite tensor {k!r}")
    atomic_save(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt files
        raise TrainingError(f"{path}: unreadable checkpoint ({e})") from None
    if not isinstance(state, dict) or "config" not in state or "step" not in state:
        raise TrainingError(f"{path}: not a checkpoint written by sae-steer train")
    return state


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config with fields added since it was written at their defaults
    (which is how that run trained); a config that no longer validates is compared as is."""
    try:
        return TrainConfig(**saved).model_dump()
    except ValidationError:
        return saved


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    keys = sorted(set(a) | set(b))
    return [f"{k}: checkpoint={a.get(k)!r} now={b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


# ------------------------------------------------------------------ trainer
def build_sae(cfg: TrainConfig, d_in: int) -> TrainableSAE:
    cls = ARCHITECTURES[cfg.architecture]
    hp = {name: getattr(cfg, name) for name in cls.hparams}
    return build(
        cfg.architecture,
        d_in,
        cfg.d_sae,
        init_dec_norm=cfg.init_dec_norm,
        seed=cfg.seed,
        decoder_init=cfg.decoder_init,
        apply_b_dec_to_input=cfg.apply_b_dec_to_input,
        **hp,
    )


def _batches_from(source: ActivationSource, cfg: TrainConfig, step: int) -> Iterator[torch.Tensor]:
    """Global batches starting at ``step`` (epochs wrap with a fresh permutation)."""
    per_epoch = source.num_tokens // cfg.batch_size
    if per_epoch == 0:
        raise TrainingError(
            f"the activation source has {source.num_tokens} tokens, fewer than one batch ({cfg.batch_size})"
        )
    epoch, skip = divmod(step, per_epoch)
    while True:
        for i, b in enumerate(source.batches(cfg.batch_size, epoch, cfg.seed)):
            if i >= skip:
                yield b
        skip = 0
        epoch += 1


@dataclass
class TrainResult:
    sae: TrainableSAE
    scale: float
    history: list[dict[str, float]]
    seconds: float
    tokens_per_second: float
    steps: int
    finalized: dict[str, float] = field(default_factory=dict)
    """What the architecture fitted once training ended (e.g. a calibrated threshold)."""


class Trainer:
    """Trains one SAE on one :class:`ActivationSource`; checkpoints into ``out_dir``."""

    def __init__(
        self,
        cfg: TrainConfig,
        source: ActivationSource,
        out_dir: Path,
        opts: RunOptions | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.out_dir = Path(out_dir)
        self.opts = opts or RunOptions()
        self.rank, self.world = world()
        if cfg.batch_size % self.world:
            raise TrainingError(
                f"batch_size {cfg.batch_size} is not divisible by {self.world} processes"
            )
        self.device = training_device()
        self.sae = build_sae(cfg, source.d_in).to(self.device)
        # fused Adam: one kernel per step instead of ~10 elementwise passes over the weights
        self.opt = torch.optim.Adam(
            self.sae.optimizer_parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True
        )
        self.step = 0
        self.scale = 0.0
        self.finalized: dict[str, float] = {}
        self.tokens_since_fired = torch.zeros(cfg.d_sae, dtype=torch.long)
        self.history: list[dict[str, float]] = []
        self.ckpt_path = self.out_dir / CHECKPOINT_FILE
        self.last_good_step: int | None = None

    # ---------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        return {
            "config": self.cfg.model_dump(),
            "step": self.step,
            "scale": self.scale,
            "sae": {k: v.detach().cpu().clone() for k, v in self.sae.state_dict().items()},
            "optimizer": self.opt.state_dict(),
            "encoder_layout": ENCODER_LAYOUT,
            "tokens_since_fired": self.tokens_since_fired.clone(),
            "history": json.dumps(self.history),
        }

    def resume(self) -> bool:
        """Load ``checkpoint.pt`` if present; a config mismatch is an error."""
        if not self.ckpt_path.is_file():
            return False
        state = load_checkpoint(self.ckpt_path)
        diff = config_diff(_with_defaults(state["config"]), self.cfg.model_dump())
        if diff:
            raise TrainingError(
                f"{self.ckpt_path} was written by a different configuration:\n  "
                + "\n  ".join(diff)
                + "\nuse the original settings, or a new --out directory to start afresh"
            )
        self.sae.load_state_dict(state["sae"])
        self.opt.load_state_dict(state["optimizer"])
        if state.get("encoder_layout") != ENCODER_LAYOUT:
            self._transpose_encoder_moments()
        self.step = int(state["step"])
        self.scale = float(state["scale"])
        self.tokens_since_fired = state["tokens_since_fired"].clone()
        self.history = json.loads(state["history"])
        self.last_good_step = self.step
        return True

    def _transpose_encoder_moments(self) -> None:
        """A checkpoint from before the feature-major encoder holds W_enc's Adam moments as
        ``[d_in, d_sae]``; the optimizer now updates ``[d_sae, d_in]`` (same numbers,
        transposed: fused Adam would read them in the wrong order, silently)."""
        names = [name for name, _ in self.sae.named_parameters()]
        enc = self.opt.param_groups[0]["params"][names.index("W_enc")]
        for key, value in self.opt.state.get(enc, {}).items():
            if torch.is_tensor(value) and value.dim() == 2:
                self.opt.state[enc][key] = value.T.contiguous()

    def checkpoint(self) -> None:
        if self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.ckpt_path, self.state())
        self.last_good_step = self.step

    # ---------------------------------------------------------------- loop
    def _initialise(self) -> None:
        head = self.source.head(self.cfg.norm_tokens)
        self.scale = estimate_norm_scale(self.source, self.cfg.norm_tokens)
        self.sae.init_b_dec(head.to(self.device) * self.scale)

    def _diverged(self, what: str) -> TrainingDiverged:
        where = (
            f"the last good checkpoint (step {self.last_good_step}) is kept at {self.ckpt_path}"
            if self.last_good_step is not None
            else "no checkpoint had been written yet"
        )
        return TrainingDiverged(
            f"{what} at step {self.step}: training stopped; {where}. "
            "Lower the learning rate (--lr) or the L1 coefficient and start a new run."
        )

    def train(self, on_log: Callable[[dict[str, float]], None] | None = None) -> TrainResult:
        cfg = self.cfg
        if self.step == 0 and not self.scale:
            self._initialise()
        total = cfg.total_steps
        lo, hi = (
            self.rank * cfg.batch_size // self.world,
            (self.rank + 1) * cfg.batch_size // self.world,
        )
        batches = _batches_from(self.source, cfg, self.step)
        bar = tqdm(
            total=total * cfg.batch_size,
            initial=self.step * cfg.batch_size,
            unit="tok",
            unit_scale=True,
            desc=f"train {cfg.architecture}",
            disable=not self.opts.progress or self.rank != 0,
        )
        t0 = time.perf_counter()
        start_step = self.step
        params = list(self.sae.parameters())
        try:
            while self.step < total:
                x = next(batches)[lo:hi].to(self.device, non_blocking=True) * self.scale
                out = self.sae.training_forward(x, progress=self.step / total)
                loss_val = _all_reduce(out.loss.detach().clone()) / self.world
                if not math.isfinite(float(loss_val)):
                    raise self._diverged(f"loss became {float(loss_val)}")
                for g in self.opt.param_groups:
                    g["lr"] = cfg.lr_at(self.step)
                # the first gradient is taken, not added into a zeroed buffer
                self.sae.zero_grad(set_to_none=True)
                out.loss.backward()
                if self.world > 1:
                    flat = torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])
                    _all_reduce(flat)
                    flat /= self.world
                    off = 0
                    for p in params:
                        if p.grad is not None:
                            n = p.grad.numel()
                            p.grad.copy_(flat[off : off + n].view_as(p.grad))
                            off += n
                if cfg.clip_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm)
                self.sae.before_optimizer_step()
                self.opt.step()
                self.sae.after_optimizer_step()
                fired = (
                    _all_reduce(
                        out.fired.to(torch.int32), dist.ReduceOp.MAX if self.world > 1 else None
                    )
                    > 0
                )
                self.tokens_since_fired += cfg.batch_size
                self.tokens_since_fired[fired.cpu()] = 0
                self.step += 1
                bar.update(cfg.batch_size)
                if self.step % self.opts.log_every == 0 or self.step == total:
                    rec = self._log_record(x, out, float(loss_val))
                    self.history.append(rec)
                    bar.set_postfix(
                        ev=f"{rec['explained_variance']:.3f}",
                        l0=f"{rec['l0']:.1f}",
                        dead=f"{rec['dead_fraction']:.3f}",
                    )
                    if on_log is not None:
                        on_log(rec)
                if self.step % self.opts.checkpoint_every == 0 and self.step < total:
                    self.checkpoint()
        finally:
            bar.close()
        for k, v in self.sae.state_dict().items():
            if torch.is_floating_point(v) and not torch.isfinite(v).all():
                raise self._diverged(f"weight {k} became non-finite")
        # Deterministic on every rank (same head of the same source), so no all-reduce.
        sample = self.source.head(self.cfg.norm_tokens).to(self.device) * self.scale
        self.finalized = self.sae.finalize(sample)
        self.checkpoint()
        secs = time.perf_counter() - t0
        done = (self.step - start_step) * cfg.batch_size
        return TrainResult(
            self.sae,
            self.scale,
            self.history,
            secs,
            done / secs if secs > 0 else 0.0,
            self.step,
            self.finalized,
        )

    @torch.no_grad()
    def _log_record(self, x: torch.Tensor, out: Any, loss: float) -> dict[str, float]:
        resid = (x - out.recon).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
        stats = _all_reduce(torch.stack([resid, var, out.l0.float(), out.terms["mse"].float()]))
        stats[2:] /= self.world
        # A feature is dead if it has not fired for dead_window tokens (or, in a
        # run shorter than that, not at all so far).
        window = min(self.cfg.dead_window, self.step * self.cfg.batch_size)
        rec = {
            "step": float(self.step),
            "tokens": float(self.step * self.cfg.batch_size),
            "loss": loss,
            "mse": float(stats[3]),
            "explained_variance": float(1 - stats[0] / stats[1].clamp_min(1e-12)),
            "l0": float(stats[2]),
            "dead_fraction": float((self.tokens_since_fired >= window).float().mean()),
            "lr": self.cfg.lr_at(self.step - 1),
        }
        for k, v in out.terms.items():
            if k not in ("mse",):
                rec[k] = float(v)
        return rec


def export_sae(result: TrainResult, **cfg_fields: Any) -> SAE:
    """The trained SAE in raw activation space (scale folded in), ready for ``SAE.save``."""
    return result.sae.to_inference(result.scale, **cfg_fields)
