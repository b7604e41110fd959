"""The canonical in-memory SAE: weights in SAELens orientation plus the activation rule.

Importable without vLLM (torch + safetensors only): the server, the trainer,
the scorer and the tests all load and save SAEs through this class, so a file
that one of them writes is a file every other one reads the same way. Any
layout in :data:`~sae_steer_vllm.sae.loaders.LAYOUTS` loads into it; it always
saves the SAELens v6 layout, with any input normalisation folded into the
weights, so SAELens itself can load what we train.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..constants import SAELENS_CFG, SAELENS_WEIGHTS
from ..files import atomic_write_json
from .config import SAEConfig, SAEFormatError
from .loaders import load_canonical
from .tensor_file import write_tensors


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise SAEFormatError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


class SAE(torch.nn.Module):
    """Encoder/decoder weights plus the activation rule of the architecture.

    ``W_enc`` is ``[d_in, d_sae]`` and ``W_dec`` is ``[d_sae, d_in]`` (SAELens
    orientation) whatever layout the file had.
    """

    def __init__(
        self,
        cfg: SAEConfig,
        W_enc: torch.Tensor,
        b_enc: torch.Tensor,
        W_dec: torch.Tensor,
        b_dec: torch.Tensor,
        threshold: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        _check_shape("W_enc", W_enc, (cfg.d_in, cfg.d_sae))
        _check_shape("b_enc", b_enc, (cfg.d_sae,))
        _check_shape("W_dec", W_dec, (cfg.d_sae, cfg.d_in))
        _check_shape("b_dec", b_dec, (cfg.d_in,))
        if cfg.architecture == "jumprelu":
            if threshold is None:
                raise SAEFormatError("a jumprelu SAE needs a threshold tensor")
            _check_shape("threshold", threshold, (cfg.d_sae,))
        self.W_enc = torch.nn.Parameter(W_enc)
        self.b_enc = torch.nn.Parameter(b_enc)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(b_dec)
        self.threshold: torch.Tensor | None
        if threshold is not None:
            self.register_buffer("threshold", threshold)
        else:
            self.threshold = None

    # ---------------------------------------------------------------- math
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The architecture's rule, applied to pre-activations."""
        if self.cfg.architecture == "standard":
            return torch.relu(pre)
        if self.cfg.architecture == "jumprelu":
            assert self.threshold is not None
            return torch.relu(pre) * (pre > self.threshold)
        assert self.cfg.k is not None
        vals, idx = torch.topk(pre, self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, torch.relu(vals))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ---------------------------------------------------------------- io
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The canonical tensors (detached), as :func:`load_canonical` returns them."""
        out = {
            "W_enc": self.W_enc.detach(),
            "b_enc": self.b_enc.detach(),
            "W_dec": self.W_dec.detach(),
            "b_dec": self.b_dec.detach(),
        }
        if self.threshold is not None:
            out["threshold"] = self.threshold.detach()
        return out

    def save(self, folder: str | Path) -> Path:
        """Write a SAELens v6 folder; each file atomically."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / SAELENS_CFG, self.cfg.to_saelens_dict())
        write_tensors(folder / SAELENS_WEIGHTS, self.state_tensors())
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> SAE:
        """Any layout in the loader table, as float32 on ``device``."""
        cfg, t, path = load_canonical(folder)
        try:
            sae = cls(cfg, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"))
        except SAEFormatError as e:
            raise SAEFormatError(f"{path}: {e}") from None
        return sae.to(device)


def load_sae(folder: str | Path, device: str | torch.device = "cpu") -> SAE:
    """Load an SAE folder (SAELens or sparsify layout) as the canonical :class:`SAE`."""
    return SAE.load(folder, device)
