"""The ranked table: the top features by ReasonScore, one row each, as JSON and CSV.

One owner of ``reasonscore_top.json`` / ``.csv`` (names in :mod:`sae_steer_vllm.constants`):
``sae-steer score`` writes it, the dashboards and the demo read it. The JSON holds
``{"meta": run settings, "features": rows}``; the CSV the same rows (empty cell = None).
When ``sae-steer explain`` has written explanations (:mod:`~sae_training.features.explanations`)
each row also carries the feature's explanation and its detection and fuzzing balanced
accuracies with their 95% intervals, after the token-dependence columns so the
``likely_token_detector`` flag sits beside them; without that file the table is unchanged.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import TABLE_CSV, TABLE_JSON
from sae_steer_vllm.files import atomic_write, atomic_write_json
from sae_training.features.explanations import ExplanationsFile, FeatureExplanation
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.token_dependence import TOKEN_DETECTOR_RATIO, TokenDependence


def select_features(
    stats: FeatureStats, top_k: int = 100, quantile: float | None = None
) -> list[int]:
    """Feature indices by descending ReasonScore: the top ``top_k``, or with ``quantile``
    every feature whose score is above that quantile of all ``d_sae`` scores (the paper's
    candidate selection, q = 0.997; ``torch.quantile``, linear interpolation)."""
    ranking = stats.ranking()
    if quantile is None:
        return [int(f) for f in ranking[:top_k].tolist()]
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    score = stats.tensors["reasonscore"].double()
    threshold = float(torch.quantile(score, quantile))
    return [int(f) for f in ranking.tolist() if float(score[f]) > threshold]


EXPLANATION_COLUMNS = (
    "explanation",
    "detection",
    "detection_ci_low",
    "detection_ci_high",
    "fuzzing",
    "fuzzing_ci_low",
    "fuzzing_ci_high",
)
"""The columns explanations add (``None`` for a feature not explained or not scored)."""


def explanation_columns(e: FeatureExplanation | None) -> dict[str, Any]:
    """One row's :data:`EXPLANATION_COLUMNS`."""
    row: dict[str, Any] = {"explanation": None if e is None else e.explanation}
    for method in ("detection", "fuzzing"):
        sc = None if e is None else getattr(e, method)
        row[method] = None if sc is None else sc.balanced_accuracy
        row[f"{method}_ci_low"] = None if sc is None else sc.ci_low
        row[f"{method}_ci_high"] = None if sc is None else sc.ci_high
    return row


def ranked_rows(
    stats: FeatureStats,
    top_k: int = 100,
    token_dep: dict[int, TokenDependence] | None = None,
    quantile: float | None = None,
    explanations: ExplanationsFile | None = None,
) -> list[dict[str, Any]]:
    """The selected features (:func:`select_features`) with their parts and summaries, and
    with ``explanations`` (``sae-steer explain``'s file) the :data:`EXPLANATION_COLUMNS`."""
    explained = None if explanations is None else explanations.by_feature()
    t = stats.tensors
    groups = stats.groups
    levels = [float(q) for q in t["quantile_levels"].tolist()]
    rows = []
    for rank, f in enumerate(select_features(stats, top_k, quantile), 1):
        share = t["group_share"][f]
        top_group = int(share.argmax())
        row: dict[str, Any] = {
            "rank": rank,
            "feature": f,
            "reasonscore": float(t["reasonscore"][f]),
            "pos_term": float(t["pos_term"][f]),
            "entropy_norm": float(t["entropy_norm"][f]),
            "neg_term": float(t["neg_term"][f]),
            "mean_pos": float(t["mean_pos"][f]),
            "mean_neg": float(t["mean_neg"][f]),
            "density": float(t["density"][f]),
            "max_activation": float(t["max_activation"][f]),
            "max_activation_folded": float(t["max_activation_folded"][f]),
        }
        if "quantile_unit" in t:
            row["quantile_unit"] = float(t["quantile_unit"][f])
        for q, v in zip(levels, t["quantiles"][f].tolist(), strict=True):
            row[f"q{round(q * 100):02d}"] = float(v)
        row["top_group"] = groups[top_group] if float(share.sum()) > 0 else ""
        row["top_group_share"] = float(share[top_group])
        dep = (token_dep or {}).get(f)
        row["injection_ratio"] = None if dep is None else dep.injection_ratio
        row["transfer_ratio"] = None if dep is None else dep.transfer_ratio
        row["act_injected"] = None if dep is None else dep.injected
        row["act_reasoning"] = None if dep is None else dep.reasoning
        row["act_baseline"] = None if dep is None else dep.baseline
        row["likely_token_detector"] = None if dep is None else dep.likely_token_detector
        if explained is not None:
            row.update(explanation_columns(explained.get(f)))
        rows.append(row)
    return rows


def _json_safe(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_ranked_table(
    stats: FeatureStats | str | Path,
    out_dir: str | Path,
    top_k: int = 100,
    token_dep: dict[int, TokenDependence] | None = None,
    quantile: float | None = None,
    explanations: ExplanationsFile | None = None,
) -> tuple[Path, Path]:
    """Write ``reasonscore_top.json`` (rows plus run metadata) and ``reasonscore_top.csv``;
    the rows are the top ``top_k``, or with ``quantile`` the features above that quantile;
    with ``explanations`` their columns too (and the explainer run's settings in the meta)."""
    st = stats if isinstance(stats, FeatureStats) else FeatureStats.load(stats)
    rows = ranked_rows(st, top_k, token_dep, quantile, explanations)
    out = Path(out_dir)
    meta = {
        k: st.meta.get(k)
        for k in (
            "model",
            "sae",
            "corpus",
            "n_tokens",
            "window",
            "alpha",
            "eps",
            "groups",
            "burn_in",
            "quantile_unit_level",
        )
    }
    meta["selection"] = (
        f"top {top_k} by ReasonScore"
        if quantile is None
        else f"ReasonScore above its {quantile} quantile over all features"
    )
    meta["d_sae"] = st.d_sae
    meta["token_detector_rule"] = f"injection_ratio >= {TOKEN_DETECTOR_RATIO}"
    if explanations is not None:
        meta["explanations"] = explanations.meta
    doc = {"meta": meta, "features": [{k: _json_safe(v) for k, v in r.items()} for r in rows]}
    jpath = atomic_write_json(out / TABLE_JSON, doc, indent=1)
    buf = io.StringIO(newline="")
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if v is None else v for k, v in r.items()})
    cpath = atomic_write(out / TABLE_CSV, buf.getvalue())
    return jpath, cpath


def table_path(path: str | Path) -> Path:
    """The table JSON of a folder (or ``path`` itself when it is not a folder)."""
    p = Path(path)
    return p / TABLE_JSON if p.is_dir() else p


def load_ranked_table(path: str | Path) -> dict[str, Any]:
    """``{"meta": ..., "features": [rows]}`` from a folder or the JSON file itself."""
    doc: dict[str, Any] = json.loads(table_path(path).read_text())
    return doc


def rows_by_feature(path: str | Path) -> dict[int, dict[str, Any]]:
    """The table's rows keyed by feature index; empty when there is no table."""
    p = table_path(path)
    if not p.is_file():
        return {}
    return {int(r["feature"]): r for r in load_ranked_table(p).get("features", [])}
