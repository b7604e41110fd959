"""Property-based fuzzing (hypothesis) of every parser untrusted text reaches: the spec
parser over random JSON values, text and bytes, and the admission decision over random
bodies. Each must end in a spec error (HTTP 400) or a result, never another exception,
and never hang (every example has a deadline)."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pytest
from helpers.admission import LAYERS, D, admit_with, small_catalog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_steer_vllm.admission import STEERING_ROUTES, AdmissionError, parse_json_body
from sae_steer_vllm.spec import (
    MAX_SPEC_DEPTH,
    SteeringSpec,
    SteeringSpecError,
    spec_from_extra_args,
)
from sae_steer_vllm.steering_plan import SAECatalog

FUZZ = settings(
    max_examples=300,
    deadline=2000,  # ms per example: a parser that hangs fails the test
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture()
def catalog(tmp_path: Path) -> SAECatalog:
    return small_catalog(tmp_path / "sae")


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True)
    | st.text(max_size=30)
    | st.sampled_from(["s", "clamp", "add", "all", "prompt", "steering"]),
    lambda kids: (
        st.lists(kids, max_size=6)
        | st.dictionaries(
            st.sampled_from(
                [
                    "interventions",
                    "sae",
                    "feature",
                    "value",
                    "strength",
                    "mode",
                    "layer",
                    "vector",
                    "scale",
                    "positions",
                    "steering",
                    "vllm_xargs",
                    "x",
                ]
            )
            | st.text(max_size=8),
            kids,
            max_size=6,
        )
    ),
    max_leaves=40,
)


NUMBER = st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
SMALL = st.integers(-2, 40) | st.floats(-100, 100)
FEATURE_IV = st.fixed_dictionaries(
    {"sae": st.sampled_from(["s", "s", "nope"]), "feature": st.integers(-1, 40) | NUMBER},
    optional={
        "value": SMALL | NUMBER,
        "strength": SMALL,
        "mode": st.sampled_from(["clamp", "add", "add", "mul"]),
    },
)
VECTOR_IV = st.fixed_dictionaries(
    {
        "layer": st.integers(-1, LAYERS) | NUMBER,
        "vector": st.lists(SMALL, min_size=D, max_size=D) | st.lists(NUMBER, max_size=D + 1),
    },
    optional={"scale": SMALL | NUMBER},
)
INTERVENTION = FEATURE_IV | VECTOR_IV
SPECS = st.fixed_dictionaries(
    {"interventions": st.lists(INTERVENTION, max_size=5)},
    optional={"positions": st.sampled_from(["all", "prompt", "generated", "middle"])},
)
"""Near-valid specs, so the fuzz reaches the catalog checks and not only the parser."""


def _only_spec_errors(fn: Any, *args: Any) -> None:
    with contextlib.suppress(SteeringSpecError):
        fn(*args)


@FUZZ
@given(JSON)
def test_fuzz_spec_from_json_values(value: Any) -> None:
    _only_spec_errors(SteeringSpec.from_obj, value)
    _only_spec_errors(SteeringSpec.from_json, json.dumps(value))
    _only_spec_errors(spec_from_extra_args, {"steering": value})
    _only_spec_errors(spec_from_extra_args, value)


@FUZZ
@given(st.text(max_size=400) | st.text(alphabet='[]{}":,0123456789.eE-+ ntrufals\\', max_size=400))
def test_fuzz_spec_from_text(text: str) -> None:
    _only_spec_errors(SteeringSpec.from_json, text)
    _only_spec_errors(spec_from_extra_args, {"steering": text}, 4096)


@FUZZ
@given(st.binary(max_size=400))
def test_fuzz_spec_from_bytes(raw: bytes) -> None:
    _only_spec_errors(SteeringSpec.from_json, raw)
    parse_json_body(raw)  # "not JSON" is an answer, never an exception


@FUZZ
@given(JSON | SPECS, st.sampled_from([*(r.path for r in STEERING_ROUTES), "/tokenize"]))
def test_fuzz_admission_decides_every_body(catalog: SAECatalog, body: Any, path: str) -> None:
    as_text = json.dumps(body)
    wrapped = {"vllm_xargs": {"steering": as_text}, "sampling_params": {"extra_args": body}}
    for data in (body, wrapped, {"vllm_xargs": {"steering": body}}):
        try:
            admit_with(catalog, "POST", path, data)
        except AdmissionError as e:
            assert 400 <= e.status < 500


def test_depth_cap_is_exact() -> None:
    ok = '{"interventions": ' + "[" * (MAX_SPEC_DEPTH - 1) + "]" * (MAX_SPEC_DEPTH - 1) + "}"
    with pytest.raises(SteeringSpecError, match="interventions"):  # parsed, then invalid
        SteeringSpec.from_json(ok)
    too_deep = '{"interventions": ' + "[" * MAX_SPEC_DEPTH + "]" * MAX_SPEC_DEPTH + "}"
    with pytest.raises(SteeringSpecError, match="nested deeper"):
        SteeringSpec.from_json(too_deep)
