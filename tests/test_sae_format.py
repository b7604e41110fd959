"""SAE files (sae_steer_vllm/sae/): both layouts, both config generations, orientation,
and errors that name the file and the problem. No vLLM needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_steer_vllm.sae import (
    SAE,
    STATS_FILE,
    SAEConfig,
    SAEFormatError,
    SAERows,
    load_max_activation,
    random_sae,
    read_config,
    read_stats,
    write_stats,
)

D_IN, D_SAE = 16, 48


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W_enc": torch.randn(D_IN, D_SAE, generator=g),
        "b_enc": torch.randn(D_SAE, generator=g),
        "W_dec": torch.randn(D_SAE, D_IN, generator=g),
        "b_dec": torch.randn(D_IN, generator=g),
    }


def _write(
    folder: Path, cfg: dict, tensors: dict[str, torch.Tensor], name: str = "sae_weights.safetensors"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / name))
    return folder


def test_roundtrip_v6_and_encode_decode(tmp_path: Path) -> None:
    w = _weights()
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="standard", hook_layer=3, model_name="m")
    SAE(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]).save(tmp_path / "s")
    raw = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert raw["metadata"]["hook_name"] == "blocks.3.hook_resid_post"
    sae = SAE.load(tmp_path / "s")
    x = torch.randn(5, D_IN)
    f = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert torch.allclose(sae.encode(x), f, atol=1e-6)
    assert torch.allclose(sae.decode(f), f @ w["W_dec"] + w["b_dec"], atol=1e-5)


def test_legacy_flat_config_topk_and_hook_layer_from_name(tmp_path: Path) -> None:
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "architecture": "standard",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "hook_name": "blocks.7.hook_resid_post",
        "model_name": "m",
        "normalize_activations": "none",
    }
    sae = SAE.load(_write(tmp_path / "s", cfg, _weights()))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 4 and sae.cfg.hook_layer == 7
    assert int((sae.encode(torch.randn(3, D_IN)) > 0).sum(-1).max()) <= 4


def test_jumprelu_log_threshold(tmp_path: Path) -> None:
    w = _weights()
    w["log_threshold"] = torch.full((D_SAE,), 0.5).log()
    cfg = {
        "architecture": "jumprelu",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "metadata": {"hook_name": "blocks.2.hook_resid_post"},
    }
    sae = SAE.load(_write(tmp_path / "s", cfg, w))
    f = sae.encode(torch.randn(20, D_IN))
    assert ((f == 0) | (f > 0.5 - 1e-6)).all()
    rows = SAERows(tmp_path / "s")
    assert rows.feature(3)[2] == pytest.approx(0.5)


def test_sparsify_layout_and_transposed_orientation(tmp_path: Path) -> None:
    w = _weights()
    folder = tmp_path / "layers.12"
    tensors = {
        "encoder.weight": w["W_enc"].T.contiguous(),  # nn.Linear: [d_sae, d_in]
        "encoder.bias": w["b_enc"],
        "W_dec": w["W_dec"],
        "b_dec": w["b_dec"],
    }
    _write(folder, {"k": 6, "num_latents": D_SAE, "d_in": D_IN}, tensors, "sae.safetensors")
    sae = SAE.load(folder)
    assert sae.cfg.architecture == "topk" and sae.cfg.hook_layer == 12
    assert torch.equal(sae.W_enc, w["W_enc"])
    enc, bias, thr, dec = SAERows(folder).feature(5)
    assert torch.equal(enc, w["W_enc"][:, 5]) and torch.equal(dec, w["W_dec"][5])
    assert bias == pytest.approx(float(w["b_enc"][5] - w["b_dec"] @ w["W_enc"][:, 5]), rel=1e-5)


def test_rows_match_full_load(tmp_path: Path) -> None:
    w = _weights(3)
    cfg = SAEConfig(d_in=D_IN, d_sae=D_SAE, architecture="standard", hook_layer=1)
    SAE(cfg, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"]).save(tmp_path / "s")
    rows = SAERows(tmp_path / "s")
    x = torch.randn(4, D_IN)
    sae = SAE.load(tmp_path / "s")
    for i in (0, 17, D_SAE - 1):
        enc, bias, _, _ = rows.feature(i)
        assert torch.allclose(x @ enc + bias, sae.pre_activations(x)[:, i], atol=1e-5)
    with pytest.raises(IndexError):
        rows.feature(D_SAE)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("no cfg", "cfg.json: missing"),
        ("bad json", "not valid JSON"),
        ("pickle only", "pickle"),
        ("bad shape", "W_enc has shape"),
        ("unknown arch", "unsupported architecture"),
        ("no layer", "not the residual stream"),
        ("unfolded norm", "covariance_whitening"),
        ("mlp hook", "not the residual stream"),
        ("hook_z", "hook_z"),
        ("corrupt weights", "not a readable safetensors"),
        ("missing tensor", "missing tensor 'b_enc'"),
    ],
)
def test_bad_files_name_file_and_problem(tmp_path: Path, case: str, needle: str) -> None:
    folder = tmp_path / "s"
    good_cfg = {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "blocks.1.hook_resid_post"}
    w = _weights()
    if case == "no cfg":
        folder.mkdir()
        save_file(w, str(folder / "sae_weights.safetensors"))
    elif case == "bad json":
        _write(folder, good_cfg, w)
        (folder / "cfg.json").write_text("{oops")
    elif case == "pickle only":
        folder.mkdir()
        (folder / "cfg.json").write_text(json.dumps(good_cfg))
        torch.save(w, folder / "sae.pt")
    elif case == "bad shape":
        w["W_enc"] = torch.randn(D_IN + 1, D_SAE)
        _write(folder, good_cfg, w)
    elif case == "unknown arch":
        _write(folder, {**good_cfg, "architecture": "abstopk"}, w)
    elif case == "no layer":
        _write(folder, {"d_in": D_IN, "d_sae": D_SAE, "hook_name": "embed"}, w)
    elif case == "unfolded norm":
        _write(folder, {**good_cfg, "normalize_activations": "covariance_whitening"}, w)
    elif case == "mlp hook":
        _write(folder, {**good_cfg, "hook_name": "blocks.1.hook_mlp_out"}, w)
    elif case == "hook_z":
        _write(folder, {**good_cfg, "hook_name": "blocks.1.attn.hook_z"}, w)
    elif case == "corrupt weights":
        _write(folder, good_cfg, w)
        (folder / "sae_weights.safetensors").write_bytes(b"\x00garbage")
    elif case == "missing tensor":
        del w["b_enc"]
        _write(folder, good_cfg, w)
    with pytest.raises(SAEFormatError) as e:
        read_config(folder)
        SAE.load(folder)
    assert needle in str(e.value)
    assert str(folder) in str(e.value)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_feature_rows_do_not_keep_the_file_mapped(tmp_path: Path) -> None:
    """Each planned feature once kept a whole-file mmap alive (the server's RSS grew
    by GBs under 64 distinct specs); rows must be owned copies."""
    random_sae(tmp_path / "s", d_in=64, d_sae=256, layer=2)
    rows = SAERows(tmp_path / "s")
    kept = [rows.feature(i) for i in range(40)]
    mapped = [
        line for line in Path("/proc/self/maps").read_text().splitlines() if "sae_weights" in line
    ]
    assert mapped == []
    assert all(
        t.is_contiguous() and t.dtype == torch.float32
        for enc, _, _, dec in kept
        for t in (enc, dec)
    )


def test_square_sparsify_sae_loads_like_its_rows(tmp_path: Path) -> None:
    """Drift bug: with d_in == d_sae the full loader read sparsify's ``encoder.weight``
    ([d_sae, d_in], nn.Linear) as if it were [d_in, d_sae], while the row reader the
    server uses read it correctly; both now follow the layout's native orientation."""
    d = 8
    g = torch.Generator().manual_seed(0)
    enc = torch.randn(d, d, generator=g)  # nn.Linear: row i = feature i's encoder
    tensors = {
        "encoder.weight": enc,
        "encoder.bias": torch.randn(d, generator=g),
        "W_dec": torch.randn(d, d, generator=g),
        "b_dec": torch.randn(d, generator=g),
    }
    folder = _write(tmp_path / "layers.3", {"k": 2, "d_in": d}, tensors, "sae.safetensors")
    sae = SAE.load(folder)
    assert torch.equal(sae.W_enc, enc.T)
    for i in range(d):
        row_enc, _, _, row_dec = SAERows(folder).feature(i)
        assert torch.equal(row_enc, sae.W_enc[:, i]) and torch.equal(row_dec, sae.W_dec[i])


def test_stats_file_roundtrip_and_max_activation(tmp_path: Path) -> None:
    folder = tmp_path / "s"
    random_sae(folder, d_in=8, d_sae=16, layer=1, with_stats=False)
    assert load_max_activation(folder) is None
    max_act = torch.arange(16, dtype=torch.float32) + 1
    path = write_stats(folder, {"max_activation": max_act}, {"groups": ["a", "b"], "alpha": 0.7})
    assert path == folder / STATS_FILE
    tensors, meta = read_stats(folder)
    assert torch.equal(tensors["max_activation"], max_act)
    assert meta == {"groups": ["a", "b"], "alpha": 0.7}
    assert torch.equal(load_max_activation(folder), max_act)
    write_stats(folder, {"max_activation": torch.full((16,), float("nan"))}, {})
    with pytest.raises(SAEFormatError, match="non-finite"):
        load_max_activation(folder)


def _release_like(folder: Path, **overrides: object) -> Path:
    """The authors' release field set (SAELens 5.5.2 runner cfg), at D_IN/D_SAE."""
    cfg = {
        "architecture": "standard",
        "d_in": D_IN,
        "d_sae": D_SAE,
        "hook_name": "blocks.19.hook_resid_post",
        "hook_layer": 19,
        "apply_b_dec_to_input": False,
        "normalize_activations": "expected_average_only_in",
        "prepend_bos": False,
        "activation_fn": "relu",
        "sae_lens_version": "5.5.2",
        **overrides,
    }
    return _write(folder, cfg, _weights())


def test_authors_release_loads_with_saelens_semantics(tmp_path: Path) -> None:
    """expected_average_only_in is the identity at inference (SAELens folds before saving)."""
    w = _weights()
    sae = SAE.load(_release_like(tmp_path / "r"))
    assert (sae.cfg.hook_layer, sae.cfg.prepend_bos, sae.cfg.apply_b_dec_to_input) == (
        19,
        False,
        False,
    )
    assert sae.cfg.normalize_activations == "expected_average_only_in"
    x = torch.randn(6, D_IN)
    f = torch.relu(x @ w["W_enc"] + w["b_enc"])  # no b_dec subtraction, no rescale
    torch.testing.assert_close(sae.encode(x), f)
    # an unfolded checkpoint: the factor folds in once, as SAELens does
    folded = SAE.load(tmp_path / "r", norm_scaling_factor=3.0)
    torch.testing.assert_close(folded.encode(x), torch.relu(3.0 * x @ w["W_enc"] + w["b_enc"]))
    torch.testing.assert_close(folded.decode(f), (f @ w["W_dec"] + w["b_dec"]) / 3.0)
    assert folded.cfg.normalize_activations == "none"
    with pytest.raises(SAEFormatError, match="not 'expected_average_only_in'"):
        SAE.load(_write(tmp_path / "n", {"d_in": D_IN, "hook_layer": 1}, w), norm_scaling_factor=2)
    # what we write keeps the fields SAELens reads
    raw = sae.cfg.to_saelens_dict()
    assert raw["normalize_activations"] == "expected_average_only_in"
    assert raw["apply_b_dec_to_input"] is False and raw["metadata"]["prepend_bos"] is False


@pytest.mark.parametrize(
    ("hook", "layer"),
    [
        ("blocks.4.hook_resid_post", 4),
        ("blocks.4.hook_resid_pre", 3),
        ("model.layers.4", 4),
        ("layers.4", 4),
    ],
)
def test_hook_name_forms(tmp_path: Path, hook: str, layer: int) -> None:
    cfg, _, _ = read_config(_release_like(tmp_path / "s", hook_name=hook, hook_layer=99))
    assert cfg.hook_layer == layer
    assert cfg.to_saelens_dict()["metadata"]["hook_layer"] == 4  # SAELens's block number


def test_input_dependent_norm_needs_the_input_and_is_not_served(tmp_path: Path) -> None:
    from sae_steer_vllm.plugin_config import PluginConfigError
    from sae_steer_vllm.steering_plan import read_sae_info

    folder = _release_like(tmp_path / "ln", normalize_activations="layer_norm")
    sae = SAE.load(folder)
    x = torch.randn(5, D_IN) * 3 + 1
    f = sae.encode(x)
    with pytest.raises(SAEFormatError, match=r"decode\(f, x\)"):
        sae.decode(f)
    xc = x - x.mean(-1, keepdim=True)
    std = xc.std(-1, keepdim=True)
    w = _weights()
    torch.testing.assert_close(f, torch.relu((xc / (std + 1e-5)) @ w["W_enc"] + w["b_enc"]))
    torch.testing.assert_close(
        sae.decode(f, x), (f @ w["W_dec"] + w["b_dec"]) * std + x.mean(-1, keepdim=True)
    )
    with pytest.raises(PluginConfigError, match="layer_norm"):
        read_sae_info("ln", folder, num_layers=24, d_model=D_IN)


def test_gated_reads_as_its_jumprelu_in_full_and_by_rows(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w = _weights()
    del w["b_enc"]
    gate = {n: torch.randn(D_SAE, generator=g) * 0.5 for n in ("b_gate", "b_mag", "r_mag")}
    folder = _write(
        tmp_path / "g",
        {"architecture": "gated", "d_in": D_IN, "d_sae": D_SAE, "hook_layer": 2},
        {**w, **gate},
    )
    sae = SAE.load(folder)
    x = torch.randn(40, D_IN)
    sae_in = x - w["b_dec"]
    active = (sae_in @ w["W_enc"] + gate["b_gate"]) > 0
    mag = torch.relu(sae_in @ (w["W_enc"] * gate["r_mag"].exp()) + gate["b_mag"])
    f = sae.encode(x)
    torch.testing.assert_close(f, active * mag)
    assert (f > 0).any()
    rows = SAERows(folder)
    for i in (0, 7, D_SAE - 1):
        enc, bias, thr, dec = rows.feature(i)
        pre = x @ enc + bias
        torch.testing.assert_close(torch.relu(pre) * (pre > thr), f[:, i])


def test_unfolded_saelens_checkpoint_is_refused_until_folded(tmp_path: Path) -> None:
    """A 6.x mid-training checkpoint keeps its factor beside the weights, not in them."""
    from sae_steer_vllm.plugin_config import PluginConfigError
    from sae_steer_vllm.steering_plan import read_sae_info

    folder = _release_like(tmp_path / "ckpt")
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": 0.25}))
    with pytest.raises(SAEFormatError, match="norm_scaling_factor=0.25"):
        SAE.load(folder)
    with pytest.raises(PluginConfigError, match="unfolded"):
        read_sae_info("c", folder, num_layers=24, d_model=D_IN)
    w, x = _weights(), torch.randn(4, D_IN)
    folded = SAE.load(folder, norm_scaling_factor=0.25)
    torch.testing.assert_close(folded.encode(x), torch.relu(0.25 * x @ w["W_enc"] + w["b_enc"]))
    again = SAE.load(folded.save(tmp_path / "folded"))  # the folded copy serves as is
    assert again.cfg.normalize_activations == "none"
    assert read_sae_info("f", tmp_path / "folded", num_layers=24, d_model=D_IN).cfg == again.cfg
    # after SAELens's final save the scaler says null: the weights are folded
    (folder / "activation_scaler.json").write_text(json.dumps({"scaling_factor": None}))
    torch.testing.assert_close(SAE.load(folder).encode(x), torch.relu(x @ w["W_enc"] + w["b_enc"]))
