"""The ``site`` of a feature intervention (``resid_post`` / ``mlp_out``, issue 13 section 3),
from the wire to the in-graph op, without starting vLLM.

``mlp_out`` is what the authors' vLLM hook computed: the feature encoded from the decoder
layer's first output (the MLP output) and ``(c - f_i) * W_dec[i]`` added there. The op is
checked here against that formula written out with :class:`SAE` itself; the end-to-end
check against transformers is ``tests/test_server.py::test_prompt_logprobs_match_transformers``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sae_steer_vllm.admission import AdmissionError, admit
from sae_steer_vllm.plugin_config import PluginConfig
from sae_steer_vllm.sae import SAE, random_sae
from sae_steer_vllm.slot_tables import LayerTables, steering_delta, token_phase
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError, spec_from_extra_args
from sae_steer_vllm.steering_plan import SAECatalog, check_spec, plan_spec
from sae_steer_vllm.think_phase import NO_POSITION

D = 32


@pytest.fixture()
def catalog(tmp_path: Path) -> SAECatalog:
    random_sae(tmp_path / "std", d_in=D, d_sae=64, layer=2)
    random_sae(tmp_path / "jr", d_in=D, d_sae=64, layer=2, architecture="jumprelu", seed=1)
    cfg = PluginConfig(
        saes={"std": str(tmp_path / "std"), "jr": str(tmp_path / "jr")},
        max_interventions=4,
        max_clamp_per_layer=2,
        vector_layers="0,1,2",
    )
    return SAECatalog.load(cfg, num_layers=4, d_model=D)


def _spec(*ivs: dict) -> SteeringSpec:
    return SteeringSpec.from_obj({"interventions": list(ivs)})


def test_site_wire_roundtrip_default_left_out_and_salt() -> None:
    plain = _spec({"sae": "std", "feature": 3, "value": 2.0})
    explicit = _spec({"sae": "std", "feature": 3, "value": 2.0, "site": "resid_post"})
    mlp = _spec({"sae": "std", "feature": 3, "value": 2.0, "site": "mlp_out"})
    # the default is the same spec, and its JSON (hence older specs' salt and resume keys)
    # has no site in it
    assert explicit == plain and explicit.cache_salt() == plain.cache_salt()
    assert "site" not in plain.to_json()
    assert json.loads(mlp.to_json())["interventions"][0]["site"] == "mlp_out"
    again = spec_from_extra_args(mlp.extra_body()["vllm_xargs"])
    assert again == mlp and again is not None
    assert again.interventions[0].site == "mlp_out"  # type: ignore[union-attr]
    # KV computed at one site is never reused for the other
    assert mlp.cache_salt() != plain.cache_salt()


def test_bad_site_is_refused_naming_the_field() -> None:
    with pytest.raises(SteeringSpecError, match="site"):
        SteeringSpec.from_json(
            '{"interventions": [{"sae": "std", "feature": 1, "value": 1, "site": "attn_out"}]}'
        )
    with pytest.raises(SteeringSpecError, match="site"):  # raw vectors have no site
        _spec({"layer": 1, "vector": [0.0] * D, "site": "mlp_out"})


def _admit(catalog: SAECatalog, steering: str) -> None:
    data = {"model": "m", "messages": [], "vllm_xargs": {"steering": steering}}
    admit(
        "POST",
        "/v1/chat/completions",
        data,
        check=lambda s: check_spec(s, catalog),
        max_spec_bytes=1 << 20,
        request_id="r1",
    )


@pytest.mark.parametrize(
    ("ivs", "needle"),
    [
        ([{"sae": "std", "feature": 1, "value": 1.0, "site": "mlp"}], "site"),
        (  # two clamps on one layer (two SAEs) at different sites: one request reads one
            [
                {"sae": "std", "feature": 1, "value": 1.0, "site": "mlp_out"},
                {"sae": "jr", "feature": 2, "value": 1.0},
            ],
            "share a site",
        ),
    ],
)
def test_admission_400(catalog: SAECatalog, ivs: list[dict], needle: str) -> None:
    with pytest.raises(AdmissionError, match=needle) as e:
        _admit(catalog, json.dumps({"interventions": ivs}))
    assert e.value.status == 400


def test_admission_accepts_mlp_out_and_salts_it(catalog: SAECatalog) -> None:
    data = {
        "model": "m",
        "messages": [],
        "vllm_xargs": {
            "steering": json.dumps(
                {"interventions": [{"sae": "std", "feature": 1, "value": 1.0, "site": "mlp_out"}]}
            )
        },
    }
    spec = admit(
        "POST",
        "/v1/chat/completions",
        data,
        check=lambda s: check_spec(s, catalog),
        max_spec_bytes=1 << 20,
        request_id="r1",
    )
    assert spec is not None and data["cache_salt"] == spec.cache_salt()
    assert '"site":"mlp_out"' in data["vllm_xargs"]["steering"]  # type: ignore[index]


def test_plan_carries_the_site(catalog: SAECatalog) -> None:
    both = plan_spec(
        _spec(
            {"sae": "std", "feature": 1, "value": 1.0, "site": "mlp_out"},
            {"sae": "jr", "feature": 2, "value": 3.0, "site": "mlp_out"},
            # an add is the same at both sites, so it may sit beside either
            {"sae": "std", "feature": 4, "value": 2.0, "mode": "add"},
        ),
        catalog,
    )
    lp = both.layers[2]
    assert lp.clamp_site == "mlp_out" and len(lp.entries) == 2 and lp.add is not None
    plain = plan_spec(_spec({"sae": "std", "feature": 1, "value": 1.0}), catalog)
    assert plain.layers[2].clamp_site == "resid_post"


def _clamp_by_sae(sae: SAE, x: torch.Tensor, feature: int, c: float) -> torch.Tensor:
    """The authors' get_intervention_hook on ``x``: encode, set, decode + error, minus x."""
    f = sae.encode(x)
    err = x - sae.decode(f)
    f2 = f.clone()
    f2[..., feature] = c
    return sae.decode(f2) + err - x


def _delta(tables: LayerTables, idx: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor):
    """Every token a prompt token of a request steering ``all`` positions."""
    s = tables.num_slots
    never = torch.full((s,), NO_POSITION, dtype=torch.int64)
    phase = token_phase(torch.zeros_like(idx), idx, torch.ones(s, dtype=torch.int64), never, never)
    return steering_delta(tables, idx, phase, torch.zeros(s, dtype=torch.int64), hidden, residual)


def test_delta_reads_the_mlp_output_for_mlp_out_slots(tmp_path: Path, catalog: SAECatalog) -> None:
    """One batch, three requests: resid_post clamp (slot 1), mlp_out clamp (slot 2),
    unsteered (slot 0). Each token's delta is its own site's formula; a slot reused by
    another request's plan gets that plan's site."""
    sae = SAE.load(tmp_path / "std")
    tables = LayerTables(num_slots=4, d_model=D, clamp_per_slot=2, dtype=torch.float32)
    spec_r = _spec({"sae": "std", "feature": 5, "value": 4.0})
    spec_m = _spec({"sae": "std", "feature": 5, "value": 4.0, "site": "mlp_out"})
    tables.write(1, plan_spec(spec_r, catalog).layers[2])
    tables.write(2, plan_spec(spec_m, catalog).layers[2])
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, D, generator=g)
    residual = torch.randn(6, D, generator=g) * 3
    idx = torch.tensor([1, 2, 0, 2, 1, 2])
    delta = _delta(tables, idx, hidden, residual)

    want_r = _clamp_by_sae(sae, hidden + residual, 5, 4.0)
    want_m = _clamp_by_sae(sae, hidden, 5, 4.0)
    for t, slot in enumerate(idx.tolist()):
        want = {0: torch.zeros(D), 1: want_r[t], 2: want_m[t]}[slot]
        torch.testing.assert_close(delta[t], want, atol=1e-4, rtol=1e-4)
    # the two sites really read different inputs on these tokens
    assert not torch.allclose(want_r[1], want_m[1], atol=1e-3)
    assert torch.equal(delta[2], torch.zeros(D))  # unsteered: exactly zero

    # slot 2 handed to a resid_post request: its site follows the new plan
    tables.write(2, plan_spec(spec_r, catalog).layers[2])
    again = _delta(tables, idx, hidden, residual)
    torch.testing.assert_close(again[1], want_r[1], atol=1e-4, rtol=1e-4)
    # and a cleared slot reads resid_post again
    tables.write(2, None)
    assert float(tables.resid_keep[2]) == 1.0


def test_resid_post_delta_is_unchanged_bit_for_bit(catalog: SAECatalog) -> None:
    """The site gate multiplies ``residual`` by exactly 1.0: resid_post is encoded as
    ``hidden + residual`` in the model dtype, as before sites existed."""
    tables = LayerTables(num_slots=2, d_model=D, clamp_per_slot=2, dtype=torch.bfloat16)
    tables.write(1, plan_spec(_spec({"sae": "std", "feature": 5, "value": 4.0}), catalog).layers[2])
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, D, generator=g).to(torch.bfloat16)
    residual = torch.randn(4, D, generator=g).to(torch.bfloat16)
    idx = torch.ones(4, dtype=torch.int64)
    got = _delta(tables, idx, hidden, residual)
    h = (hidden + residual).to(torch.float32)
    pre = h @ tables.enc.T + tables.bias
    f = pre * (pre > tables.thr).to(pre.dtype)
    own = tables.owner.unsqueeze(0) == idx.unsqueeze(1)
    coef = torch.where(own, tables.target - f, torch.zeros_like(f))
    want = (tables.add[idx].to(torch.float32) + coef @ tables.dec).to(torch.bfloat16)
    assert torch.equal(got, want)


def test_paper_mlp_out_spec_file_is_the_authors_intervention() -> None:
    """``configs/paper_r1_llama8b_specs_mlp_out.json`` (docs/paper_recipe.md): the authors'
    evaluation.sh arguments, feature 46379, strength 2.0 x max_activation 5.840, at the
    MLP output of layer 19, every position."""
    from benchmarks.sweep import BASELINE, load_specs_file

    specs = load_specs_file(
        Path(__file__).parents[1] / "configs/paper_r1_llama8b_specs_mlp_out.json"
    )
    assert specs[BASELINE] is None
    (steered,) = [s for n, s in specs.items() if n != BASELINE]
    assert steered is not None and steered.positions == "all"
    (iv,) = steered.interventions
    assert iv.sae == "r1-l19" and iv.feature == 46379  # type: ignore[union-attr]
    assert iv.mode == "clamp" and iv.site == "mlp_out"  # type: ignore[union-attr]
    assert iv.value == pytest.approx(2.0 * 5.840)  # type: ignore[union-attr]
