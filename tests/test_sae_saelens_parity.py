"""SAELens's own loader and encode/decode vs ours, on the same files and inputs (to 1e-5).

One subprocess in ``.venv-saelens`` (built by scripts/setup_saelens_env.sh on first use;
the test skips if sae-lens cannot be installed here) loads every variant folder with
``SAE.load_from_disk`` and writes its ``encode(x)`` and ``decode(f)``; we then load the
same folders with :func:`load_sae` and compare. Variants cover every combination SAELens
accepts at inference that an R1-distill user meets: architectures standard / topk /
jumprelu / gated; ``normalize_activations`` none / expected_average_only_in /
constant_norm_rescale / layer_norm; ``apply_b_dec_to_input`` true and false; 6.x nested
and pre-6.0 flat configs; hook names ``blocks.N.hook_resid_post``, ``blocks.N.hook_resid_pre``
and ``model.layers.N``. ``authors`` has the field set of the authors' release
(``andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts``), scaled down.

Also checked: what we *write* (:meth:`SAE.save`) SAELens loads with the same semantics,
the server's per-feature rows (:class:`SAERows`, what the in-graph clamp encodes with)
give SAELens's activations, and folding a dataset scaling factor equals SAELens's
``fold_activation_norm_scaling_factor``.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import saelens_env
from safetensors.torch import load_file, save_file

from sae_steer_vllm.sae import SAE, SAERows, load_sae

ROOT = Path(__file__).resolve().parent.parent
D, S = 32, 128
SCALE = 2.5  # a dataset scaling factor for the fold check

SNIPPET = r"""
import json, sys, warnings, torch
from safetensors.torch import load_file, save_file
from sae_lens import SAE
warnings.simplefilter("ignore")
x = load_file(sys.argv[1])["x"]
fold = float(sys.argv[2])
info = {}
for folder in sys.argv[3:]:
    sae = SAE.load_from_disk(folder, device="cpu")
    m = sae.cfg.metadata
    info[folder] = {
        "cls": type(sae).__name__,
        "hook_name": m.hook_name,
        "prepend_bos": m.prepend_bos,
        "normalize_activations": sae.cfg.normalize_activations,
        "apply_b_dec_to_input": sae.cfg.apply_b_dec_to_input,
        "k": getattr(sae.cfg, "k", None),
    }
    out = {}
    with torch.no_grad():
        out["f"] = sae.encode(x)
        out["out"] = sae.decode(out["f"])  # right after encode: the norm modes keep state
        if folder.endswith("-fold"):
            sae.fold_activation_norm_scaling_factor(fold)
            out["f_fold"] = sae.encode(x)
            out["out_fold"] = sae.decode(out["f_fold"])
    save_file({k: v.contiguous() for k, v in out.items()}, folder + "/saelens_out.safetensors")
import sae_lens
print(json.dumps({"version": sae_lens.__version__, "info": info}))
"""

# SAELens 5.5.2 (the version the authors trained with) wrote the *runner* config to cfg.json
# (LanguageModelSAERunnerConfig.to_dict(), after folding the dataset scaling factor into the
# weights, so the file still says expected_average_only_in). The release's cfg.json is not
# in any index we can read; this is that dict rebuilt from the authors' training config
# (training/configs/r1-distill-llama-8b.yaml in their repository), d_in 4096 -> 32 and
# d_sae 65536 -> 128.
AUTHORS_CFG: dict[str, Any] = {
    "model_name": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "model_class_name": "HookedTransformer",
    "hook_name": "blocks.19.hook_resid_post",
    "hook_eval": "NOT_IN_USE",
    "hook_layer": 19,
    "hook_head_index": None,
    "dataset_path": "andreuka18/DeepSeek-R1-Distill-Llama-8B-lmsys-openthoughts-tokenized",
    "dataset_trust_remote_code": True,
    "streaming": False,
    "is_dataset_tokenized": True,
    "context_size": 1024,
    "use_cached_activations": False,
    "architecture": "standard",
    "d_in": D,
    "d_sae": S,
    "b_dec_init_method": "zeros",
    "expansion_factor": S // D,
    "activation_fn": "relu",
    "activation_fn_kwargs": {},
    "normalize_sae_decoder": False,
    "apply_b_dec_to_input": False,
    "decoder_heuristic_init": True,
    "init_encoder_as_decoder_transpose": True,
    "normalize_activations": "expected_average_only_in",
    "device": "cuda",
    "seed": 42,
    "dtype": "float32",
    "prepend_bos": False,
    "l1_coefficient": 5,
    "lp_norm": 1.0,
    "scale_sparsity_penalty_by_decoder_norm": True,
    "lr": 5e-05,
    "train_batch_size_tokens": 4096,
    "training_tokens": 819200000,
    "model_from_pretrained_kwargs": {"center_writing_weights": False, "dtype": "bfloat16"},
    "exclude_special_tokens": [128000, 128001],
    "sae_lens_version": "5.5.2",
    "sae_lens_training_version": "5.5.2",
}


def _v6(arch: str, norm: str, apply: bool, hook: str, **extra: Any) -> dict[str, Any]:
    return {
        "architecture": arch,
        "d_in": D,
        "d_sae": S,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": apply,
        "normalize_activations": norm,
        "reshape_activations": "none",
        **extra,
        "metadata": {"hook_name": hook, "prepend_bos": True, "sae_lens_version": "6.0.0"},
    }


def _flat(arch: str, norm: Any, apply: bool, hook_key: str, hook: str, **extra: Any) -> dict:
    return {
        "architecture": arch,
        "d_in": D,
        "d_sae": S,
        hook_key: hook,
        "apply_b_dec_to_input": apply,
        "normalize_activations": norm,
        "dtype": "float32",
        "device": "cpu",
        "sae_lens_version": "3.12.0",
        **extra,
    }


# name -> (cfg.json, our resid_post layer)
VARIANTS: dict[str, tuple[dict[str, Any], int]] = {
    "authors": (AUTHORS_CFG, 19),
    "authors-fold": (AUTHORS_CFG, 19),
    "std-none-b": (_v6("standard", "none", True, "blocks.5.hook_resid_post"), 5),
    "std-ln-nob": (_v6("standard", "layer_norm", False, "blocks.5.hook_resid_post"), 5),
    "std-cnr-b": (_v6("standard", "constant_norm_rescale", True, "blocks.5.hook_resid_post"), 5),
    "topk-none-nob": (_v6("topk", "none", False, "blocks.2.hook_resid_post", k=7), 2),
    "topk-ln-b": (_v6("topk", "layer_norm", True, "blocks.2.hook_resid_post", k=7), 2),
    "topk-default-k": (_v6("topk", "none", True, "blocks.2.hook_resid_post"), 2),
    "jump-eai-b": (_v6("jumprelu", "expected_average_only_in", True, "model.layers.4"), 4),
    "jump-cnr-nob": (_v6("jumprelu", "constant_norm_rescale", False, "model.layers.4"), 4),
    "gated-none-b": (_v6("gated", "none", True, "blocks.7.hook_resid_pre"), 6),
    "gated-ln-nob": (_v6("gated", "layer_norm", False, "blocks.7.hook_resid_post"), 7),
    "flat-topk-pre": (
        _flat(
            "standard",
            True,  # pre-6.0 boolean: expected_average_only_in
            True,
            "hook_point",
            "blocks.3.hook_resid_pre",
            activation_fn_str="topk",
            activation_fn_kwargs={"k": 9},
        ),
        2,
    ),
    "flat-jump-ln": (_flat("jumprelu", "layer_norm", False, "hook_name", "model.layers.1"), 1),
    "flat-std-none": (_flat("standard", None, True, "hook_name", "blocks.0.hook_resid_post"), 0),
}


def _tensors(arch: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {
        "W_enc": torch.randn(D, S, generator=g) / D**0.5,
        "W_dec": torch.randn(S, D, generator=g) * 0.3,
        "b_dec": torch.randn(D, generator=g) * 0.2,
    }
    if arch == "gated":
        t["b_gate"] = torch.randn(S, generator=g) * 0.3
        t["b_mag"] = torch.randn(S, generator=g) * 0.3
        t["r_mag"] = torch.randn(S, generator=g) * 0.3
    else:
        t["b_enc"] = torch.randn(S, generator=g) * 0.3 - 0.1
    if arch == "jumprelu":
        t["threshold"] = torch.rand(S, generator=g) * 0.4
    return t


@pytest.fixture(scope="module")
def saelens_python() -> Path:
    return saelens_env.saelens_python()


def _run_saelens(py: Path, x_file: Path, folders: list[Path]) -> dict[str, Any]:
    r = subprocess.run(
        [str(py), "-c", SNIPPET, str(x_file), str(SCALE), *map(str, folders)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def _close(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=msg)


@pytest.mark.slow
def test_saelens_parity_every_variant(saelens_python: Path, tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    # offset and spread per token, so per-token normalisation and b_dec both matter
    x = (torch.randn(96, D, generator=g) * 2.0 + torch.randn(96, 1, generator=g)).contiguous()
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    folders = []
    for i, (name, (cfg, _)) in enumerate(VARIANTS.items()):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps(cfg))
        save_file(_tensors(cfg["architecture"], i), str(folder / "sae_weights.safetensors"))
        folders.append(folder)
    # what we write must mean the same to SAELens: re-save every variant through our SAE
    resaved = [load_sae(f).save(tmp_path / f"ours-{f.name}") for f in folders]
    got = _run_saelens(saelens_python, tmp_path / "x.safetensors", folders + resaved)
    print("sae_lens", got["version"])
    info = got["info"]
    for folder, again in zip(folders, resaved, strict=True):
        name = folder.name
        theirs = load_file(str(folder / "saelens_out.safetensors"))
        sae = load_sae(folder)
        assert sae.cfg.hook_layer == VARIANTS[name][1], name
        assert sae.cfg.hook_name == info[str(folder)]["hook_name"], name
        assert sae.cfg.prepend_bos == info[str(folder)]["prepend_bos"], name
        theirs_cfg = info[str(folder)]
        assert sae.cfg.normalize_activations == theirs_cfg["normalize_activations"], name
        assert sae.cfg.apply_b_dec_to_input == theirs_cfg["apply_b_dec_to_input"], name
        with torch.no_grad():
            f = sae.encode(x)
            _close(f, theirs["f"], f"{name}: encode")
            _close(sae.decode(f, x), theirs["out"], f"{name}: decode")
            assert (f > 0).any() and (f == 0).any(), name
            if sae.cfg.input_dependent_norm:  # the mode must matter on these inputs
                plain = replace(sae.cfg, normalize_activations="none")
                assert not torch.allclose(SAE(plain, *_canon(sae)).encode(x), f), name
            # the re-saved folder, loaded by SAELens, encodes and decodes the same
            resaved_out = load_file(str(again / "saelens_out.safetensors"))
            _close(resaved_out["f"], theirs["f"], f"{name}: SAELens on our file, encode")
            _close(resaved_out["out"], theirs["out"], f"{name}: SAELens on our file, decode")
            if name.endswith("-fold"):
                folded = load_sae(folder, norm_scaling_factor=SCALE)
                ff = folded.encode(x)
                _close(ff, theirs["f_fold"], f"{name}: folded encode")
                _close(folded.decode(ff), theirs["out_fold"], f"{name}: folded decode")
        if sae.cfg.architecture == "topk":
            expected_k = info[str(folder)]["k"]
            assert sae.cfg.k == expected_k and (f > 0).sum(-1).max() <= expected_k, name
        if not sae.cfg.input_dependent_norm and sae.cfg.architecture != "topk":
            _rows_match(folder, x, theirs["f"])


def _canon(sae: SAE) -> tuple[torch.Tensor | None, ...]:
    t = sae.state_tensors()
    return t["W_enc"], t["b_enc"], t["W_dec"], t["b_dec"], t.get("threshold")


def _rows_match(folder: Path, x: torch.Tensor, f: torch.Tensor) -> None:
    """The server's per-feature rows (slot_tables encodes with them) give SAELens's acts."""
    rows = SAERows(folder)
    for i in (0, 3, 17, S - 1):
        enc, bias, thr, dec = rows.feature(i)
        pre = x @ enc + bias
        act = torch.relu(pre) * (pre > thr)
        _close(act, f[:, i], f"{folder.name}: rows feature {i}")
        _close(dec, load_sae(folder).W_dec[i].detach(), f"{folder.name}: decoder row {i}")
