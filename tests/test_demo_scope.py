"""The demo study's where-to-steer arms (issue 15): the top feature at one strength steered
at every position, only while thinking and only in the answer.

A scripted server plays a model whose thinking ends at a one-token marker (``box``, the
demo's stand-in for ``</think>`` on SmolLM2): steering while thinking lengthens the thinking,
steering in the answer breaks the ``\\boxed{}`` answer (the demo's own marker is
`` answer``, see docs/demo.md; the analysis does not depend on which). The tests check that the arms are
designed, sent with the intervention's ``positions``, analysed with the right numbers and
reported, and that the demo asks its server for those phases.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks.demo import DemoConfig, ReportContext, analyse, make_design, write_study_report
from benchmarks.demo.run import study_key, study_phases
from benchmarks.demo.scope import ScopeDesign, analyse_scope, make_scope
from benchmarks.demo.server import serve_command
from benchmarks.demo.study_report import plot_study
from benchmarks.results import SampleRecord
from benchmarks.runner import run_sweep
from benchmarks.sweep import BASELINE
from sae_steer_vllm.constants import SAELENS_WEIGHTS
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.sae_api import (
    ModelShape,
    RuntimeUpdates,
    SAEEntry,
    SAEList,
    ServerLimits,
    ThinkMarkers,
)
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

SAE = "fake-sae"
BOX_ID = 4810  # "box" on SmolLM2: the demo's end marker
N = 8


def listing(markers: bool) -> dict[str, Any]:
    think = ThinkMarkers(start=None, start_id=None, end="box", end_id=BOX_ID) if markers else None
    return SAEList(
        data=[
            SAEEntry(
                name=SAE, layer=3, d_in=8, d_sae=1000, architecture="jumprelu",
                modes=["clamp", "add"], has_statistics=True, strength_units=["max"],
            )
        ],
        model=ModelShape(num_layers=6, d_model=8, think_markers=think),
        limits=ServerLimits(
            max_interventions=4, max_clamp_per_layer=2, vector_layers=[3],
            vector_layers_setting="all",
        ),
        runtime_updates=RuntimeUpdates(enabled=False, layers=[]),
    ).model_dump(mode="json")  # fmt: skip


def scoped_reply(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """A model that thinks, writes ``\\boxed{answer}``; steering acts where it is scoped.

    One word is one token; the word ``box`` is token ``BOX_ID``. Steering while thinking
    (``all``/``thinking``) adds 2 x strength "Wait" words before the answer; steering in the
    answer (``all``/``answer``) replaces what follows the marker with "ed Wait Wait".
    """
    user = body["messages"][-1]["content"]
    i = int(re.search(r"\bP(\d+):", user).group(1))  # type: ignore[union-attr]
    raw = (body.get("vllm_xargs") or {}).get("steering")
    scope, strength = None, 0.0
    if raw is not None:
        (iv,) = SteeringSpec.from_json(raw).interventions
        assert isinstance(iv, FeatureIntervention) and iv.sae == SAE
        scope, strength = iv.positions or "all", iv.strength or 0.0
    think = ["Add", "the", "numbers."] + ["Wait"] * (i % 3)
    if scope in ("all", "thinking"):
        think += ["Wait"] * int(2 * strength)
    answer = ["ed", "Wait", "Wait"] if scope in ("all", "answer") else [f"ed{{{2 * i + 1}}}"]
    words = [*think, "\\", "box", *answer]
    text = " ".join(words).replace("\\ box ed", "\\boxed")
    ids = [BOX_ID if w == "box" else 100 + k for k, w in enumerate(words)]
    return 200, {
        "id": "c", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{
            "index": 0, "message": {"role": "assistant", "content": text},
            "finish_reason": "stop", "token_ids": ids if body.get("return_token_ids") else None,
        }],
        "usage": {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5 + len(words)},
    }  # fmt: skip


def test_scope_arms_are_designed_with_the_interventions_positions() -> None:
    d = make_design(SAE, [5, 9], [100, 200], [1.0, 2.0], "clamp")
    assert d.scope is None and len(d.specs()) == 9  # no scope arms unless asked
    d = make_design(
        SAE, [5, 9], [100, 200], [1.0, 2.0], "clamp",
        scope_strength=2.0, think_markers=("", "box"),
    )  # fmt: skip
    assert d.scope is not None and (d.scope.start_marker, d.scope.end_marker) == ("", "box")
    specs = d.specs()
    # `all` is the top-1 arm at that strength (same spec, run once); two new arms
    assert len(specs) == 9 + 2 and d.scope.arm("all").name == "top1.f5_clamp_s2"
    for scope in ("thinking", "answer"):
        spec = specs[d.scope.arm(scope).name]
        assert spec is not None
        sent = json.loads(spec.to_json())
        assert sent["interventions"] == [
            {"sae": SAE, "feature": 5, "strength": 2.0, "mode": "clamp", "positions": scope}
        ]
        assert sent.get("positions", "all") == "all"  # per intervention, not per request
    # a strength the main grid lacks: its own `all` arm, at every position
    d3 = make_design(SAE, [5], [100], [1.0, 2.0], "add", scope_strength=3.0)
    assert d3.scope is not None
    all3 = d3.specs()[d3.scope.arm("all").name]
    assert all3 is not None and len(d3.specs()) == 1 + 4 + 3
    assert json.loads(all3.to_json())["interventions"][0] == {
        "sae": SAE, "feature": 5, "strength": 3.0, "mode": "add"
    }  # fmt: skip


def test_scope_study_against_a_scripted_server(tmp_path: Path) -> None:
    """Sweep, analysis, plot and report: thinking-only lengthens the thinking and keeps the
    box; answer-only keeps the thinking and breaks the box; the gate check counts N of N."""
    from helpers.fake_endpoint import FakeServer, make_problems

    problems = make_problems(N)
    design = make_design(
        SAE, [5], [300], [1.0, 2.0], "clamp", scope_strength=2.0, think_markers=("", "box")
    )
    with FakeServer(respond=scoped_reply) as srv:
        # the sweep checks every spec against the listing with the server's admission rules
        srv.listing = listing(markers=False)
        with pytest.raises(UsageError, match="think markers"):
            run_sweep(
                srv.base_url, srv.model_name, problems, design.specs(), out_dir=tmp_path / "x",
                dataset="toy", max_tokens=64, temperature=0.0, progress=False,
            )  # fmt: skip
        assert not srv.requests
        srv.listing = listing(markers=True)
        res = run_sweep(
            srv.base_url, srv.model_name, problems, design.specs(), out_dir=tmp_path / "study",
            dataset="toy", max_tokens=64, temperature=0.0, progress=False, think_end_id=BOX_ID,
        )  # fmt: skip
        sent = {
            r["vllm_xargs"]["steering"]
            for r in srv.requests
            if r.get("vllm_xargs", {}).get("steering")
        }
    assert len(res.records) == N * (1 + 4 + 2) and all(r.ok for r in res.records)
    assert any('"positions":"thinking"' in s.replace(" ", "") for s in sent)
    assert all(r.reasoning_source == "token_ids" for r in res.records)
    an = analyse(design, res.records)
    sc = an.scope
    assert sc is not None and sc.marker_source == "token_ids"
    by = {r.scope: r for r in sc.arms}
    assert (
        sc.baseline.values["answered"].mean == 100.0 and sc.baseline.values["marker"].mean == 100.0
    )
    # thinking: 4 more thinking tokens in every problem, box intact
    assert by["thinking"].vs_baseline["thinking_tokens"].diff == pytest.approx(4.0)  # type: ignore[union-attr]
    assert by["thinking"].values["answered"].mean == 100.0
    # answer: thinking unchanged, every box broken; all: both
    assert by["answer"].vs_baseline["thinking_tokens"].diff == pytest.approx(0.0)  # type: ignore[union-attr]
    assert by["answer"].values["answered"].mean == 0.0 and by["all"].values["answered"].mean == 0.0
    assert by["answer"].vs_baseline["accuracy"].diff == pytest.approx(-100.0)  # type: ignore[union-attr]
    assert by["thinking"].vs_all["answered"].diff == pytest.approx(100.0)  # type: ignore[union-attr]
    assert sc.same_before_marker == (N, N)

    plots = plot_study(design, an, tmp_path / "study" / "plots")
    assert [p.name for p in plots][-1] == "study_scope.png"
    ctx = ReportContext(
        model="fake-model", sae_path="sae", sae_summary="test", score_summary="",
        dataset="toy", n_prompts=N, max_tokens=64, temperature=0.0, top_p=1.0, seed=0,
        feature_notes={}, problems={p.id: p.problem for p in problems}, links={}, elapsed={},
    )  # fmt: skip
    text = write_study_report(
        tmp_path / "study" / "report.md", design, an, res.records, plots, ctx
    ).read_text()
    section = text.split("## Where to steer: all vs thinking vs answer", 1)[1]
    assert "| thinking only | `top1-thinking.f5_clamp_s2` | 8 |" in section
    assert "| answer only | `top1-answer.f5_clamp_s2` | 8 |" in section
    assert "| all positions | `top1.f5_clamp_s2` | 8 |" in section
    assert "- thinking only: answer found vs no steering no detectable difference" in section
    assert "- answer only: answer found vs no steering lower (95% CI excludes 0)" in section
    assert f"in {N} of the {N} problems where no steering wrote it" in section
    assert "![study_scope](plots/study_scope.png)" in section
    assert text.count("study_scope.png") == 1  # in its section only, not again under Plots


def rec(pid: str, arm: str, **kw: Any) -> SampleRecord:
    base: dict[str, Any] = {
        "dataset": "toy", "problem_id": pid, "spec_name": arm, "spec": None,
        "sample_index": 0, "seed": None, "gold_answer": "1", "reasoning_source": "token_ids",
        "finish_reason": "stop",
    }  # fmt: skip
    return SampleRecord(**{**base, **kw})


def test_scope_analysis_numbers_on_hand_made_records() -> None:
    design = make_scope(7, 2.0, "clamp", start_marker="", end_marker="box", all_arm="all7")
    assert isinstance(design, ScopeDesign)
    th, an_ = design.arm("thinking").name, design.arm("answer").name
    boxed, broken = "so \\boxed{1}", "so \\boxed{1"  # unbalanced: no answer to extract
    recs = [
        # baseline: 10/20/30 tokens, thinking 8/16/24, marker in all, an answer in all, 2 correct
        rec("a", BASELINE, completion=boxed, completion_tokens=10, reasoning_tokens=8,
            has_think_end=True, correct=True, reasoning_words=1),
        rec("b", BASELINE, completion=boxed, completion_tokens=20, reasoning_tokens=16,
            has_think_end=True, correct=True),
        rec("c", BASELINE, completion=boxed, completion_tokens=30, reasoning_tokens=24,
            has_think_end=True),
        # all: every completion cut at 40 without the marker or a box
        *[rec(p, "all7", completion="Wait " * 40, completion_tokens=40, reasoning_tokens=40,
              finish_reason="length") for p in "abc"],
        # thinking: +6 thinking tokens each, boxes intact, one marker-less cut
        rec("a", th, completion=boxed, completion_tokens=16, reasoning_tokens=14,
            has_think_end=True, correct=True, reasoning_words=4),
        rec("b", th, completion=boxed, completion_tokens=26, reasoning_tokens=22,
            has_think_end=True),
        rec("c", th, completion=broken, completion_tokens=40, reasoning_tokens=40,
            finish_reason="length"),
        # answer: same thinking, one box broken; a failed request is left out
        rec("a", an_, completion=boxed, completion_tokens=12, reasoning_tokens=8,
            has_think_end=True, correct=True),
        rec("b", an_, completion=broken, completion_tokens=25, reasoning_tokens=16,
            has_think_end=True),
        rec("c", an_, completion="So the answer is 1.", completion_tokens=30,
            reasoning_tokens=24, has_think_end=True),  # no box, but an "answer is" line
        rec("c", "other", completion="", error="boom", sample_index=1),
    ]  # fmt: skip
    an = analyse_scope(design, recs)
    v = {r.scope: r for r in an.arms}
    b = an.baseline.values
    assert (b["tokens"].mean, b["thinking_tokens"].mean) == (20.0, 16.0)
    assert b["accuracy"].mean == pytest.approx(200 / 3) and b["answered"].mean == 100.0
    assert b["word_rate"].mean == pytest.approx(100 / 10 / 3)  # 1 word in 10 tokens, 0, 0
    assert v["all"].truncated == 1.0 and v["all"].values["marker"].mean == 0.0
    assert v["all"].vs_baseline["tokens"].diff == pytest.approx(20.0)  # type: ignore[union-attr]
    assert v["all"].vs_all == {}
    t = v["thinking"]
    assert t.values["marker"].mean == pytest.approx(200 / 3)
    assert t.values["answered"].mean == pytest.approx(200 / 3)
    assert t.vs_baseline["thinking_tokens"].diff == pytest.approx((6 + 6 + 16) / 3)  # type: ignore[union-attr]
    assert t.vs_baseline["word_rate"].diff == pytest.approx((4 / 16 * 100 - 10) / 3)  # type: ignore[union-attr]
    assert t.vs_all["answered"].diff == pytest.approx(200 / 3)  # type: ignore[union-attr]
    assert t.vs_all["tokens"].diff == pytest.approx((16 + 26 + 40) / 3 - 40)  # type: ignore[union-attr]
    a = v["answer"]
    assert a.vs_baseline["thinking_tokens"].diff == pytest.approx(0.0)  # type: ignore[union-attr]
    assert a.vs_baseline["answered"].diff == pytest.approx(-100 / 3)  # type: ignore[union-attr]
    assert a.vs_baseline["accuracy"].diff == pytest.approx(-100 / 3)  # type: ignore[union-attr]
    ci = a.vs_baseline["tokens"]
    assert ci is not None and ci.diff == pytest.approx(7 / 3) and ci.lo <= ci.diff <= ci.hi
    assert ci.n_problems == 3
    # the gate check: text up to the first "box" equals the baseline's in a and b, not in c
    assert an.same_before_marker == (2, 3)
    # without token ids the marker is looked for in the text
    chars = [r.model_copy(update={"reasoning_source": "chars"}) for r in recs]
    assert analyse_scope(design, chars).arms[1].values["marker"].mean == pytest.approx(100.0)
    assert analyse_scope(design, chars).marker_source == "chars"


def test_demo_server_gets_the_marker_flags_and_the_study_reads_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from helpers.fake_endpoint import FakeServer

    cfg = DemoConfig(sae_name=SAE)
    cmd = serve_command(cfg, tmp_path, tmp_path, 1)
    i = cmd.index("--think-start-marker")
    assert cmd[i : i + 4] == ["--think-start-marker", "", "--think-end-marker", " answer"]
    assert (cfg.scope_arms, cfg.scope_strength) == (True, 2.0)
    with FakeServer() as srv:
        srv.listing = listing(markers=True)
        phases, why = study_phases(cfg, srv.base_url)
        assert phases is not None and why is None
        assert (phases.start, phases.end, phases.end_id) == ("", "box", BOX_ID)
        srv.listing = listing(markers=False)
        phases, why = study_phases(cfg, srv.base_url)
        assert phases is None and why is not None and "no think markers" in why
        srv.listing = None  # not an sae-steer server
        assert study_phases(cfg, srv.base_url)[0] is None
    # the marker's id is part of the study's fingerprint (it gives has_think_end its meaning)
    (tmp_path / SAELENS_WEIGHTS).write_bytes(b"w")
    (tmp_path / "stats").write_bytes(b"s")
    design = make_design(SAE, [5], [300], [1.0], "clamp")
    keys = {
        study_key(cfg, tmp_path, tmp_path / "stats", design, None, e) for e in (None, BOX_ID, 7)
    }
    assert len(keys) == 3


# ------------------------------------------------------------------ the GPU arm (docs/paper_recipe.md 4c)
ROOT = Path(__file__).resolve().parent.parent


def test_paper_scope_specs_file_scopes_one_intervention() -> None:
    """The file of section 4c: one clamp at three scopes; its all-positions arm is step 4's
    spec, byte for byte, so `--resume` into step 4's folder reuses those samples."""
    from benchmarks.sweep import load_specs_file

    specs = load_specs_file(ROOT / "configs" / "paper_r1_llama8b_scope_specs.json")
    step4 = load_specs_file(ROOT / "configs" / "paper_r1_llama8b_specs_value.json")
    assert specs[BASELINE] is None
    name = "r1-l19.f46379_clamp_v11.68"
    assert specs[name].to_json() == step4[name].to_json()  # type: ignore[union-attr]
    scopes = {}
    for n, spec in specs.items():
        if spec is None:
            continue
        (iv,) = spec.interventions
        assert isinstance(iv, FeatureIntervention)
        assert (iv.sae, iv.feature, iv.value, iv.mode) == ("r1-l19", 46379, 11.68, "clamp")
        scopes[n] = iv.positions
    assert scopes == {name: None, f"{name}.thinking": "thinking", f"{name}.answer": "answer"}


def test_recipe_scope_snippet_runs_on_an_eval_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe's Python block writes the section from an eval run's samples.jsonl."""
    text = (ROOT / "docs" / "paper_recipe.md").read_text()
    (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "analyse_scope" in b]
    name = "r1-l19.f46379_clamp_v11.68"
    log = tmp_path / "runs" / "paper-r1-f46379" / "samples.jsonl"
    log.parent.mkdir(parents=True)
    lines = []
    for ds in ("aime24", "math500"):
        for p in "ab":
            for arm, toks in ((BASELINE, 10), (name, 20), (f"{name}.thinking", 18),
                              (f"{name}.answer", 11)):  # fmt: skip
                r = rec(p, arm, dataset=ds, completion="x</think>\\boxed{1}",
                        completion_tokens=toks, reasoning_tokens=toks - 5, has_think_end=True)  # fmt: skip
                lines.append(r.model_dump_json())
    log.write_text("\n".join(lines) + "\n")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "paper_recipe.md", "exec"), {})
    out = capsys.readouterr().out
    assert out.count("## Where to steer: all vs thinking vs answer") == 2
    assert "Feature 46379 clamped to 11.68 (2.0 x 5.840) (`clamp`)" in out
    assert f"| thinking only | `{name}.thinking` | 2 |" in out
    assert "# aime24" in out and "# math500" in out
