"""The one definition of an SAE on disk and of encode/decode.

Importable without vLLM (torch + safetensors only): the server, the trainer,
the scorer and the tests all load and save SAEs through this module, so a file
that one of them writes is a file every other one reads the same way.

Two on-disk layouts are read:

* SAELens: ``cfg.json`` + ``sae_weights.safetensors`` with ``W_enc [d_in, d_sae]``,
  ``b_enc``, ``W_dec [d_sae, d_in]``, ``b_dec`` and, for JumpReLU, ``threshold``
  (or ``log_threshold``). Both the v6 config (hook/model under ``metadata``) and
  the older flat config are accepted.
* sparsify (EleutherAI): ``cfg.json`` + ``sae.safetensors`` with
  ``encoder.weight [num_latents, d_in]``, ``encoder.bias``, ``W_dec``, ``b_dec``;
  always TopK; the layer comes from ``cfg.json`` ``hookpoint``/``layer`` or the
  folder name (``layers.12``).

We write only the SAELens v6 layout, with any input normalisation folded into
the weights, so that SAELens itself can load what we train.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file

Architecture = Literal["standard", "topk", "jumprelu"]
ARCHITECTURES: tuple[str, ...] = ("standard", "topk", "jumprelu")

SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
SPARSIFY_WEIGHTS = "sae.safetensors"
STATS_FILE = "feature_stats.safetensors"


class SAEFormatError(ValueError):
    """A file on disk is not an SAE we can load; the message names file and problem."""


@dataclass(frozen=True)
class SAEConfig:
    """What a consumer needs to know about an SAE, independent of the file layout."""

    d_in: int
    d_sae: int
    architecture: Architecture
    hook_layer: int
    hook_name: str = ""
    model_name: str = ""
    k: int | None = None
    apply_b_dec_to_input: bool = True
    dtype: str = "float32"
    context_size: int | None = None
    extra_metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SAEFormatError(f"unknown SAE architecture {self.architecture!r}")
        if self.architecture == "topk" and (self.k is None or self.k <= 0):
            raise SAEFormatError("a topk SAE needs a positive k")
        if self.d_in <= 0 or self.d_sae <= 0 or self.hook_layer < 0:
            raise SAEFormatError(
                f"bad sizes d_in={self.d_in} d_sae={self.d_sae} layer={self.hook_layer}"
            )

    def to_saelens_dict(self) -> dict[str, Any]:
        """SAELens v6 cfg.json (``normalize_activations`` is always folded in)."""
        cfg: dict[str, Any] = {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": self.dtype,
            "device": "cpu",
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "normalize_activations": "none",
            "reshape_activations": "none",
            "metadata": {
                "model_name": self.model_name,
                "hook_name": self.hook_name or resid_post_hook_name(self.hook_layer),
                "hook_layer": self.hook_layer,
                "hook_head_index": None,
                "context_size": self.context_size,
                "prepend_bos": True,
                "model_class_name": "HookedTransformer",
                "sae_lens_training_version": None,
                # SAELens treats a config without a version as pre-6.0 and then
                # ignores this metadata block (hook name, model) on load.
                "sae_lens_version": "6.0.0",
                **self.extra_metadata,
            },
        }
        if self.architecture == "topk":
            cfg["k"] = self.k
        return cfg


def resid_post_hook_name(layer: int) -> str:
    """TransformerLens name of the residual stream after block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


_HOOK_LAYER_RE = re.compile(r"(?:blocks|layers)\.(\d+)")


def _layer_from_text(text: str) -> int | None:
    m = _HOOK_LAYER_RE.search(text)
    return int(m.group(1)) if m else None


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

    def feature_threshold(self, feature: int) -> float:
        """Activation fires iff pre-activation > this (0 for ReLU)."""
        if self.cfg.architecture == "jumprelu":
            assert self.threshold is not None
            return max(float(self.threshold[feature]), 0.0)
        return 0.0

    # ---------------------------------------------------------------- io
    def state_tensors(self) -> dict[str, torch.Tensor]:
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
        """Write a SAELens v6 folder atomically (temp files, then rename)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.state_tensors().items()}
        _atomic_write_bytes(
            folder / SAELENS_CFG,
            json.dumps(self.cfg.to_saelens_dict(), indent=2).encode(),
        )
        tmp = folder / (SAELENS_WEIGHTS + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(folder / SAELENS_WEIGHTS)
        return folder

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> SAE:
        cfg, weights_path, layout = read_config(folder)
        tensors = _read_tensors(weights_path)
        return cls._from_tensors(cfg, tensors, weights_path, layout).to(device)

    @classmethod
    def _from_tensors(
        cls,
        cfg: SAEConfig,
        t: dict[str, torch.Tensor],
        path: Path,
        layout: str,
    ) -> SAE:
        try:
            if layout == "sparsify":
                W_enc = _orient(t["encoder.weight"], cfg.d_in, cfg.d_sae, path, "encoder.weight")
                b_enc, W_dec, b_dec = t["encoder.bias"], t["W_dec"], t["b_dec"]
                threshold = None
            else:
                W_enc = _orient(t["W_enc"], cfg.d_in, cfg.d_sae, path, "W_enc")
                b_enc, W_dec, b_dec = t["b_enc"], t["W_dec"], t["b_dec"]
                threshold = t.get("threshold")
                if threshold is None and "log_threshold" in t:
                    threshold = torch.exp(t["log_threshold"])
        except KeyError as e:
            raise SAEFormatError(f"{path}: missing tensor {e.args[0]!r}") from None
        W_dec = _orient_dec(W_dec, cfg.d_in, cfg.d_sae, path)
        try:
            return cls(
                cfg,
                W_enc.float(),
                b_enc.float(),
                W_dec.float(),
                b_dec.float(),
                None if threshold is None else threshold.float(),
            )
        except SAEFormatError as e:
            raise SAEFormatError(f"{path}: {e}") from None


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise SAEFormatError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def _orient(w: torch.Tensor, d_in: int, d_sae: int, path: Path, name: str) -> torch.Tensor:
    """Return the encoder as [d_in, d_sae], accepting either orientation."""
    if tuple(w.shape) == (d_in, d_sae):
        return w
    if tuple(w.shape) == (d_sae, d_in):
        return w.T.contiguous()
    raise SAEFormatError(f"{path}: {name} has shape {tuple(w.shape)}; d_in={d_in} d_sae={d_sae}")


def _orient_dec(w: torch.Tensor, d_in: int, d_sae: int, path: Path) -> torch.Tensor:
    if tuple(w.shape) == (d_sae, d_in):
        return w
    if tuple(w.shape) == (d_in, d_sae):
        return w.T.contiguous()
    raise SAEFormatError(f"{path}: W_dec has shape {tuple(w.shape)}; d_in={d_in} d_sae={d_sae}")


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
    except Exception as e:  # safetensors raises several types for corrupt files
        raise SAEFormatError(f"{path}: not a readable safetensors file ({e})") from None


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def read_config(folder: str | Path) -> tuple[SAEConfig, Path, str]:
    """Parse cfg.json of either layout without reading the weights.

    Returns the config, the weights path and the layout name ("saelens" or
    "sparsify"). Sizes missing from the config are read from the safetensors
    header, so this stays cheap for multi-GB SAEs.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SAEFormatError(f"{folder}: not a directory (an SAE is a folder with cfg.json)")
    cfg_path = folder / SAELENS_CFG
    if not cfg_path.is_file():
        raise SAEFormatError(f"{cfg_path}: missing")
    try:
        raw = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SAEFormatError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise SAEFormatError(f"{cfg_path}: expected a JSON object")
    for name in (SAELENS_WEIGHTS, SPARSIFY_WEIGHTS):
        if (folder / name).is_file():
            weights = folder / name
            break
    else:
        if any(folder.glob("*.pt")) or any(folder.glob("*.bin")):
            raise SAEFormatError(
                f"{folder}: only pickle weights found; safetensors required (pickle is never loaded)"
            )
        raise SAEFormatError(f"{folder}: no {SAELENS_WEIGHTS} or {SPARSIFY_WEIGHTS}")
    shapes = _header_shapes(weights)
    try:
        if weights.name == SPARSIFY_WEIGHTS:
            return _sparsify_config(raw, folder, shapes, cfg_path), weights, "sparsify"
        return _saelens_config(raw, shapes, cfg_path), weights, "saelens"
    except SAEFormatError as e:
        msg = str(e)
        raise SAEFormatError(
            msg if msg.startswith(str(cfg_path)) else f"{cfg_path}: {msg}"
        ) from None


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:
        raise SAEFormatError(f"{path}: not a readable safetensors file ({e})") from None


def _saelens_config(
    raw: dict[str, Any], shapes: dict[str, tuple[int, ...]], cfg_path: Path
) -> SAEConfig:
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    assert isinstance(meta, dict)

    def get(key: str, default: Any = None) -> Any:
        return raw.get(key, meta.get(key, default))

    if "W_dec" not in shapes:
        raise SAEFormatError("weights file has no W_dec tensor")
    d_sae, d_in = shapes["W_dec"]
    d_in = int(get("d_in", d_in))
    d_sae = int(get("d_sae", d_sae))
    arch = str(get("architecture", "standard"))
    act_fn = str(get("activation_fn_str", get("activation_fn", "relu")))
    k = get("k")
    kwargs = get("activation_fn_kwargs") or {}
    if k is None and isinstance(kwargs, dict):
        k = kwargs.get("k")
    if arch == "standard" and act_fn == "topk":
        arch = "topk"
    if arch == "batchtopk":
        # SAELens folds BatchTopK into a JumpReLU threshold when it saves for inference
        if "threshold" in shapes or "log_threshold" in shapes:
            arch = "jumprelu"
        else:
            raise SAEFormatError("batchtopk SAE without a threshold tensor cannot run at inference")
    if arch not in ARCHITECTURES:
        raise SAEFormatError(f"unsupported architecture {arch!r} (supported: {ARCHITECTURES})")
    hook_name = str(get("hook_name", ""))
    layer = get("hook_layer")
    if layer is None:
        layer = _layer_from_text(hook_name)
    if layer is None:
        raise SAEFormatError("no hook_layer and no layer number in hook_name")
    norm = get("normalize_activations", "none")
    if norm not in (None, "none"):
        raise SAEFormatError(
            f"normalize_activations={norm!r} is not folded into the weights; "
            "fold it (SAELens: sae.fold_activation_norm_scaling_factor) and save again"
        )
    if hook_name and "resid_post" not in hook_name and "layers." not in hook_name:
        raise SAEFormatError(
            f"hook {hook_name!r} is not a residual-stream-after-layer hook (resid_post)"
        )
    ctx = get("context_size")
    return SAEConfig(
        d_in=d_in,
        d_sae=d_sae,
        architecture=arch,  # type: ignore[arg-type]
        hook_layer=int(layer),
        hook_name=hook_name,
        model_name=str(get("model_name", "")),
        k=None if k is None else int(k),
        apply_b_dec_to_input=bool(get("apply_b_dec_to_input", True)),
        dtype=str(get("dtype", "float32")),
        context_size=None if ctx is None else int(ctx),
    )


def _sparsify_config(
    raw: dict[str, Any], folder: Path, shapes: dict[str, tuple[int, ...]], cfg_path: Path
) -> SAEConfig:
    if "encoder.weight" not in shapes:
        raise SAEFormatError("sparsify weights have no encoder.weight tensor")
    d_sae, d_in = shapes["encoder.weight"]
    d_in = int(raw.get("d_in", d_in))
    k = raw.get("k")
    if k is None:
        raise SAEFormatError("sparsify config has no k")
    layer = raw.get("layer")
    if layer is None:
        layer = _layer_from_text(str(raw.get("hookpoint", ""))) or _layer_from_text(folder.name)
    if layer is None:
        raise SAEFormatError(
            "cannot tell the layer: no 'layer'/'hookpoint' and folder is not layers.N"
        )
    return SAEConfig(
        d_in=d_in,
        d_sae=int(d_sae),
        architecture="topk",
        hook_layer=int(layer),
        hook_name=f"layers.{layer}",
        model_name=str(raw.get("model", "")),
        k=int(k),
        apply_b_dec_to_input=True,
    )


# ------------------------------------------------------------------ rows on demand
def _owned(t: torch.Tensor) -> torch.Tensor:
    """A flat float32 copy that owns its memory (never a view of a memory-mapped file)."""
    return t.to(torch.float32, copy=True).reshape(-1)


class SAERows:
    """Reads single features' encoder/decoder rows without loading the matrices.

    The server needs a handful of rows per request, while an 8B model's 16x SAE
    is 2 GB per matrix; safetensors slices read only the bytes asked for.
    """

    def __init__(self, folder: str | Path) -> None:
        self.cfg, self.path, self.layout = read_config(folder)
        self._enc_name = "encoder.weight" if self.layout == "sparsify" else "W_enc"
        self._benc_name = "encoder.bias" if self.layout == "sparsify" else "b_enc"
        shapes = _header_shapes(self.path)
        enc_shape = tuple(shapes[self._enc_name])
        square = self.cfg.d_sae == self.cfg.d_in
        if self.layout == "sparsify":  # nn.Linear layout unless clearly transposed
            self._enc_rows_first = not (enc_shape == (self.cfg.d_in, self.cfg.d_sae) and not square)
        else:  # SAELens layout unless clearly transposed
            self._enc_rows_first = enc_shape == (self.cfg.d_sae, self.cfg.d_in) and not square
        self._dec_rows_first = tuple(shapes["W_dec"]) == (self.cfg.d_sae, self.cfg.d_in)
        with safe_open(str(self.path), framework="pt") as f:
            self.b_dec = _owned(f.get_tensor("b_dec"))
            thr = None
            if "threshold" in shapes:
                thr = _owned(f.get_tensor("threshold"))
            elif "log_threshold" in shapes:
                thr = torch.exp(_owned(f.get_tensor("log_threshold")))
            self.threshold = thr
            self.b_enc = _owned(f.get_tensor(self._benc_name))

    def feature(self, i: int) -> tuple[torch.Tensor, float, float, torch.Tensor]:
        """(encoder column [d_in], effective bias, threshold, decoder row [d_in]).

        The effective bias folds ``-b_dec @ W_enc[:, i]`` in, so the server can
        compute ``pre_i(h) = h @ enc + bias`` with one dot product per token.
        """
        if not 0 <= i < self.cfg.d_sae:
            raise IndexError(f"feature {i} out of range [0, {self.cfg.d_sae})")
        with safe_open(str(self.path), framework="pt") as f:
            enc_s = f.get_slice(self._enc_name)
            enc = enc_s[i] if self._enc_rows_first else enc_s[:, i]
            dec_s = f.get_slice("W_dec")
            dec = dec_s[i] if self._dec_rows_first else dec_s[:, i]
        # Copy out: a float32 slice can be a view of the file's memory map, and keeping
        # it would keep one mapping of the whole file alive per feature ever planned.
        enc = _owned(enc)
        dec = _owned(dec)
        bias = float(self.b_enc[i])
        if self.cfg.apply_b_dec_to_input:
            bias -= float(self.b_dec @ enc)
        thr = 0.0
        if self.threshold is not None:
            thr = max(float(self.threshold[i]), 0.0)
        return enc, bias, thr, dec


# ------------------------------------------------------------------ feature statistics
def stats_path(folder: str | Path) -> Path:
    return Path(folder) / STATS_FILE


def load_max_activation(folder: str | Path) -> torch.Tensor | None:
    """Per-feature max activation from the statistics file, or None if absent."""
    p = stats_path(folder)
    if not p.is_file():
        return None
    try:
        with safe_open(str(p), framework="pt") as f:
            if "max_activation" not in f.keys():  # noqa: SIM118
                raise SAEFormatError(f"{p}: no max_activation tensor")
            t = f.get_tensor("max_activation").float()
    except SAEFormatError:
        raise
    except Exception as e:
        raise SAEFormatError(f"{p}: not a readable safetensors file ({e})") from None
    if not torch.isfinite(t).all():
        raise SAEFormatError(f"{p}: max_activation has non-finite values")
    return t


def is_finite_number(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


__all__ = [
    "ARCHITECTURES",
    "SAE",
    "SAEConfig",
    "SAEFormatError",
    "SAERows",
    "load_max_activation",
    "read_config",
    "resid_post_hook_name",
    "stats_path",
]
