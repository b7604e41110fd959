"""``sae-steer explain --steering``: steered generations through the sweep, the LLM's
descriptions and clusters, the table, resume, and answers that cannot be read.

One scripted server plays both the steering server (generations depend on the spec in
``vllm_xargs``) and the LLM (answers depend on the feature the prompt names), so the table
is known exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeServer, chat_response, error_body
from pydantic import ValidationError

from benchmarks.interpret.clusters import (
    FeatureDescription,
    clusters_schema,
    effects_table,
    is_filler,
    read_clusters,
)
from benchmarks.interpret.explain_log import ExplainLog
from benchmarks.interpret.llm import LLM, LLMConfig
from benchmarks.interpret.steering_describe import description_schema
from benchmarks.interpret.steering_effects import (
    SteeringExplainOptions,
    run_steering_explain,
)
from sae_steer_vllm.constants import (
    EXPLAIN_LOG_FILE,
    SAMPLES_FILE,
    STEERING_EFFECTS_FILE,
    STEERING_EFFECTS_TABLE,
    STEERING_GENERATIONS_DIR,
)
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.sae_api import ModelShape, RuntimeUpdates, SAEEntry, SAEList, ServerLimits
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

MODEL = "fake-model"
N_PROMPTS = 3
FEATURES = [1, 2, 3, 4, 5, 6]

DESCRIBE = {
    1: '{"strengthening": "loops on Wait", "weakening": "adds Done"}',
    2: 'Here it is:\n```json\n{"strengthening": "repeats Wait", "weakening": "adds Done"}\n```',
    4: "I think it makes the answers longer.",  # not the JSON asked for
    6: '{"strengthening": "loops on Wait"}',  # weakening it changes nothing: not asked
}
CLUSTERS = json.dumps(
    {
        "clusters": [
            {
                "name": "Wait loops",
                "features": [1, 2, 6, 99],
                "strengthening": "loops on Wait",
                "weakening": "ends with Done",
            }
        ]
    }
)
UNREADABLE = "unreadable answer (see explain_log.jsonl)"
TABLE = [
    "| cluster | features | strengthening does | weakening does |",
    "|---|---|---|---|",
    "| Wait loops | 1, 2, 6 | loops on Wait | ends with Done |",
    "| no visible effect | 3 | outputs identical to unsteered | outputs identical to unsteered |",
    f"| unclustered | 4 | {UNREADABLE} | {UNREADABLE} |",
    "",
    "Not described (no usable generations):",
    "",
    "- feature 5: HTTP 400: steering: feature 5 refused",
]


def listing(names: tuple[str, ...] = ("fake-sae",)) -> dict[str, Any]:
    return SAEList(
        data=[
            SAEEntry(
                name=n, layer=3, d_in=8, d_sae=1000, architecture="jumprelu",
                modes=["clamp", "add"], has_statistics=True, strength_units=["max"],
            )
            for n in names
        ],
        model=ModelShape(num_layers=6, d_model=8),
        limits=ServerLimits(
            max_interventions=4, max_clamp_per_layer=2, vector_layers=[3],
            vector_layers_setting="all",
        ),
        runtime_updates=RuntimeUpdates(enabled=False, layers=[]),
    ).model_dump(mode="json")  # fmt: skip


class Scripted:
    """The steering model and the LLM behind one endpoint; ``cluster_answer`` is swappable."""

    def __init__(self) -> None:
        self.cluster_answer = CLUSTERS

    def generate(self, user: str, spec: SteeringSpec | None) -> tuple[int, str]:
        i = int(re.search(r"\bP(\d+):", user).group(1))  # type: ignore[union-attr]
        base = f"The answer is {2 * i + 1}."
        if spec is None:
            return 200, base
        (iv,) = spec.interventions
        assert isinstance(iv, FeatureIntervention) and iv.mode == "clamp"
        s = iv.strength or 0.0
        if iv.feature == 5:
            return 400, "steering: feature 5 refused"
        if iv.feature == 3 or (iv.feature == 6 and s < 0):
            return 200, base  # steering it changes nothing
        if s > 0:
            return 200, "Wait " * (5 + i) + base
        return 200, base + " Done."

    def __call__(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        user = body["messages"][-1]["content"]
        if user.startswith("A language model answered"):
            f = int(re.search(r"\(feature (\d+) of", user).group(1))  # type: ignore[union-attr]
            return 200, chat_response(MODEL, DESCRIBE[f])
        if user.startswith("Each feature below"):
            return 200, chat_response(MODEL, self.cluster_answer)
        raw = (body.get("vllm_xargs") or {}).get("steering")
        status, text = self.generate(user, None if raw is None else SteeringSpec.from_json(raw))
        if status != 200:
            return status, error_body(status, text)
        return 200, chat_response(MODEL, text)


def llm_requests(srv: FakeServer) -> list[str]:
    users = [b["messages"][-1]["content"] for b in srv.requests]
    return [u for u in users if not re.match(r"Please reason", u)]


def steered_feature(body: dict[str, Any]) -> int | None:
    raw = (body.get("vllm_xargs") or {}).get("steering")
    if raw is None:
        return None
    (iv,) = SteeringSpec.from_json(raw).interventions
    return iv.feature if isinstance(iv, FeatureIntervention) else None


def generation_requests(srv: FakeServer) -> int:
    """Generations answered; feature 5's refused ones are tried again on resume (as in any
    sweep: a refusal is not a result), so they are not counted."""
    gen = [b for b in srv.requests if b["messages"][-1]["content"].startswith("Please")]
    return sum(1 for b in gen if steered_feature(b) != 5)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    p = tmp_path / "prompts.jsonl"
    lines = [
        {"id": f"p{i}", "problem": f"P{i}: what is {i} + {i + 1}?", "answer": str(2 * i + 1)}
        for i in range(N_PROMPTS + 2)
    ]
    p.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return p


@pytest.fixture
def served() -> Any:
    script = Scripted()
    with FakeServer(model_name=MODEL, respond=script) as srv:
        srv.listing = listing()
        srv.script = script  # type: ignore[attr-defined]
        yield srv


def run(
    srv: FakeServer, prompts: Path, out: Path, *, resume: bool = False, budget: int | None = None
) -> Path:
    opts = SteeringExplainOptions(
        steer_prompts=str(prompts), n_steer_prompts=N_PROMPTS, steer_max_tokens=64
    )
    llm = LLM(LLMConfig(url=srv.base_url, model=MODEL, max_requests=budget))
    return run_steering_explain(opts, llm, FEATURES, out, resume)


def table_rows(path: Path) -> list[str]:
    lines = path.read_text().splitlines()
    return lines[lines.index(TABLE[0]) :]


def test_table_from_scripted_generations_and_answers(
    served: FakeServer, prompts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    path = run(served, prompts, out)
    assert path == out / STEERING_EFFECTS_TABLE
    assert table_rows(path) == TABLE
    assert "`fake-sae` on `fake-model`: each feature clamped at -2, 2 x" in path.read_text()
    # the header says whether answers were constrained (a plain text, never an object repr)
    assert "grouped by `fake-model` (prompts and answers" in path.read_text()

    # generation: greedy, the shared unsteered arm once per prompt, 2 strengths per feature
    gen = [b for b in served.requests if b["messages"][-1]["content"].startswith("Please")]
    assert {b["temperature"] for b in gen} == {0.0} and {b["max_tokens"] for b in gen} == {64}
    clamps = [
        (iv.feature, iv.strength)
        for b in gen
        if "vllm_xargs" in b
        for iv in SteeringSpec.from_json(b["vllm_xargs"]["steering"]).interventions
        if isinstance(iv, FeatureIntervention)
    ]
    assert len(gen) - len(clamps) == N_PROMPTS  # one unsteered output per prompt, shared
    for f in (1, 2, 3, 4, 6):
        assert (
            sorted(c for c in clamps if c[0] == f)
            == [(f, -2.0)] * N_PROMPTS + [(f, 2.0)] * N_PROMPTS
        )
    # feature 5: once refused, its other samples are not sent (the sweep's rule)
    assert 1 <= sum(c[0] == 5 for c in clamps) < 2 * N_PROMPTS
    # the LLM: features 1, 2, 4, 6 described (3 needs no words, 5 has no outputs), one grouping
    asked = llm_requests(served)
    assert len(asked) == 5
    describe_1 = next(u for u in asked if "(feature 1 of" in u)
    assert "### Unsteered\nThe answer is 1." in describe_1
    assert "### Weakened (clamped at -2)\nThe answer is 1. Done." in describe_1
    assert "### Strengthened (clamped at 2)\nWait Wait" in describe_1
    describe_6 = next(u for u in asked if "(feature 6 of" in u)
    assert "Weakened" not in describe_6 and "Strengthened (clamped at 2)" in describe_6
    assert describe_6.endswith('Answer with JSON only: {"strengthening": "..."}')
    grouping = next(u for u in asked if u.startswith("Each feature below"))
    assert "Feature 1: strengthening: loops on Wait; weakening: adds Done" in grouping
    assert "Feature 3" not in grouping and "Feature 4" not in grouping

    data = json.loads((out / STEERING_EFFECTS_FILE).read_text())
    status = {e["feature"]: e["status"] for e in data["features"]}
    assert status == {
        1: "described",
        2: "described",
        3: "no_change",
        4: "unreadable",
        5: "not_generated",
        6: "described",
    }
    same = f"no change: identical to the unsteered output on all {N_PROMPTS} prompts"
    assert data["features"][2]["weakening"] == same == data["features"][5]["weakening"]
    assert data["unclustered"] == [4] and data["cluster_status"] == "clustered"
    assert any("feature 99 was not asked about" in n for n in data["notes"])
    assert data["meta"]["steer_sae"] == "fake-sae" and data["meta"]["steer_model"] == MODEL
    log = [json.loads(x) for x in (out / EXPLAIN_LOG_FILE).read_text().splitlines()]
    assert sorted((x["kind"], x["feature"]) for x in log) == [
        ("steer_cluster", -1),
        ("steer_describe", 1),
        ("steer_describe", 2),
        ("steer_describe", 4),
        ("steer_describe", 6),
    ]


def test_budget_stop_then_resume_loses_nothing(
    served: FakeServer, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    run(served, prompts, out, budget=2)  # stops cleanly, as the explain mode does
    assert (
        "the budget of 2 requests is spent: 2 feature(s) not described, features not grouped"
        in capsys.readouterr().err
    )
    n_gen = generation_requests(served)
    assert len(llm_requests(served)) == 2
    partial = json.loads((out / STEERING_EFFECTS_FILE).read_text())
    assert sum(e["status"] == "failed" for e in partial["features"]) == 2
    assert partial["cluster_status"] == "unreadable"  # not asked: nothing guessed

    path = run(served, prompts, out, resume=True)
    assert generation_requests(served) == n_gen  # every generation was kept
    assert len(llm_requests(served)) == 2 + 3  # the last descriptions and the grouping
    assert table_rows(path) == TABLE

    # a run cut at any point: lose the last generation and the last answer, then resume
    samples = out / STEERING_GENERATIONS_DIR / SAMPLES_FILE
    lines = samples.read_text().splitlines(keepends=True)
    last_ok = max(i for i, x in enumerate(lines) if json.loads(x)["error"] is None)
    samples.write_text("".join(lines[:last_ok] + lines[last_ok + 1 :]))
    log = out / EXPLAIN_LOG_FILE
    log.write_text("".join(log.read_text().splitlines(keepends=True)[:-1]))
    n_gen, n_llm = generation_requests(served), len(llm_requests(served))
    path = run(served, prompts, out, resume=True)
    assert generation_requests(served) == n_gen + 1
    assert len(llm_requests(served)) == n_llm + 1
    assert table_rows(path) == TABLE


def test_unreadable_grouping_leaves_every_feature_unclustered(
    served: FakeServer, prompts: Path, tmp_path: Path
) -> None:
    script: Scripted = served.script  # type: ignore[attr-defined]
    script.cluster_answer = '{"clusters": [{"name": "x", "features": "1, 2"}]}'
    path = run(served, prompts, tmp_path / "out")
    assert table_rows(path)[2:7] == [
        TABLE[3],  # no visible effect: decided from the texts, not by the LLM
        "| unclustered | 1 | loops on Wait | adds Done |",
        "| unclustered | 2 | repeats Wait | adds Done |",
        f"| unclustered | 4 | {UNREADABLE} | {UNREADABLE} |",
        f"| unclustered | 6 | loops on Wait | no change: identical to the unsteered output "
        f"on all {N_PROMPTS} prompts |",
    ]
    data = json.loads((tmp_path / "out" / STEERING_EFFECTS_FILE).read_text())
    assert data["cluster_status"] == "unreadable" and data["unclustered"] == [1, 2, 4, 6]


def test_server_choices_and_refusals(served: FakeServer, prompts: Path, tmp_path: Path) -> None:
    served.listing = listing(("a", "b"))
    with pytest.raises(UsageError, match=r"serves 2 SAEs \(\['a', 'b'\]\): pass --steer-sae"):
        run(served, prompts, tmp_path / "o1")
    served.listing = None  # stock vLLM: it would ignore the spec and look unsteered
    with pytest.raises(UsageError, match="sae-steer server"):
        run(served, prompts, tmp_path / "o2")
    served.listing = listing()
    # the explain mode's answers may share the folder's log; they are kept
    ExplainLog(tmp_path / "o3" / EXPLAIN_LOG_FILE).put(("explain", 1, "0"), "q", "a")
    run(served, prompts, tmp_path / "o3")
    kinds = [e["kind"] for e in ExplainLog(tmp_path / "o3" / EXPLAIN_LOG_FILE).entries()]
    assert kinds.count("explain") == 1 and kinds.count("steer_describe") == 4
    with pytest.raises(UsageError, match="steering-effects run: pass --resume"):
        run(served, prompts, tmp_path / "o3")  # never mixes two runs
    assert generation_requests(served) == N_PROMPTS * (1 + 2 * 5)


def test_options_strengths() -> None:
    opts = SteeringExplainOptions(strengths=[2.0, 0.0, -1.0, 2.0, 4.0])
    assert opts.strengths == [-1.0, 2.0, 4.0] and opts.weakening == [-1.0]
    with pytest.raises(ValidationError, match="non-zero"):
        SteeringExplainOptions(strengths=[0.0])
    with pytest.raises(ValidationError, match="finite"):
        SteeringExplainOptions(strengths=[float("nan")])


def test_read_clusters_never_guesses() -> None:
    answer = json.dumps(
        {
            "clusters": [
                {"name": "A", "features": [1, 2], "strengthening": "more loops", "weakening": "y"},
                {
                    "name": "B",
                    "features": [2, 3, 7],
                    "strengthening": "ends sooner",
                    "weakening": "q",
                },
            ]
        }
    )
    got = read_clusters(answer, [1, 2, 3, 4], ["strengthening"])
    assert [(c.name, c.features, c.weakening) for c in got.clusters] == [
        ("A", [1], "not measured"),
        ("B", [3], "not measured"),
    ]
    assert got.unclustered == [2, 4]  # 2: in two clusters; 4: left out
    assert len(got.notes) == 3
    for bad in ("not json", '{"clusters": []}', '["a"]', None):
        res = read_clusters(bad, [1, 2])
        assert res.status == "unreadable" and res.unclustered == [1, 2] and not res.clusters


def test_placeholders_and_non_sentences_are_not_descriptions() -> None:
    """What the served 135M model wrote once its answers were constrained: the example's
    placeholders as a cluster, "2" and "..." as descriptions. None of it is shown as one."""
    copied = json.dumps(
        {
            "clusters": [
                {
                    "name": "short name",
                    "features": [481, 4334],
                    "strengthening": "one sentence",
                    "weakening": "one sentence",
                },
                {"name": "Hesitation", "features": [7], "strengthening": "more wait loops",
                 "weakening": "ends sooner"},
            ]
        }
    )  # fmt: skip
    got = read_clusters(copied, [481, 4334, 7])
    assert [c.name for c in got.clusters] == ["Hesitation"]  # a one-word name is fine
    assert got.unclustered == [481, 4334]
    assert any("placeholder" in n for n in got.notes)
    assert not any("left out" in n for n in got.notes)  # they were not left out
    assert is_filler("...") and is_filler("2") and is_filler(" One sentence. ")
    assert not is_filler("loops on Wait")


def test_the_json_schemas_sent_to_a_constrained_endpoint_match_the_readers() -> None:
    """An answer valid under :func:`clusters_schema` is read as a clustering (features
    limited to those asked about); the description schema requires each measured side."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = clusters_schema([4, 1, 4])
    ok: dict[str, Any] = {
        "clusters": [{"name": "A", "features": [1, 4], "strengthening": "x", "weakening": "y"}]
    }
    jsonschema.validate(ok, schema)
    assert read_clusters(json.dumps(ok), [1, 4]).status == "clustered"
    bads: list[dict[str, Any]] = [
        {"clusters": [{**ok["clusters"][0], "features": [7]}]},  # a feature not asked about
        {"clusters": []},
        {"clusters": [{"name": "A", "features": [1]}]},
    ]
    for bad in bads:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    desc = description_schema(["strengthening"])
    jsonschema.validate({"strengthening": "longer"}, desc)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"weakening": "shorter"}, desc)


def test_table_escapes_cells() -> None:
    table = effects_table(
        [], [FeatureDescription(feature=7, strengthening="a | b\nc", weakening=None)]
    )
    assert table.splitlines()[-1] == "| unclustered | 7 | a \\| b c | not measured |"
