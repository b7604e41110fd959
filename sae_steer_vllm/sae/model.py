"""The canonical in-memory SAE: weights in SAELens orientation plus the activation rule.

Importable without vLLM (torch + safetensors only): the server, the trainer,
the scorer and the tests all load and save SAEs through this class, so a file
that one of them writes is a file every other one reads the same way. Any
layout in :data:`~sae_steer_vllm.sae.loaders.LAYOUTS` loads into it; it always
saves the SAELens v6 layout, which SAELens loads with the same encode/decode
(``normalize_activations`` included, see :data:`~sae_steer_vllm.sae.config.Normalization`;
``tests/test_sae_saelens_parity.py``).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from ..constants import SAELENS_CFG, SAELENS_WEIGHTS
from ..files import atomic_write_json
from .config import SAEConfig, SAEFormatError
from .loaders import load_canonical
from .tensor_file import write_tensors

LAYER_NORM_EPS = 1e-5
"""SAELens's ``layer_norm`` epsilon (added to the std on the way in only)."""


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
    def normalize_in(self, x: torch.Tensor) -> torch.Tensor:
        """SAELens's ``run_time_activation_norm_fn_in`` for ``cfg.normalize_activations``."""
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            return x * (self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True))
        if mode == "layer_norm":
            centred = x - x.mean(dim=-1, keepdim=True)
            return centred / (centred.std(dim=-1, keepdim=True) + LAYER_NORM_EPS)
        return x  # none, expected_average_only_in: identity at inference, as in SAELens

    def normalize_out(self, y: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
        """SAELens's ``run_time_activation_norm_fn_out``: undo the input's own scaling.

        SAELens keeps the statistics of the last ``encode`` on the module; here the
        input they come from is passed explicitly, so ``decode`` stays a pure function.
        """
        if not self.cfg.input_dependent_norm:
            return y
        if x is None:
            raise SAEFormatError(
                f"normalize_activations={self.cfg.normalize_activations!r} rescales each token "
                "by its own statistics: decode(f, x) needs the input x that f was encoded from"
            )
        x = x.to(self.W_dec.dtype)
        if self.cfg.normalize_activations == "constant_norm_rescale":
            return y / (self.cfg.d_in**0.5 / x.norm(dim=-1, keepdim=True))
        mu = x.mean(dim=-1, keepdim=True)
        return y * (x - mu).std(dim=-1, keepdim=True) + mu

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize_in(x.to(self.W_enc.dtype))
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

    def decode(self, f: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruction of ``f``; ``x`` (the encoded input) only for per-token normalisation."""
        return self.normalize_out(f.to(self.W_dec.dtype) @ self.W_dec + self.b_dec, x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x)

    @torch.no_grad()
    def fold_norm_scaling_factor(self, scaling_factor: float) -> SAE:
        """Fold a dataset scaling factor in, as SAELens's ``fold_activation_norm_scaling_factor``.

        For a checkpoint trained with ``expected_average_only_in`` whose weights do not
        hold the factor yet (SAELens folds it only before the final save; its
        ``from_pretrained`` folds the factor its registry lists). Returns a new SAE that
        encodes raw activations; do not use it on an already folded SAE.
        """
        if self.cfg.normalize_activations not in ("none", "expected_average_only_in"):
            raise SAEFormatError(
                f"cannot fold a scaling factor into a {self.cfg.normalize_activations!r} SAE"
            )
        if not scaling_factor > 0:
            raise SAEFormatError(f"scaling factor must be positive, got {scaling_factor}")
        t = self.state_tensors()
        return SAE(
            replace(self.cfg, normalize_activations="none", unfolded_norm_scaling_factor=None),
            t["W_enc"] * scaling_factor,
            t["b_enc"].clone(),
            t["W_dec"] / scaling_factor,
            t["b_dec"] / scaling_factor,
            t.get("threshold"),
        )

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
    def load(
        cls,
        folder: str | Path,
        device: str | torch.device = "cpu",
        norm_scaling_factor: float | None = None,
    ) -> SAE:
        """Any layout in the loader table, as float32 on ``device``.

        ``norm_scaling_factor``: fold this dataset factor in (see
        :meth:`fold_norm_scaling_factor`); only for an ``expected_average_only_in``
        checkpoint whose weights do not hold it yet.
        """
        cfg, t, path = load_canonical(folder)
        try:
            sae = cls(cfg, t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold"))
            if norm_scaling_factor is None and cfg.unfolded_norm_scaling_factor is not None:
                raise SAEFormatError(cfg.unfolded_message())
            if norm_scaling_factor is not None:
                if cfg.normalize_activations != "expected_average_only_in":
                    raise SAEFormatError(
                        f"norm_scaling_factor given but normalize_activations is "
                        f"{cfg.normalize_activations!r}, not 'expected_average_only_in'"
                    )
                sae = sae.fold_norm_scaling_factor(norm_scaling_factor)
        except SAEFormatError as e:
            raise SAEFormatError(f"{path}: {e}") from None
        return sae.to(device)


def load_sae(
    folder: str | Path,
    device: str | torch.device = "cpu",
    norm_scaling_factor: float | None = None,
) -> SAE:
    """Load an SAE folder (any layout in the loader table) as the canonical :class:`SAE`."""
    return SAE.load(folder, device, norm_scaling_factor)
