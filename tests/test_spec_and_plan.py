"""The steering spec, the admission checks, the plan math and the serve command line,
without starting vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_steer_vllm.plugin_config import PluginConfig, PluginConfigError
from sae_steer_vllm.sae import SAE, random_sae
from sae_steer_vllm.serve import TRACKER, build_vllm_args
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError, spec_from_extra_args
from sae_steer_vllm.steering_plan import SAECatalog, check_spec, plan_spec


def test_wire_roundtrip_and_salt() -> None:
    spec = SteeringSpec.from_obj(
        {
            "interventions": [
                {"sae": "a", "feature": 3, "strength": 2.0},
                {"layer": 1, "vector": [1, 2], "scale": 0.5},
            ],
            "positions": "prompt",
        }
    )
    body = spec.extra_body()
    again = spec_from_extra_args(body["vllm_xargs"])
    assert again == spec
    assert again is not None and again.cache_salt() == spec.cache_salt()
    other = SteeringSpec.from_obj({"interventions": [{"sae": "a", "feature": 3, "strength": 2.5}]})
    assert other.cache_salt() != spec.cache_salt()
    assert len(spec.cache_salt()) <= 128
    assert spec_from_extra_args({"steering": json.dumps({"interventions": []})}) is None
    assert spec_from_extra_args(None) is None


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ('{"interventions": [{"sae": "a", "feature": 1, "strength": NaN}]}', "finite"),
        ('{"interventions": [{"sae": "a", "feature": 1}]}', "exactly one"),
        ('{"interventions": [{"sae": "a", "feature": 1, "value": 1, "mode": "mul"}]}', "mode"),
        ('{"interventions": [{"layer": 1, "vector": [1, Infinity]}]}', "finite"),
        ('{"interventions": [], "extra": 1}', "extra"),
        ("[]", "JSON object"),
        ("{", "invalid JSON"),
    ],
)
def test_spec_errors_name_the_field(raw: str, needle: str) -> None:
    with pytest.raises(SteeringSpecError, match=needle):
        SteeringSpec.from_json(raw)


@pytest.fixture()
def catalog(tmp_path: Path) -> SAECatalog:
    random_sae(tmp_path / "std", d_in=32, d_sae=64, layer=2)
    random_sae(tmp_path / "jr", d_in=32, d_sae=64, layer=3, architecture="jumprelu", seed=1)
    random_sae(tmp_path / "tk", d_in=32, d_sae=64, layer=1, architecture="topk", with_stats=False)
    cfg = PluginConfig(
        saes={"std": str(tmp_path / "std"), "jr": str(tmp_path / "jr"), "tk": str(tmp_path / "tk")},
        max_interventions=4,
        max_clamp_per_layer=2,
        vector_layers="0,1,2",
    )
    return SAECatalog.load(cfg, num_layers=4, d_model=32)


def test_catalog_layers(catalog: SAECatalog) -> None:
    assert catalog.clamp_layers == {2, 3}
    assert catalog.steerable_layers == {0, 1, 2, 3}


@pytest.mark.parametrize(
    ("ivs", "needle"),
    [
        (
            [{"sae": "std", "feature": i, "value": 1.0, "mode": "add"} for i in range(5)],
            "limit of 4",
        ),
        ([{"sae": "std", "feature": i, "value": 1.0} for i in range(3)], "more than 2 clamp"),
        (
            [
                {"sae": "std", "feature": 1, "value": 1.0},
                {"sae": "std", "feature": 1, "value": 2.0},
            ],
            "already steered",
        ),
        ([{"layer": 3, "vector": [0.0] * 32}], "does not accept vectors"),
        (
            [{"sae": "jr", "feature": 1, "value": 1.0, "mode": "add"}],
            "'add' on layer 3 is disabled",
        ),
        ([{"sae": "tk", "feature": 1, "strength": 1.0, "mode": "add"}], "no feature statistics"),
        ([{"sae": "std", "feature": 64, "value": 1.0}], "out of range"),
    ],
)
def test_check_spec_rejections(catalog: SAECatalog, ivs: list, needle: str) -> None:
    with pytest.raises(SteeringSpecError, match=needle):
        check_spec(SteeringSpec.from_obj({"interventions": ivs}), catalog)


def test_plan_math_matches_sae(catalog: SAECatalog) -> None:
    """The plan's clamp rows reproduce f_i(h) of the SAE, and strength uses max_activation."""
    spec = SteeringSpec.from_obj(
        {
            "interventions": [
                {"sae": "jr", "feature": 7, "strength": 2.0},
                {"sae": "std", "feature": 9, "value": 3.0, "mode": "add"},
                {"layer": 2, "vector": [1.0] * 32, "scale": 0.5},
            ]
        }
    )
    plan = plan_spec(spec, catalog)
    sae_jr = SAE.load(catalog.saes["jr"].path)
    row = plan.layers[3].entries[0]
    max_act = catalog.saes["jr"].max_activation
    assert max_act is not None
    assert row.target == pytest.approx(2.0 * float(max_act[7]))
    h = torch.randn(10, 32) * 3
    pre = h @ row.enc + row.bias
    f = pre * (pre > row.threshold)
    assert torch.allclose(f, sae_jr.encode(h)[:, 7], atol=1e-5)
    sae_std = SAE.load(catalog.saes["std"].path)
    add = plan.layers[2].add
    assert add is not None
    assert torch.allclose(add, 3.0 * sae_std.W_dec[9] + 0.5, atol=1e-6)


def test_plugin_config_errors(tmp_path: Path) -> None:
    with pytest.raises(PluginConfigError, match="out of range"):
        PluginConfig(vector_layers="0,9").vector_layer_set(4)
    random_sae(tmp_path / "big", d_in=64, d_sae=8, layer=1)
    with pytest.raises(PluginConfigError, match="d_in=64"):
        SAECatalog.load(PluginConfig(saes={"x": str(tmp_path / "big")}), num_layers=4, d_model=32)
    random_sae(tmp_path / "deep", d_in=32, d_sae=8, layer=9)
    with pytest.raises(PluginConfigError, match="hooks layer 9"):
        SAECatalog.load(PluginConfig(saes={"x": str(tmp_path / "deep")}), num_layers=4, d_model=32)
    with pytest.raises(PluginConfigError, match="not a directory"):
        SAECatalog.load(PluginConfig(saes={"x": str(tmp_path / "nope")}), num_layers=4, d_model=32)


def test_serve_builds_vllm_flags(default_model: Path, tmp_path: Path) -> None:
    random_sae(tmp_path / "s", d_in=576, d_sae=64, layer=18)
    args = build_vllm_args(
        ["--port", "9", "--additional-config", '{"other": 1}', "--logits-processors", "a:B"],
        {"s": str(tmp_path / "s")},
    )
    assert args[args.index("--model") + 1] == str(default_model)
    assert json.loads(args[args.index("--hf-overrides") + 1]) == {
        "architectures": ["SteeredLlamaForCausalLM"]
    }
    extra = json.loads(args[args.index("--additional-config") + 1])
    assert extra["other"] == 1 and extra["sae_steer"]["saes"]["s"] == str(
        (tmp_path / "s").resolve()
    )
    lp = args.index("--logits-processors")
    assert args[lp + 1 : lp + 3] == ["a:B", TRACKER]
    assert "--middleware" in args
    assert args[args.index("--port") + 1] == "9"
    random_sae(tmp_path / "bad", d_in=100, d_sae=8, layer=1)
    from sae_steer_vllm.serve import ServeError

    with pytest.raises(ServeError, match="d_in=100"):
        build_vllm_args([], {"bad": str(tmp_path / "bad")})
