"""More SAE layouts: lm-saes / Llama Scope R1-distill folders, and refused transcoders.

The reference below is lm-saes's dataset-wise computation written out from its code
(``SparseAutoEncoder.encode`` / ``compute_norm_factor``), not from ours: scale the input by
``sqrt(d_model) / norm``, ``h = x @ encoder.weight.T + b``, gate ``h * ||decoder col|| >
exp(log_threshold)``, decode with ``nn.Linear``, unscale. Files use lm-saes's exact tensor
names, shapes (``nn.Linear`` orientation) and config fields.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_steer_vllm.sae import SAE, SAEFormatError, SAERows, load_sae, read_config

D, EXP = 16, 4
F = D * EXP
HOOK = "blocks.5.hook_resid_post"
NORM = 9.5  # dataset average activation norm; sqrt(16) / 9.5 is the input scale


def _lm_saes_config(**over: object) -> dict:
    """The fields lm-saes's SAEConfig.model_dump() writes to config.json (R1-distill release)."""
    cfg = {
        "sae_type": "sae",
        "d_model": D,
        "expansion_factor": EXP,
        "use_decoder_bias": True,
        "act_fn": "jumprelu",
        "jump_relu_threshold": 0.52734375,
        "apply_decoder_bias_to_pre_encoder": False,
        "norm_activation": "dataset-wise",
        "sparsity_include_decoder_norm": True,
        "force_unit_decoder_norm": False,
        "top_k": 50,
        "hook_point_in": HOOK,
        "hook_point_out": HOOK,
        "use_glu_encoder": False,
        "jumprelu_threshold_window": 2.0,
    }
    cfg.update(over)
    return cfg


def _lm_saes_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dec = torch.randn(D, F, generator=g) * (0.5 + torch.rand(F, generator=g))  # unequal norms
    return {
        "encoder.weight": torch.randn(F, D, generator=g) * 0.3,
        "encoder.bias": torch.randn(F, generator=g) * 0.2,
        "decoder.weight": dec,
        "decoder.bias": torch.randn(D, generator=g),
        "log_jumprelu_threshold": torch.log(0.5 + torch.rand(F, generator=g)),
        f"dataset_average_activation_norm.{HOOK}": torch.tensor(NORM),
    }


def _write(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors")
    )
    return folder


def _lm_saes_reference(
    t: dict[str, torch.Tensor], cfg: dict, x: torch.Tensor, norm: float | None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """lm-saes dataset-wise: (feature acts on its training scale, reconstruction, input scale)."""
    s = 1.0 if norm is None else math.sqrt(cfg["d_model"]) / norm
    xn = x * s
    if cfg["apply_decoder_bias_to_pre_encoder"]:
        xn = xn - t["decoder.bias"]
    h = torch.nn.functional.linear(xn, t["encoder.weight"], t["encoder.bias"])
    dn = t["decoder.weight"].norm(p=2, dim=0) if cfg["sparsity_include_decoder_norm"] else 1.0
    mask = (h * dn).gt(t["log_jumprelu_threshold"].exp())
    f = h * mask
    recon = torch.nn.functional.linear(f, t["decoder.weight"], t["decoder.bias"]) / s
    return f, recon, s


@pytest.mark.parametrize(
    "variant", ["release", "b_dec_to_input", "norm_in_config_only", "no_decoder_norm", "inference"]
)
def test_llama_scope_matches_lm_saes(tmp_path: Path, variant: str) -> None:
    cfg = _lm_saes_config()
    t = _lm_saes_tensors()
    norm: float | None = NORM
    if variant == "b_dec_to_input":
        cfg["apply_decoder_bias_to_pre_encoder"] = True
    elif variant == "norm_in_config_only":
        del t[f"dataset_average_activation_norm.{HOOK}"]
        cfg["dataset_average_activation_norm"] = {"in": NORM, "out": NORM}
    elif variant == "no_decoder_norm":
        cfg["sparsity_include_decoder_norm"] = False
    elif variant == "inference":  # already folded by lm-saes: the stored norm is not applied
        cfg["norm_activation"] = "inference"
        norm = None
    folder = _write(tmp_path / "L5R", cfg, t)
    assert read_config(folder)[2] == "llama_scope"
    sae = load_sae(folder)
    assert sae.cfg.architecture == "jumprelu" and sae.cfg.hook_layer == 5
    assert (sae.cfg.d_in, sae.cfg.d_sae) == (D, F)

    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 3
    f_ref, recon_ref, s = _lm_saes_reference(t, cfg, x, norm)
    acts = sae.encode(x)
    fired = (f_ref != 0).float().mean().item()
    assert 0.05 < fired < 0.95, fired  # the gate is exercised both ways
    assert torch.equal(acts != 0, f_ref != 0)  # the same features fire
    torch.testing.assert_close(acts, f_ref / s, atol=1e-5, rtol=1e-5)  # raw scale
    torch.testing.assert_close(sae.decode(acts), recon_ref, atol=1e-4, rtol=1e-5)

    rows = SAERows(folder)  # the server's per-feature path agrees with the full load
    for i in (0, 7, F - 1):
        enc, bias, thr, dec = rows.feature(i)
        pre = x @ enc + bias
        torch.testing.assert_close(
            torch.relu(pre) * (pre > thr), f_ref[:, i] / s, atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(dec, sae.W_dec[i].detach())


def test_llama_scope_saved_as_saelens_round_trips(tmp_path: Path) -> None:
    sae = load_sae(_write(tmp_path / "L5R", _lm_saes_config(), _lm_saes_tensors()))
    again = SAE.load(sae.save(tmp_path / "saelens"))
    x = torch.randn(8, D)
    torch.testing.assert_close(again.encode(x), sae.encode(x))


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("transcoder", "transcoder"),
        ("mlp_out", "not a residual-stream"),
        ("missing threshold", "missing tensor(s) ['log_jumprelu_threshold']"),
        ("missing bias", "missing tensor(s) ['encoder.bias']"),
        ("skip", "unexpected tensor(s) ['W_skip']"),
        ("transposed encoder", "encoder.weight has shape (16, 64), expected (64, 16)"),
        ("no norm", "hold the dataset norm"),
        ("token-wise", "token-wise"),
        ("topk", "act_fn 'topk'"),
        ("d_sae", "d_sae 65 is not d_model x expansion_factor = 64"),
    ],
)
def test_llama_scope_bad_files(tmp_path: Path, case: str, needle: str) -> None:
    cfg, t = _lm_saes_config(), _lm_saes_tensors()
    if case == "transcoder":
        cfg["hook_point_out"] = "blocks.5.hook_mlp_out"
    elif case == "mlp_out":
        cfg["hook_point_in"] = cfg["hook_point_out"] = "blocks.5.hook_mlp_out"
    elif case == "missing threshold":
        del t["log_jumprelu_threshold"]
        del cfg["jump_relu_threshold"]
    elif case == "missing bias":
        del t["encoder.bias"]
    elif case == "skip":
        t["W_skip"] = torch.zeros(D, D)
    elif case == "transposed encoder":
        t["encoder.weight"] = t["encoder.weight"].T
    elif case == "no norm":
        del t[f"dataset_average_activation_norm.{HOOK}"]
    elif case == "token-wise":
        cfg["norm_activation"] = "token-wise"
    elif case == "topk":
        cfg["act_fn"] = "topk"
    elif case == "d_sae":
        cfg["d_sae"] = F + 1
    folder = _write(tmp_path / "s", cfg, t)
    with pytest.raises(SAEFormatError) as e:
        load_sae(folder)
    assert needle in str(e.value)
    assert str(folder) in str(e.value)


def _sparsify(folder: Path, cfg: dict, extra: dict[str, torch.Tensor]) -> Path:
    folder.mkdir(parents=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    t = {
        "encoder.weight": torch.randn(F, D),
        "encoder.bias": torch.zeros(F),
        "W_dec": torch.randn(F, D),
        "b_dec": torch.zeros(D),
        **extra,
    }
    save_file(t, str(folder / "sae.safetensors"))
    return folder


@pytest.mark.parametrize(
    ("cfg", "extra", "needle"),
    [
        ({"k": 4, "layer": 2, "skip_connection": True}, {"W_skip": torch.zeros(D, D)}, "W_skip"),
        ({"k": 4, "layer": 2, "transcode": True}, {}, "transcode: true"),
        ({"k": 4, "layer": 2}, {"W_skip": torch.zeros(D, D)}, "W_skip"),
    ],
)
def test_sparsify_transcoders_refused(tmp_path: Path, cfg: dict, extra: dict, needle: str) -> None:
    folder = _sparsify(tmp_path / "layers.2.mlp", cfg, extra)
    with pytest.raises(SAEFormatError) as e:
        read_config(folder)
    msg = str(e.value)
    assert needle in msg and "cannot be served as a resid_post SAE" in msg
    assert str(folder) in msg


def test_plain_sparsify_still_loads(tmp_path: Path) -> None:
    sae = load_sae(_sparsify(tmp_path / "layers.2", {"k": 4, "layer": 2}, {}))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4
