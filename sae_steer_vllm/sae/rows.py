"""Single features' encoder/decoder rows, read without loading the matrices.

The server needs a handful of rows per request, while an 8B model's 16x SAE is
2 GB per matrix; safetensors slices read only the bytes asked for. The layout
entry (:mod:`sae_steer_vllm.sae.loaders`) says where each tensor is stored and
how it is oriented, the same entry the full loader uses.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .loaders import LAYOUTS, orientation, read_config
from .tensor_file import header_shapes, opened


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A flat float32 copy that owns its memory (never a view of a memory-mapped file)."""
    return t.to(torch.float32, copy=True).reshape(-1)


class SAERows:
    """Per-feature rows of one SAE folder (any layout), plus its small vectors in memory."""

    def __init__(self, folder: str | Path) -> None:
        self.cfg, self.path, self.layout = read_config(folder)
        stored = LAYOUTS[self.layout].stored
        self._enc_name, self._dec_name = stored.W_enc, stored.W_dec
        shapes = header_shapes(self.path)
        self._enc_rows_first, self._dec_rows_first = orientation(
            self.cfg, stored, shapes, self.path
        )
        present = set(shapes)
        with opened(self.path) as f:
            self.b_dec = _owned(f.get_tensor(stored.b_dec))
            self.b_enc = _owned(f.get_tensor(stored.bias_name(present)))
            thr = stored.threshold_of(present, f.get_tensor)
            self.threshold = None if thr is None else _owned(thr)
            scale = stored.enc_scale_of(present, f.get_tensor)
            self._enc_scale = None if scale is None else _owned(scale)
        fold = LAYOUTS[self.layout].vectors
        if fold is not None:  # a layout whose stored vectors need a norm factor folded in
            vec = fold(self.cfg, self.path)
            self.b_enc, self.b_dec = _owned(vec["b_enc"]), _owned(vec["b_dec"])
            self.threshold = _owned(vec["threshold"]) if "threshold" in vec else None

    def feature(self, i: int) -> tuple[torch.Tensor, float, float, torch.Tensor]:
        """(encoder column [d_in], effective bias, threshold, decoder row [d_in]).

        The effective bias folds ``-b_dec @ W_enc[:, i]`` in, so the server can
        compute ``pre_i(h) = h @ enc + bias`` with one dot product per token.
        """
        if not 0 <= i < self.cfg.d_sae:
            raise IndexError(f"feature {i} out of range [0, {self.cfg.d_sae})")
        with opened(self.path) as f:
            enc_s = f.get_slice(self._enc_name)
            enc = enc_s[i] if self._enc_rows_first else enc_s[:, i]
            dec_s = f.get_slice(self._dec_name)
            dec = dec_s[i] if self._dec_rows_first else dec_s[:, i]
        # Copy out: a float32 slice can be a view of the file's memory map, and keeping
        # it would keep one mapping of the whole file alive per feature ever planned.
        enc = _owned(enc)
        if self._enc_scale is not None:  # a gated SAE, read as its JumpReLU (loaders.StoredNames)
            enc = enc * self._enc_scale[i]
        dec = _owned(dec)
        bias = float(self.b_enc[i])
        if self.cfg.apply_b_dec_to_input:
            bias -= float(self.b_dec @ enc)
        thr = 0.0
        if self.threshold is not None:
            thr = max(float(self.threshold[i]), 0.0)
        return enc, bias, thr, dec
