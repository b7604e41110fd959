"""``sae-steer convert``: a pickled SAE checkpoint -> a SAELens safetensors folder the server loads.

The server refuses ``.pt``/``.pth`` files (it never unpickles); this command is the one
place that reads them, with ``torch.load(weights_only=True)``
(:mod:`sae_steer_vllm.sae.pickled`), and writes the SAELens layout: ``cfg.json`` with the
layer and hook the user gives where the pickle holds none, and ``sae_weights.safetensors``.
It then loads the folder back through the server's own loader and checks it encodes like
the converted weights, so a folder it writes is one the server serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from ..command import CommandConfig, run_model_command
from ..errors import UsageError
from .model import load_sae
from .pickled import PICKLE_SUFFIXES, PickleHints, sae_from_pickle

PROG = "sae-steer convert"


class ConvertCommand(CommandConfig):
    """Convert a pickled SAE (dictionary_learning ae.pt, Goodfire .pth, qresearch .pt) into the
    SAELens safetensors layout that `sae-steer serve --sae NAME=FOLDER` loads. The pickle is
    read with torch.load(weights_only=True): tensors only, anything else is refused.
    """

    input: Path = Field(json_schema_extra={"cli": {"metavar": "FILE"}})
    """the .pt / .pth file"""
    out: Path
    """output folder (created; must not already hold an SAE)"""
    layer: int | None = Field(default=None, ge=0)
    """decoder layer whose output (resid_post) the SAE reads; required unless --hook-name or a
    dictionary_learning config.json beside the file names it"""
    hook_name: str | None = None
    """hook name to record (default: blocks.LAYER.hook_resid_post)"""
    model_name: str = ""
    """model the SAE was trained on, recorded in cfg.json"""
    dict_class: Literal["AutoEncoderTopK", "BatchTopKSAE"] | None = None
    """dictionary_learning class of a TopK-family file when no config.json beside it says"""


def convert(cmd: ConvertCommand) -> Path:
    """Write the converted folder and return it (library entry point of the command)."""
    if not cmd.input.is_file():
        raise UsageError(f"{cmd.input}: no such file")
    if cmd.input.suffix.lower() not in PICKLE_SUFFIXES:
        raise UsageError(
            f"{cmd.input}: expected a pickled checkpoint ({', '.join(PICKLE_SUFFIXES)}); a "
            "safetensors SAE folder needs no conversion"
        )
    if cmd.out.exists() and any(cmd.out.iterdir()):
        raise UsageError(f"{cmd.out}: exists and is not empty; choose a new folder")
    hints = PickleHints(cmd.layer, cmd.hook_name, cmd.model_name, cmd.dict_class)
    sae, kind = sae_from_pickle(cmd.input, hints)
    sae.save(cmd.out)
    back = load_sae(cmd.out)  # what the server will see
    x = torch.randn(4, sae.cfg.d_in, generator=torch.Generator().manual_seed(0))
    if not torch.allclose(back.encode(x), sae.encode(x), atol=1e-5, rtol=1e-4):
        raise UsageError(f"{cmd.out}: the written SAE does not encode like the converted one")
    print(
        f"{PROG}: {cmd.input.name} ({kind}) -> {cmd.out}: {sae.cfg.architecture}, "
        f"d_in={sae.cfg.d_in} d_sae={sae.cfg.d_sae}, layer {sae.cfg.hook_layer}"
    )
    return cmd.out


def _run(cmd: ConvertCommand) -> int:
    convert(cmd)
    return 0


def main(argv: list[str]) -> int:
    """``sae-steer convert --input FILE --out FOLDER [--layer N] ...``"""
    return run_model_command(PROG, ConvertCommand, _run, argv)
