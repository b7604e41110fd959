"""Degeneration beside the reasoning-word rate (issue 16): the repeated n-gram share of a
completion, the looped flag, and both in every sweep report (eval summary.md + metrics.json,
the demo study report, its scope section, the terminal headline), including logs written
before the measure existed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.demo import ReportContext, analyse, make_design, write_study_report
from benchmarks.demo.report import headline
from benchmarks.demo.scope import analyse_scope, make_scope
from benchmarks.demo.scope_report import scope_section
from benchmarks.metrics import is_looped, repeat_flags, repeated_ngram_share, words
from benchmarks.report import write_report
from benchmarks.results import SAMPLES_FILE, SampleRecord, read_log
from benchmarks.sweep import BASELINE

LOOP = "hmm " * 20  # 20 words, 17 4-grams, all the same: every one after the first repeats
FLUENT = (
    "First add the two numbers to get seven, then multiply that sum by three which gives "
    "twenty one, so the final answer is 21."
)
START = "Let's start. " * 10  # 20 words, 17 4-grams of 2 kinds


# ------------------------------------------------------------------ the measure
def test_repeated_ngram_share_exact_values() -> None:
    assert repeated_ngram_share(LOOP) == pytest.approx(16 / 17)
    assert repeated_ngram_share(FLUENT) == 0.0
    # said twice, no 4-gram repeats yet (one 4-gram); as bigrams, "Let's start." recurs
    assert repeated_ngram_share("Let's start. Let's start.") == 0.0
    assert repeated_ngram_share("Let's start. Let's start.", n=2) == pytest.approx(1 / 3)
    assert repeated_ngram_share(START) == pytest.approx(15 / 17)
    # token ids work the same way: (1 2 3 4) comes back once among 5 4-grams
    assert repeated_ngram_share([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)
    # whitespace words, case and punctuation kept; shorter than n: nothing to repeat
    assert repeated_ngram_share("a b c d A b c d\na  b c d") == pytest.approx(1 / 9)
    assert repeated_ngram_share("hmm hmm hmm") == 0.0 and repeated_ngram_share("") == 0.0
    assert repeat_flags("x y x y x", n=2) == [False, False, True, True]
    with pytest.raises(ValueError, match="n must be"):
        repeated_ngram_share("a b", n=0)


def test_looped_means_the_tail_is_a_loop() -> None:
    assert is_looped(LOOP) and is_looped(START)
    assert not is_looped(FLUENT)
    distinct = " ".join(f"w{i}" for i in range(40))
    # the same amount of repetition (16 of 57 4-grams) at the end loops, at the start not
    assert repeated_ngram_share(distinct + " " + LOOP) == pytest.approx(16 / 57)
    assert repeated_ngram_share(LOOP + distinct) == pytest.approx(16 / 57)
    assert is_looped(distinct + " " + LOOP) and not is_looped(LOOP + distinct)
    # too short to tell (3 4-grams), although all it does is repeat
    assert not is_looped("Let's start. Let's start. Let's start.")
    # cut at the token limit inside the looped word: the fragment does not hide the loop
    assert is_looped(LOOP + "hm")
    # loops written without spaces are cut into 8-character pieces, so they repeat too
    assert words("WhatYouWhatYouWh at") == ["WhatYouW", "hatYouWh", "at"]
    no_spaces = "How YouINS" + "I" * 250
    assert repeated_ngram_share(no_spaces) == pytest.approx(27 / 30) and is_looped(no_spaces)
    # period 7 characters in 8-character pieces: 7 distinct pieces, then all repeat
    assert repeated_ngram_share("WhatYou" * 40) == pytest.approx(25 / 32)
    assert is_looped("WhatYou" * 40)


# ------------------------------------------------------------------ per sample
BASE: dict[str, Any] = {
    "dataset": "toy", "spec": None, "sample_index": 0, "seed": 0, "gold_answer": "21",
    "finish_reason": "stop", "completion_tokens": 20, "reasoning_tokens": 20,
    "reasoning_words": 1, "reasoning_source": "token_ids",
}  # fmt: skip


def line(pid: str, spec: str, completion: str | None, **kw: Any) -> dict[str, Any]:
    """A samples.jsonl line as written before the measure existed (no degeneration keys)."""
    d = {**BASE, "problem_id": pid, "spec_name": spec, **kw}
    if completion is not None:
        d["completion"] = completion
    return d


def test_each_sample_carries_it_and_old_lines_are_measured(tmp_path: Path) -> None:
    rec = SampleRecord.model_validate(line("p0", "s", LOOP))
    dumped = json.loads(rec.model_dump_json())
    assert dumped["repeated_ngram_share"] == pytest.approx(16 / 17) and dumped["looped"] is True
    # a stored value is never trusted: it is recomputed from the text
    again = SampleRecord.model_validate({**dumped, "repeated_ngram_share": 0.0, "looped": False})
    assert again.repeated_ngram_share == pytest.approx(16 / 17) and again.looped
    g = rec.graded()
    assert g.repeated_ngram_share == pytest.approx(16 / 17) and g.looped is True
    # a failed request, or a line without the text: n/a, not 0
    failed = SampleRecord.model_validate(line("p0", "s", "", error="boom"))
    no_text = SampleRecord.model_validate(line("p0", "s", None))
    for r in (failed, no_text):
        assert r.repeated_ngram_share is None and r.looped is None
    # an empty completion the model really wrote is measured: nothing repeats
    assert SampleRecord.model_validate(line("p0", "s", "")).repeated_ngram_share == 0.0
    p = tmp_path / SAMPLES_FILE
    p.write_text(json.dumps(line("p0", "s", START)) + "\n")
    assert read_log(p).records[("toy", "p0", "s", "", 0)].repeated_ngram_share == pytest.approx(
        15 / 17
    )


# ------------------------------------------------------------------ eval report
def _write_log(path: Path, lines: list[dict[str, Any]]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / SAMPLES_FILE).write_text("".join(json.dumps(d) + "\n" for d in lines))


def test_eval_report_has_the_columns_from_an_old_log(tmp_path: Path) -> None:
    lines = [
        line("p0", BASELINE, FLUENT),
        line("p1", BASELINE, FLUENT),
        line("p0", "steered", LOOP, sample_index=0),
        line("p0", "steered", FLUENT, sample_index=1),  # p0: (16/17 + 0) / 2
        line("p1", "steered", START),  # p1: 15/17, looped
    ]
    _write_log(tmp_path / "run", lines)
    rep = write_report(tmp_path / "run", plots=False)
    text = rep.summary_md.read_text()
    header = next(x for x in text.splitlines() if x.startswith("| dataset"))
    cols = [c.strip() for c in header.strip("|").split("|")]
    i = cols.index("reasoning words /100 tok")
    assert cols[i + 1 : i + 3] == ["repeated 4-grams % (95% CI)", "looped %"]
    rows = {r.split("|")[2].strip(): r for r in text.splitlines() if r.startswith("| toy")}
    assert "| 0.0 [0.0, 0.0] | 0.0 |" in rows[BASELINE]
    mean = (16 / 17 / 2 + 15 / 17) / 2
    assert f"| {100 * mean:.1f} [" in rows["steered"]
    assert f"] | {100 * 2 / 3:.1f} |" in rows["steered"]  # 2 of 3 completions looped
    assert "Degeneration: *repeated 4-grams*" in text
    m = {d["spec_name"]: d for d in json.loads(rep.metrics_json.read_text())["metrics"]}
    assert m["steered"]["repeated_ngram_share"]["mean"] == pytest.approx(mean)
    assert m["steered"]["repeated_ngram_share"]["n"] == 2
    assert m["steered"]["looped_rate"] == pytest.approx(2 / 3)
    assert m[BASELINE]["repeated_ngram_share"]["mean"] == 0.0


def test_eval_report_says_n_a_without_completion_texts(tmp_path: Path) -> None:
    _write_log(tmp_path / "run", [line("p0", BASELINE, None), line("p1", BASELINE, None)])
    rep = write_report(tmp_path / "run", plots=False)
    row = next(x for x in rep.summary_md.read_text().splitlines() if x.startswith("| toy"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[12:14] == ["–", "–"]  # repeated 4-grams, looped
    (m,) = json.loads(rep.metrics_json.read_text())["metrics"]
    assert m["repeated_ngram_share"] == {"mean": None, "lo": None, "hi": None, "n": 0}
    assert m["looped_rate"] is None
    assert m["pass_at_1"] == 0.0  # everything else still reports


# ------------------------------------------------------------------ demo reports
CTX = ReportContext(
    model="m", sae_path="sae", sae_summary="s", score_summary="", dataset="toy", n_prompts=3,
    max_tokens=20, temperature=0.0, top_p=1.0, seed=0, feature_notes={}, problems={},
    links={}, elapsed={},
)  # fmt: skip


def _rec(pid: str, arm: str, completion: str, **kw: Any) -> SampleRecord:
    return SampleRecord.model_validate(line(pid, arm, completion, **kw))


def test_demo_study_and_scope_report_degeneration(tmp_path: Path) -> None:
    design = make_design("sae", [5], [9], [1.0])
    top, rnd = (a.name for a in design.arms)
    pids = ["p0", "p1", "p2"]
    recs = [_rec(p, BASELINE, FLUENT) for p in pids]
    recs += [_rec(p, top, LOOP, finish_reason="length") for p in pids]  # top loops everywhere
    recs += [_rec("p0", rnd, START), _rec("p1", rnd, FLUENT), _rec("p2", rnd, FLUENT)]
    an = analyse(design, recs)
    assert an.baseline.values["repeat"].mean == 0.0 and an.baseline.looped == 0.0
    g_top, g_rnd = an.groups
    assert g_top.values["repeat"].mean == pytest.approx(100 * 16 / 17)
    assert g_top.looped == 1.0 and g_rnd.looped == pytest.approx(1 / 3)
    d = g_top.vs_baseline["repeat"]
    assert d is not None and d.diff == pytest.approx(100 * 16 / 17) and d.lo > 0
    tmr = an.top_minus_random[1.0]["repeat"]
    assert tmr is not None and tmr.diff == pytest.approx(100 * (16 / 17 - 15 / 17 / 3))
    assert an.per_arm[0]["looped"] == 1.0 and an.per_arm[0]["repeat"] == pytest.approx(
        100 * 16 / 17
    )
    text = write_study_report(tmp_path / "report.md", design, an, recs, [], CTX).read_text()
    assert "| cut % | looped % | length (tokens) |" in text
    assert "| Δ words | repeated 4-grams % | Δ repeated (pts) | accuracy % |" in text
    top_row = next(x for x in text.splitlines() if x.startswith("| top-1 ReasonScore"))
    assert f"| {100 * 16 / 17:.1f} [{100 * 16 / 17:.1f}, {100 * 16 / 17:.1f}] " in top_row
    assert "| 100 | 100 |" in top_row  # cut %, looped %
    assert "Repeated 4-grams (degeneration): top higher (95% CI excludes 0)" in text
    assert "looped 100% (top) vs 33% (random) vs 0% unsteered" in text
    assert "94% repeated 4-grams, looped" in text  # the side-by-side's steered completion
    assert "Δ repeated 4-grams" in headline(an)

    scope = make_scope(5, 1.0, "clamp", start_marker="", end_marker="", all_arm=top)
    th, ans = scope.arm("thinking").name, scope.arm("answer").name
    srecs = [r for r in recs if r.spec_name in (BASELINE, top)]
    srecs += [_rec(p, th, START) for p in pids] + [_rec(p, ans, FLUENT) for p in pids]
    sc = analyse_scope(scope, srecs)
    by = {r.scope: r for r in sc.arms}
    assert by["thinking"].values["repeat"].mean == pytest.approx(100 * 15 / 17)
    assert by["answer"].vs_baseline["repeat"].diff == 0.0  # type: ignore[union-attr]
    vs_all = by["thinking"].vs_all["repeat"]
    assert vs_all is not None and vs_all.diff == pytest.approx(100 * (15 / 17 - 16 / 17))
    section = "\n".join(scope_section(sc, "clamp", None, tmp_path))
    assert "| words /100 tok | Δ words | repeated 4-grams % | Δ repeated (pts) |" in section
    assert "repeated 4-grams higher (95% CI excludes 0)" in section


def test_demo_records_without_text_read_n_a(tmp_path: Path) -> None:
    design = make_design("sae", [5], [9], [1.0])
    recs = [
        SampleRecord.model_validate(line(p, a, None)) for p in ("p0", "p1") for a in design.specs()
    ]
    an = analyse(design, recs)
    g = an.groups[0]
    assert g.values["repeat"].mean != g.values["repeat"].mean  # NaN: shown as "–"
    assert g.vs_baseline["repeat"] is not None and g.looped != g.looped
    text = write_study_report(tmp_path / "report.md", design, an, recs, [], CTX).read_text()
    top_row = next(x for x in text.splitlines() if x.startswith("| top-1 ReasonScore"))
    cells = [c.strip() for c in top_row.strip("|").split("|")]
    assert cells[4] == "–" and cells[9:11] == ["– [–, –]", "–"]  # looped, repeated, Δ
    assert "Repeated 4-grams (degeneration): top not measured" in text
    assert "nan" not in text
