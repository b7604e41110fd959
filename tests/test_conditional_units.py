"""Conditional steering (issue 15) without an engine: the spec's new fields, the admission rules
on them, the think-span rules, and the per-token gate of the slot tables against a plain loop."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.models import default_tokenizer_dir
from helpers.r1_tokenizer import THINK_CLOSE, THINK_OPEN, r1_tokenizer

from sae_steer_vllm.plugin_config import PluginConfig
from sae_steer_vllm.sae import SAE, random_sae
from sae_steer_vllm.sae_api import ThinkMarkers
from sae_steer_vllm.slot_tables import LayerTables, steering_delta, token_phase
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError
from sae_steer_vllm.steering_plan import PositionMode, SAECatalog, plan_spec
from sae_steer_vllm.think_phase import (
    NO_POSITION,
    initial_phase,
    resolve_think_markers,
    update_phase,
)

D = 32
MARKERS = ThinkMarkers(start="<think>", start_id=7, end="</think>", end_id=9)


def _spec(*ivs: dict[str, Any], **top: Any) -> SteeringSpec:
    return SteeringSpec.from_obj({"interventions": list(ivs), **top})


@pytest.fixture()
def catalog(tmp_path: Path) -> SAECatalog:
    random_sae(tmp_path / "std", d_in=D, d_sae=64, layer=2, seed=0)
    random_sae(tmp_path / "jr", d_in=D, d_sae=48, layer=2, architecture="jumprelu", seed=1)
    random_sae(tmp_path / "l3", d_in=D, d_sae=64, layer=3, seed=2)
    random_sae(tmp_path / "tk", d_in=D, d_sae=64, layer=2, architecture="topk", with_stats=False)
    cfg = PluginConfig(
        saes={n: str(tmp_path / n) for n in ("std", "jr", "l3", "tk")},
        max_clamp_per_layer=4,
    )
    cat = SAECatalog.load(cfg, num_layers=4, d_model=D)
    cat.think_markers = MARKERS
    return cat


# ------------------------------------------------------------------ the spec
def test_old_specs_keep_their_text_and_salt() -> None:
    """New fields are left out when unset, so a spec written before them is unchanged."""
    raw = {"interventions": [{"sae": "s", "feature": 1, "strength": 2.0, "mode": "clamp"}]}
    spec = SteeringSpec.from_obj(raw)
    assert json.loads(spec.to_json()) == {**raw, "positions": "all"}
    assert spec.cache_salt() == SteeringSpec.from_json(spec.to_json()).cache_salt()


@pytest.mark.parametrize(
    "extra",
    [
        {"positions": "generated"},
        {"window": [0, 8]},
        {"window": [0, 9]},
        {"when": {"sae": "s", "feature": 2, "above": 0.5}},
        {"when": {"sae": "s", "feature": 2, "below": 0.5}},
    ],
)
def test_every_new_field_changes_the_cache_salt(extra: dict[str, Any]) -> None:
    """Prefix caching keeps KV steered differently apart: the salt covers the new fields."""
    base = {"sae": "s", "feature": 1, "value": 2.0}
    a = _spec(base)
    b = _spec({**base, **extra})
    assert a.cache_salt() != b.cache_salt()
    assert SteeringSpec.from_json(b.to_json()) == b  # and they survive the wire


def test_scale_factor_changes_the_salt() -> None:
    iv = {"sae": "s", "feature": 1, "mode": "scale"}
    assert _spec({**iv, "factor": 0.0}).cache_salt() != _spec({**iv, "factor": 2.0}).cache_salt()


@pytest.mark.parametrize(
    ("iv", "needle"),
    [
        ({"window": [None, None]}, "restricts nothing"),
        ({"window": [4, 4]}, "start must be < stop"),
        ({"window": [-1, 4]}, ">= 0"),
        ({"when": {"sae": "s", "feature": 2}}, "give 'above' or 'below'"),
        ({"when": {"sae": "s", "feature": 2, "above": 2.0, "below": 1.0}}, "empty band"),
        ({"factor": 2.0}, "'factor' is for mode 'scale'"),
        ({"positions": "middle"}, "positions"),
    ],
)
def test_bad_new_fields_name_the_problem(iv: dict[str, Any], needle: str) -> None:
    with pytest.raises(SteeringSpecError, match=needle):
        _spec({"sae": "s", "feature": 1, "value": 2.0, **iv})


def test_scale_takes_only_a_factor() -> None:
    with pytest.raises(SteeringSpecError, match="needs 'factor'"):
        _spec({"sae": "s", "feature": 1, "mode": "scale"})
    with pytest.raises(SteeringSpecError, match="not 'strength'"):
        _spec({"sae": "s", "feature": 1, "mode": "scale", "factor": 2.0, "strength": 1.0})


# ------------------------------------------------------------------ admission rules
@pytest.mark.parametrize(
    ("ivs", "top", "needle"),
    [
        ([{"sae": "tk", "feature": 1, "mode": "scale", "factor": 2.0}], {}, "TopK"),
        (
            [
                {
                    "sae": "std",
                    "feature": 1,
                    "value": 1.0,
                    "when": {"sae": "l3", "feature": 1, "above": 0},
                }
            ],
            {},
            "must read the same layer",
        ),
        (
            [
                {
                    "sae": "std",
                    "feature": 1,
                    "value": 1.0,
                    "when": {"sae": "tk", "feature": 1, "above": 0},
                }
            ],
            {},
            "TopK",
        ),
        (
            [
                {
                    "sae": "std",
                    "feature": 1,
                    "value": 1.0,
                    "when": {"sae": "jr", "feature": 48, "above": 0},
                }
            ],
            {},
            "when.feature: feature 48 out of range",
        ),
        (
            [
                {
                    "sae": "std",
                    "feature": 1,
                    "value": 1.0,
                    "when": {"sae": "zz", "feature": 1, "above": 0},
                }
            ],
            {},
            "unknown SAE 'zz'",
        ),
        (
            [
                {"sae": "std", "feature": 1, "value": 1.0, "positions": "thinking"},
                {"sae": "std", "feature": 1, "value": 3.0},
            ],
            {},
            "already steered",
        ),
        (
            [
                {"sae": "std", "feature": i, "value": 1.0, "mode": "add", "window": [0, 4]}
                for i in range(5)
            ],
            {},
            "more than 4",
        ),
        (
            [
                {"sae": "std", "feature": 1, "mode": "scale", "factor": 0.0, "site": "mlp_out"},
                {"sae": "std", "feature": 2, "value": 1.0},
            ],
            {},
            "share a site",
        ),
    ],
)
def test_admission_refuses(catalog: SAECatalog, ivs: list, top: dict, needle: str) -> None:
    with pytest.raises(SteeringSpecError, match=needle):
        plan_spec(_spec(*ivs, **top), catalog)


def test_phases_need_markers(catalog: SAECatalog) -> None:
    catalog.think_markers = None
    catalog._listing = None
    for spec in (
        _spec({"sae": "std", "feature": 1, "value": 1.0}, positions="answer"),
        _spec({"sae": "std", "feature": 1, "value": 1.0, "positions": "thinking"}),
    ):
        with pytest.raises(SteeringSpecError, match="needs the model's think markers"):
            plan_spec(spec, catalog)
    assert "thinking" not in catalog.listing().data[0].positions


def test_one_feature_twice_in_disjoint_scopes_is_admitted(catalog: SAECatalog) -> None:
    """The same feature clamped high while thinking and ablated in the answer."""
    plan = plan_spec(
        _spec(
            {"sae": "std", "feature": 1, "value": 5.0, "positions": "thinking"},
            {"sae": "std", "feature": 1, "mode": "scale", "factor": 0.0, "positions": "answer"},
            {"sae": "jr", "feature": 2, "value": 1.0, "window": [0, 4]},
            {"sae": "jr", "feature": 2, "value": 2.0, "window": [4, None]},
        ),
        catalog,
    )
    rows = plan.layers[2].entries
    assert [r.positions for r in rows][:2] == [PositionMode.THINKING, PositionMode.ANSWER]
    assert (rows[1].target, rows[1].slope) == (0.0, -1.0)  # m = 0: h - f W_dec
    assert rows[3].window == (4, 1 << 62)
    assert plan.needs_phase


def test_ungated_adds_stay_summed(catalog: SAECatalog) -> None:
    plan = plan_spec(
        _spec(
            {"sae": "std", "feature": 1, "value": 2.0, "mode": "add"},
            {"sae": "tk", "feature": 3, "value": 2.0, "mode": "add", "window": [2, None]},
        ),
        catalog,
    )
    lp = plan.layers[2]
    assert lp.add is not None and len(lp.entries) == 1 and lp.entries[0].slope == 0.0
    assert not plan.needs_phase


# ------------------------------------------------------------------ think span
@pytest.mark.parametrize(
    ("ids", "plen", "want"),
    [
        ([1, 7, 2, 3], 4, (1, NO_POSITION)),  # prompt opened <think>
        ([1, 7, 2, 9, 3], 5, (1, 3)),  # prompt opened and closed it
        ([1, 9, 2], 3, (NO_POSITION, NO_POSITION)),  # prompt only mentions </think>
        ([1, 2, 7, 4, 9, 5, 9], 2, (2, 4)),  # generated (resumed request): first of each
        ([7, 9, 1, 7, 2], 5, (3, NO_POSITION)),  # the LAST opening marker of the prompt
        ([1, 7, 2, 5, 9], 3, (1, 4)),  # opened in the prompt, closed when generating
    ],
)
def test_initial_phase(ids: list[int], plen: int, want: tuple[int, int]) -> None:
    assert initial_phase(ids, plen, MARKERS) == want


def test_initial_phase_without_an_opening_marker() -> None:
    m = MARKERS.model_copy(update={"start": None, "start_id": None})
    assert initial_phase([9, 1, 2], 3, m) == (3, NO_POSITION)  # starts with the generation
    assert initial_phase([1, 2, 5, 9, 4], 3, m) == (3, 3)


def test_update_phase_matches_the_cpu_rule_chunk_by_chunk() -> None:
    """Feeding a request's tokens in any chunking (and twice, as a recomputation would) gives
    the span the CPU rule gives for the whole sequence; other slots are untouched."""
    seq = [5, 7, 3, 4, 6, 9, 2, 9, 7, 1]
    plen = 3
    want = initial_phase(seq, plen, MARKERS)
    for chunks in ([10], [3, 4, 3], [1] * 10, [6, 4, 10]):
        start = torch.full((3,), NO_POSITION, dtype=torch.int64)
        end = start.clone()
        s0, e0 = initial_phase(seq[:plen], plen, MARKERS)
        start[2], end[2] = s0, e0
        prompt_len = torch.tensor([0, 0, plen])
        pos0 = 0
        for n in chunks:
            p = [(pos0 + i) % len(seq) for i in range(n)]
            pos0 += n
            ids = torch.tensor([seq[i] for i in p] + [9])  # + an unsteered token of slot 0
            update_phase(
                ids,
                torch.tensor([*p, 0]),
                torch.tensor([2] * n + [0]),
                prompt_len,
                start,
                end,
                7,
                9,
            )
        assert (int(start[2]), int(end[2])) == want, chunks
        assert int(start[1]) == int(end[1]) == NO_POSITION


def test_markers_resolve_from_the_tokenizer() -> None:
    from transformers import AutoTokenizer

    r1 = r1_tokenizer(opens_think=True)
    m, _ = resolve_think_markers(r1, THINK_OPEN, THINK_CLOSE)
    assert m is not None and m.start_id == r1.convert_tokens_to_ids(THINK_OPEN)
    assert m.end_id == r1.convert_tokens_to_ids(THINK_CLOSE)
    smol = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    none, why = resolve_think_markers(smol, "<think>", "</think>")
    assert none is None and "3 tokens" in why
    box, _ = resolve_think_markers(smol, "", "####")
    assert box is not None and box.start_id is None
    assert resolve_think_markers(r1, THINK_OPEN, "")[0] is None


# ------------------------------------------------------------------ the gate, against a loop
@torch.no_grad()
def test_entry_gates_match_a_per_token_loop(tmp_path: Path, catalog: SAECatalog) -> None:
    """Three requests in one step (prompt and generated tokens, inside and after the think
    span): each token's delta is the sum over its own admitted interventions of
    ``(target + slope f_i(h)) W_dec[i]``, computed here one token at a time from the SAEs."""
    saes = {n: SAE.load(tmp_path / n) for n in ("std", "jr")}
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, D, generator=g) * 2
    residual = torch.randn(12, D, generator=g) * 2
    f_jr = saes["jr"].encode(hidden + residual)
    cond_level = float(f_jr[:, 4].median())
    specs = {
        1: _spec(
            {"sae": "std", "feature": 3, "value": 6.0, "positions": "thinking"},
            {"sae": "std", "feature": 5, "mode": "scale", "factor": 3.0, "positions": "answer"},
            {"sae": "jr", "feature": 1, "value": 2.0, "mode": "add", "window": [1, 3]},
        ),
        2: _spec(
            {
                "sae": "std",
                "feature": 7,
                "value": -4.0,
                "when": {"sae": "jr", "feature": 4, "above": cond_level},
            },
            {"sae": "std", "feature": 8, "value": 1.5, "mode": "add"},
            positions="generated",
        ),
        3: _spec({"sae": "jr", "feature": 6, "mode": "scale", "factor": 0.0, "window": [None, 2]}),
    }
    tables = LayerTables(num_slots=5, d_model=D, clamp_per_slot=4, dtype=torch.float32)
    s = 5
    mode = torch.zeros(s, dtype=torch.int64)
    plen = torch.zeros(s, dtype=torch.int64)
    start = torch.full((s,), NO_POSITION, dtype=torch.int64)
    end = start.clone()
    for slot, spec in specs.items():
        plan = plan_spec(spec, catalog)
        tables.write(slot, plan.layers.get(2))
        mode[slot] = int(plan.position_mode)
        plen[slot] = 4
    start[1], end[1] = 2, 5  # slot 1: reasoning from position 2 to the marker at 5
    idx = torch.tensor([1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 3, 3])
    pos = torch.tensor([1, 3, 4, 5, 6, 7, 3, 4, 5, 4, 4, 6])
    phase = token_phase(pos, idx, plen, start, end)
    got = steering_delta(tables, idx, phase, mode, hidden, residual)

    f = {n: sae.encode(hidden + residual) for n, sae in saes.items()}
    dec = {n: sae.W_dec for n, sae in saes.items()}

    def in_scope(scope: str, t: int, slot: int) -> bool:
        p, gi = int(pos[t]), int(pos[t]) - int(plen[slot])
        return {
            "all": True,
            "prompt": gi < 0,
            "generated": gi >= 0,
            "thinking": int(start[slot]) <= p <= int(end[slot]),
            "answer": p > int(end[slot]) and gi >= 0,
        }[scope]

    for t in range(12):
        slot = int(idx[t])
        want = torch.zeros(D)
        if slot:
            spec = specs[slot]
            for iv in spec.interventions:
                scope = iv.positions or spec.positions
                gi = int(pos[t]) - int(plen[slot])
                ok = in_scope(scope, t, slot)
                if iv.window is not None:
                    lo, hi = iv.window
                    ok = ok and gi >= 0 and gi >= (lo or 0) and (hi is None or gi < hi)
                if iv.when is not None:
                    v = float(f[iv.when.sae][t, iv.when.feature])
                    ok = ok and v > (iv.when.above if iv.when.above is not None else -math.inf)
                if not ok:
                    continue
                fi = float(f[iv.sae][t, iv.feature])
                coef = {
                    "clamp": (iv.value or 0.0) - fi,
                    "add": iv.value or 0.0,
                    "scale": ((iv.factor or 0.0) - 1.0) * fi,
                }[iv.mode]
                want = want + coef * dec[iv.sae][iv.feature]
        torch.testing.assert_close(got[t], want, atol=1e-4, rtol=1e-4, msg=f"token {t}")
    assert torch.equal(got[9], torch.zeros(D))  # unsteered: exactly zero
    # the gates really vary along the batch: some admitted tokens, some refused
    assert got[:6].abs().sum(1).count_nonzero() not in (0, 6)
