"""What the demo tells the person at the terminal: the study's headline table, where every
artefact went, and an ``openai`` snippet that steers the running server."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.demo.study import StudyAnalysis
from sae_steer_vllm.constants import PLOTS_DIR, SAMPLES_FILE, TRAIN_METRICS_FILE


def _ci(c: Any, digits: int) -> str:
    return "–" if c is None else f"{c.diff:+.{digits}f} [{c.lo:+.{digits}f}, {c.hi:+.{digits}f}]"


def headline(an: StudyAnalysis) -> str:
    """The study's main table in a few terminal lines (the report has the rest)."""
    b = an.baseline.values
    lines = [
        f"\nno steering: {b['tokens'].mean:.0f} tokens, {b['word_rate'].mean:.2f} reasoning "
        f"words/100 tok, {b['repeat'].mean:.1f}% repeated 4-grams, accuracy "
        f"{b['accuracy'].mean:.1f}% ({an.n_problems} problems)",
        f"{'arm':<12} {'strength':>8}  {'Δ tokens':<22} {'Δ words/100 tok':<24} "
        f"{'Δ repeated 4-grams':<24} Δ accuracy (pts)",
    ]
    for g in an.groups:
        v = g.vs_baseline
        lines.append(
            f"{g.group:<12} {g.strength:>8g}  {_ci(v.get('tokens'), 0):<22} "
            f"{_ci(v.get('word_rate'), 2):<24} {_ci(v.get('repeat'), 1):<24} "
            f"{_ci(v.get('accuracy'), 1)}"
        )
    return "\n".join(lines)


def feature_notes(
    table: dict[str, Any], stats: Any, top: list[int], rand: list[int]
) -> dict[int, str]:
    """Per studied feature: its rank, max activation, density and ranked-table findings."""
    rows = {int(r["feature"]): r for r in table.get("features", [])}
    rank = {int(f): i + 1 for i, f in enumerate(stats.ranking().tolist())}
    notes: dict[int, str] = {}
    for f in top + rand:
        max_act = float(stats["max_activation"][f])
        dens = float(stats["density"][f]) if "density" in stats.tensors else float("nan")
        parts = [f"ReasonScore rank {rank.get(f, '?')}", f"max activation {max_act:.3g}"]
        parts.append(f"density {dens:.3g}")
        r = rows.get(f)
        if r:
            parts.append(f"score {r['reasonscore']:.3g}")
            if r.get("top_group"):
                parts.append(f"mostly '{r['top_group']}' ({100 * r['top_group_share']:.0f}%)")
            if r.get("likely_token_detector") is not None:
                parts.append(
                    "likely token detector"
                    if r["likely_token_detector"]
                    else "not a token detector"
                )
                parts.append(f"injection ratio {r['injection_ratio']:.2f}")
        notes[f] = ", ".join(parts)
    return notes


def sae_summary(sae_dir: Path) -> str:
    """One line about the SAE from its training metrics (layer, architecture, quality)."""
    try:
        m = json.loads((sae_dir / TRAIN_METRICS_FILE).read_text())
    except (OSError, ValueError):
        return "no training metrics"
    ev = m.get("eval") or {}
    cfg = m.get("config") or {}
    parts = [f"layer {m.get('layer')}", f"{cfg.get('architecture')}", f"d_sae {cfg.get('d_sae')}"]
    for k, label in (("explained_variance", "explained variance"), ("l0", "L0")):
        if k in ev:
            parts.append(f"{label} {ev[k]:.3f}")
    if "ce_recovered" in ev:
        parts.append(f"CE recovered {ev['ce_recovered']:.3f}")
    return ", ".join(parts)


def client_snippet(
    base_url: str, model: str, sae_name: str, feature: int, mode: str = "clamp"
) -> str:
    """Python a person can paste to steer the server with the top feature."""
    return f'''import json
from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="EMPTY")
spec = {{"interventions": [{{"sae": "{sae_name}", "feature": {feature}, "strength": 2.0, "mode": "{mode}"}}]}}
for steering in (None, spec):
    r = client.chat.completions.create(
        model="{model}",
        messages=[{{"role": "user", "content": "Please reason step by step, and put your final answer within \\\\boxed{{}}.\\nWhat is 17 * 23?"}}],
        max_tokens=200,
        temperature=0,
        extra_body={{"vllm_xargs": {{"steering": json.dumps(steering)}}}} if steering else None,
    )
    print("steered" if steering else "unsteered", "->", r.choices[0].message.content[:300], "\\n")'''


def print_summary(out: dict[str, Any], snippet: str, echo: Callable[[str], None]) -> None:
    """The closing block: total time, every artefact's path, the server, the snippet."""
    report = Path(out["report"])
    timing = out["step_seconds"]
    echo("\n━━ Done ━━")
    echo(
        f"total time      {out['seconds'] / 60:.1f} min  "
        f"({', '.join(f'{k} {v:.0f}s' for k, v in timing.items())})"
    )
    echo(f"report          {report}")
    echo(f"plots           {report.parent / PLOTS_DIR}")
    echo(f"samples         {report.parent / SAMPLES_FILE}")
    echo(f"dashboards      {out['dashboard']}")
    echo(f"ranked features {out['table']}  (and .csv)")
    echo(f"SAE             {out['sae']}  (statistics: {Path(out['stats']).name})")
    if out["server_pid"] is not None:
        echo(f"server          {out['base_url']}  pid {out['server_pid']}, log {out['server_log']}")
        echo(f"                still running; stop it with: kill -TERM -- -{out['server_pid']}")
    else:
        echo(f"server          {out['base_url']} (yours)")
    echo("\nSteer it from Python (pip install openai):\n")
    echo(snippet)
