"""``/v1/saes``: the catalog's rules (what each SAE accepts, where a runtime SAE may hook),
the client-side check being the server's own, the eval harness pre-check, and the routes
on the shared vLLM server (started with ``--allow-runtime-sae-updates``, see conftest.py).
The routes' HTTP behaviour without an engine: tests/test_sae_routes.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from helpers.registry import LAYERS, D, registry_config, saes_http

from sae_steer_vllm.plugin_config import PluginConfigError
from sae_steer_vllm.sae import random_sae
from sae_steer_vllm.sae_api import RegisterSAE, SAEList, check_spec_against
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError
from sae_steer_vllm.steering_plan import SAECatalog, check_spec


# ---------------------------------------------------------------------- catalog rules
def test_listing_says_what_each_sae_accepts(tmp_path: Path) -> None:
    cat = SAECatalog.load(registry_config(tmp_path), LAYERS, D)
    listing = SAEList.model_validate_json(cat.listing().model_dump_json())  # the wire round trip
    std, tk = listing.by_name()["std"], listing.by_name()["tk"]
    assert (std.layer, std.d_in, std.d_sae, std.architecture) == (2, D, 64, "standard")
    assert std.modes == ["clamp", "add", "scale"] and std.has_statistics
    assert tk.modes == ["add"] and not tk.has_statistics  # TopK: add only
    assert std.positions == ["all", "prompt", "generated"]
    assert listing.limits.max_interventions == 4 and listing.limits.max_clamp_per_layer == 2
    assert listing.model.num_layers == LAYERS and listing.model.d_model == D
    assert listing.runtime_updates.enabled and listing.runtime_updates.layers == [2, 5, 6]
    assert not listing.limits.readout.enabled and listing.limits.readout.layers == []
    assert str(tmp_path) not in cat.listing().model_dump_json()  # never a server path


def test_runtime_sae_needs_a_layer_with_tables(tmp_path: Path) -> None:
    cat = SAECatalog.load(registry_config(tmp_path), LAYERS, D)
    assert cat.clamp_layers == {2, 5, 6}
    random_sae(tmp_path / "l4", d_in=D, d_sae=16, layer=4)
    with pytest.raises(PluginConfigError, match=r"layer 4.*layers \[2, 5, 6\].*--steerable-layers"):
        cat.read_runtime_sae("l4", tmp_path / "l4")
    random_sae(tmp_path / "tk5", d_in=D, d_sae=16, layer=5, architecture="topk")
    with pytest.raises(PluginConfigError, match="does not accept 'add'"):
        cat.read_runtime_sae("tk5", tmp_path / "tk5")  # TopK on a layer without add: no mode
    with pytest.raises(PluginConfigError, match="already registered"):
        cat.read_runtime_sae("std", tmp_path / "std")
    random_sae(tmp_path / "wide", d_in=D + 1, d_sae=16, layer=6)
    with pytest.raises(PluginConfigError, match="d_in=33"):  # the start-up check, same words
        cat.read_runtime_sae("wide", tmp_path / "wide")
    random_sae(tmp_path / "l6", d_in=D, d_sae=16, layer=6, architecture="jumprelu")
    info = cat.read_runtime_sae("l6", tmp_path / "l6")
    cat.add(info)
    assert cat.listing().by_name()["l6"].modes == ["clamp", "add", "scale"]
    assert cat.listing().by_name()["l6"].runtime
    cat.remove("l6")
    assert "l6" not in cat.listing().by_name()
    # tables are fixed at start-up: removing the only SAE of a layer keeps its clamp tables
    cat.remove("std")
    assert cat.clamp_layers == {2, 5, 6}


SPECS = [
    {"interventions": [{"sae": "std", "feature": 1, "value": 1.0}]},
    {"interventions": [{"sae": "nope", "feature": 1, "value": 1.0}]},
    {"interventions": [{"sae": "std", "feature": 64, "value": 1.0}]},
    {"interventions": [{"sae": "tk", "feature": 1, "value": 1.0}]},
    {"interventions": [{"sae": "tk", "feature": 1, "strength": 1.0, "mode": "add"}]},
    {"interventions": [{"sae": "std", "feature": i, "value": 1.0} for i in range(3)]},
    {
        "interventions": [
            {"sae": "std", "feature": i, "value": 1.0, "mode": "add"} for i in range(5)
        ]
    },
    {"interventions": [{"layer": 3, "vector": [0.0] * D}]},
    {"interventions": [{"layer": 2, "vector": [0.0] * 5}]},
    {"interventions": [{"layer": 9, "vector": [0.0] * D}]},
    {"interventions": [{"layer": 6, "vector": [1.0] * D}], "positions": "prompt"},
]


@pytest.mark.parametrize("raw", SPECS, ids=range(len(SPECS)))
def test_client_check_is_the_server_check(tmp_path: Path, raw: dict) -> None:
    """A sweep checked against GET /v1/saes is refused for exactly the server's reasons."""
    cat = SAECatalog.load(registry_config(tmp_path), LAYERS, D)
    spec = SteeringSpec.from_obj(raw)
    listing = SAEList.model_validate(cat.listing().model_dump(mode="json"))

    def outcome(check: Any) -> str:
        try:
            check()
        except SteeringSpecError as e:
            return str(e)
        return "ok"

    server = outcome(lambda: check_spec(spec, cat))
    assert server == outcome(lambda: check_spec_against(spec, listing))
    assert (server == "ok") == (raw in (SPECS[0], SPECS[-1]))


def test_register_request_validation() -> None:
    assert RegisterSAE.model_validate({"name": "a", "path": "x"}).path == "x"
    for bad in (
        {"name": "a"},
        {"name": "a", "path": "x", "hf": "o/r"},
        {"name": "has space", "path": "x"},
        {"name": "", "path": "x"},
        {"name": "a", "path": "x", "extra": 1},
    ):
        with pytest.raises(ValueError):
            RegisterSAE.model_validate(bad)


def test_paths_stay_under_the_root(tmp_path: Path) -> None:
    from sae_steer_vllm.sae_routes import RouteError, resolve_under_root

    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_under_root(str(root), "a") == (root / "a").resolve()
    assert resolve_under_root(str(root), "a/../a") == (root / "a").resolve()
    for bad in ("/etc", "../outside", "a/../../outside", "link", "~/x", "a\x00b"):
        with pytest.raises(RouteError) as e:
            resolve_under_root(str(root), bad)
        assert e.value.status == 400, bad
    with pytest.raises(RouteError, match="no --sae-root"):
        resolve_under_root(None, "a")


# ---------------------------------------------------------------------- the eval pre-check
def test_sweep_precheck_names_the_spec(tmp_path: Path) -> None:
    from benchmarks.client import check_sweep_against
    from sae_steer_vllm.errors import UsageError

    listing = SAECatalog.load(registry_config(tmp_path), LAYERS, D).listing()
    good = SteeringSpec.from_obj(SPECS[0])
    check_sweep_against({"baseline": None, "good": good}, listing)
    specs = {
        "baseline": None,
        "good": good,
        "typo": SteeringSpec.from_obj(SPECS[1]),
        "too-far": SteeringSpec.from_obj(SPECS[2]),
        "no-stats": SteeringSpec.from_obj(SPECS[4]),
        "topk-clamp": SteeringSpec.from_obj(SPECS[3]),
    }
    with pytest.raises(UsageError) as e:
        check_sweep_against(specs, listing)
    msg = str(e.value)
    for name, needle in [
        ("typo", "unknown SAE 'nope'"),
        ("too-far", "feature 64 out of range"),
        ("no-stats", "no feature statistics"),
        ("topk-clamp", "TopK"),
    ]:
        assert f"spec {name!r}" in msg and needle in msg, msg
    assert "'good'" not in msg


def test_sweep_precheck_skips_servers_without_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The scripted fake (like stock vLLM) has no /v1/saes: the sweep runs, with a notice."""
    from helpers.fake_endpoint import FakeServer, make_problems

    from benchmarks.runner import run_sweep

    bad = SteeringSpec.from_obj({"interventions": [{"sae": "nope", "feature": 1, "value": 1.0}]})
    with FakeServer() as srv:
        res = run_sweep(
            srv.base_url,
            srv.model_name,
            make_problems(1),
            {"baseline": None, "bad": bad},
            out_dir=tmp_path / "run",
            max_tokens=20,
            progress=False,
        )
    assert "bad" in res.spec_errors  # refused by the server instead, as before
    err = capsys.readouterr().err
    assert err.count("/v1/saes") == 1 and "skipping" in err


# ---------------------------------------------------------------------- the shared server
def _steered_chat(server: Any, sae: str, value: float, stream: bool = False) -> Any:
    from openai import OpenAI

    from sae_steer_vllm.spec import steering_extra_body

    spec = {"interventions": [{"sae": sae, "feature": 1, "value": value, "mode": "add"}]}
    client = OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300)
    return client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Write one sentence about the sea."}],
        max_tokens=200 if stream else 16,
        temperature=0,
        stream=stream,
        extra_body=steering_extra_body(spec if value else None),
    )


@pytest.mark.server
def test_server_lists_registers_steers_and_deletes(steer_server: Any) -> None:
    status, body = saes_http(steer_server, "GET", "/v1/saes")
    assert status == 200, body
    listing = SAEList.model_validate(body)
    names = listing.by_name()
    assert names[steer_server.sae_name].modes == ["clamp", "add", "scale"]
    assert names[steer_server.topk_sae_name].modes == ["add"]
    assert listing.limits.max_interventions == steer_server.max_interventions
    assert listing.runtime_updates.enabled and 6 in listing.runtime_updates.layers

    root = steer_server.sae_root
    random_sae(root / "runtime" / "l6", d_in=576, d_sae=128, layer=6, seed=11, enc_scale=1.0)
    random_sae(root / "runtime" / "l5", d_in=576, d_sae=128, layer=5)
    status, body = saes_http(
        steer_server, "POST", "/v1/saes", {"name": "rt6", "path": "runtime/l6"}
    )
    assert status == 200, body
    assert body["layer"] == 6 and body["runtime"]
    status, body = saes_http(
        steer_server, "POST", "/v1/saes", {"name": "rt5", "path": "runtime/l5"}
    )
    assert status == 400 and "--steerable-layers" in body["error"]["message"], body
    status, body = saes_http(
        steer_server, "POST", "/v1/saes", {"name": "x", "path": "../server.log"}
    )
    assert status == 400, body
    status, body = saes_http(steer_server, "POST", "/v1/saes", {"name": "x", "path": "/etc"})
    assert status == 400, body

    base = _steered_chat(steer_server, "rt6", 0.0).choices[0].message.content
    steered = _steered_chat(steer_server, "rt6", 40.0).choices[0].message.content
    assert steered != base

    # in use: a streamed request is running (its first chunk arrived) -> 409
    stream = _steered_chat(steer_server, "rt6", 1.0, stream=True)
    next(iter(stream))
    status, body = saes_http(steer_server, "DELETE", "/v1/saes/rt6")
    assert status == 409 and "in use" in body["error"]["message"], body
    stream.close()
    deadline = time.monotonic() + 60
    while status == 409 and time.monotonic() < deadline:
        time.sleep(0.5)
        status, body = saes_http(steer_server, "DELETE", "/v1/saes/rt6")
    assert status == 200, body
    status, body = saes_http(steer_server, "GET", "/v1/saes")
    assert "rt6" not in SAEList.model_validate(body).by_name()
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match="unknown SAE 'rt6'"):
        _steered_chat(steer_server, "rt6", 40.0)
    # the name can be registered again (the plan cache holds nothing stale)
    status, body = saes_http(
        steer_server, "POST", "/v1/saes", {"name": "rt6", "path": "runtime/l6"}
    )
    assert status == 200, body
    assert _steered_chat(steer_server, "rt6", 40.0).choices[0].message.content == steered
    assert saes_http(steer_server, "DELETE", "/v1/saes/rt6")[0] == 200


@pytest.mark.server
def test_server_sweep_precheck_refuses_before_sending(steer_server: Any, tmp_path: Path) -> None:
    from helpers.fake_endpoint import make_problems

    from benchmarks.runner import run_sweep
    from sae_steer_vllm.errors import UsageError

    far = SteeringSpec.from_obj(
        {"interventions": [{"sae": steer_server.sae_name, "feature": 10**6, "value": 1.0}]}
    )
    with pytest.raises(UsageError, match=r"spec 'far'.*feature 1000000 out of range"):
        run_sweep(
            steer_server.base_url,
            steer_server.model,
            make_problems(1),
            {"baseline": None, "far": far},
            out_dir=tmp_path / "run",
            max_tokens=4,
            progress=False,
        )
    assert (
        not (tmp_path / "run" / "samples.jsonl").exists()
        or not (tmp_path / "run" / "samples.jsonl").read_text()
    )
