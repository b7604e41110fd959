"""The model diff's outputs: ``model_diff.json`` (everything, machine-readable),
``model_diff.md`` (the tables a reader needs) and ``model_diff.png`` (class shares of the
top ReasonScore features vs random ones; decoder-cosine distributions per condition).

Plots draw on a matplotlib ``Figure`` (no pyplot, no global backend).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import DIFF_PLOT_FILE, DIFF_REPORT_FILE, DIFF_RESULT_FILE
from sae_steer_vllm.files import atomic_save, atomic_write, atomic_write_json
from sae_training.diffing.classify import CLASSES, CONDITIONS, condition_name

COND_NAMES = [condition_name(*c) for c in CONDITIONS]


def condition_summary(arrays: dict[str, torch.Tensor], present: torch.Tensor) -> dict[str, Any]:
    """Per condition: features firing / present, median cosines over the features firing
    (density > 0) there, mean L0-free density summary."""
    out: dict[str, Any] = {}
    for i, name in enumerate(COND_NAMES):
        active = arrays["density"][i] > 0
        dec, enc = arrays["cos_dec"][i][active], arrays["cos_enc"][i][active]
        out[name] = {
            "features_active": int(active.sum()),
            "features_present": int(present[i].sum()),
            "median_cos_dec_active": float(dec.median()) if dec.numel() else None,
            "median_cos_enc_active": float(enc.median()) if enc.numel() else None,
            "mean_density": float(arrays["density"][i].mean()),
        }
    return out


def feature_rows(
    features: list[int], arrays: dict[str, torch.Tensor], classes: list[str]
) -> list[dict[str, Any]]:
    """Per-feature detail (class, and density / cosines per condition) for a short list."""
    rows = []
    for f in features:
        row: dict[str, Any] = {"feature": f, "class": classes[f]}
        for k in ("density", "cos_dec", "cos_enc"):
            row[k] = {n: round(float(arrays[k][i, f]), 6) for i, n in enumerate(COND_NAMES)}
        rows.append(row)
    return rows


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ci(ci: tuple[float, float] | list[float]) -> str:
    return f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def _markdown(doc: dict[str, Any]) -> str:
    m = doc["meta"]
    th = m["thresholds"]
    ft = m["finetune"]
    reasoning = m[f"model_{m['reasoning_model']}"]
    lines = [
        "# Model diff",
        "",
        f"SAE `{m['sae']}` (layer {m['layer']}), trained on model A.",
        f"Model A: `{m['model_a']}`; model B: `{m['model_b']}`. "
        f"Reasoning model: {m['reasoning_model'].upper()} (`{reasoning}`, "
        f"rule `{m['reasoning_model_rule']}`).",
        f"{m['tokens_per_condition']} tokens per condition, {m['context_size']}-token rows; "
        f"fine-tune: {ft['architecture']}, {ft['steps']} steps x {ft['batch_size']} tokens, "
        f"lr {ft['lr']:g}, seed {m['seed']}.",
        f"Rule: present = density >= {th['min_density']:g} and >= "
        f"{th['relative_density']:g} x the busiest condition's, and decoder cos >= "
        f"{th['min_decoder_cos']:g}, encoder cos >= {th['min_encoder_cos']:g} after the "
        "fine-tune (see docs/interpretation.md).",
        "",
        "## Classes",
        "",
        "| class | features | share |",
        "|---|---:|---:|",
    ]
    total = sum(doc["counts"].values()) or 1
    for k, n in doc["counts"].items():
        lines.append(f"| {CLASSES[k]} | {n} | {_pct(n / total)} |")
    lines += ["", "## Presence patterns (non-dead features)", "", "| present in | features |"]
    lines.append("|---|---:|")
    for pat, n in doc["patterns"].items():
        lines.append(f"| {pat} | {n} |")
    lines += [
        "",
        "## Conditions",
        "",
        "| condition | active | present | median decoder cos | median encoder cos |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, s in doc["conditions"].items():
        dec = "-" if s["median_cos_dec_active"] is None else f"{s['median_cos_dec_active']:.3f}"
        enc = "-" if s["median_cos_enc_active"] is None else f"{s['median_cos_enc_active']:.3f}"
        lines.append(
            f"| {name} | {s['features_active']} | {s['features_present']} | {dec} | {enc} |"
        )
    rs = doc.get("reasonscore")
    lines += ["", "## ReasonScore's top features vs random features", ""]
    if rs is None:
        lines.append("No feature statistics file: run `sae-steer score` on the SAE first.")
    else:
        lines += [
            f"Top {len(rs['top'])} by ReasonScore vs {len(rs['random'])} random non-dead "
            "features (seeded); shares with Wilson 95% intervals, Fisher's exact test.",
            "",
            "| class | top-k | random | all non-dead | Fisher p |",
            "|---|---|---|---:|---:|",
        ]
        for k, r in rs["per_class"].items():
            lines.append(
                f"| {CLASSES[k]} | {r['top']} ({_pct(r['top_share'])} {_ci(r['top_ci'])}) | "
                f"{r['random']} ({_pct(r['random_share'])} {_ci(r['random_ci'])}) | "
                f"{_pct(r['all_alive_share'])} | {r['fisher_p']:.3g} |"
            )
        lines += [
            "",
            "### Top features",
            "",
            "| feature | class | "
            + " | ".join(f"density / dec cos {n}" for n in COND_NAMES)
            + " |",
            "|---|---|" + "---|" * len(COND_NAMES),
        ]
        for row in rs["top_rows"]:
            cells = [f"{row['density'][n]:.4f} / {row['cos_dec'][n]:.3f}" for n in COND_NAMES]
            lines.append(
                f"| {row['feature']} | {CLASSES[row['class']]} | " + " | ".join(cells) + " |"
            )
    lines += ["", f"Timings (s): {m['seconds']}", ""]
    return "\n".join(lines)


def _plot(path: Path, doc: dict[str, Any], arrays: dict[str, torch.Tensor]) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.2))
    ax_cls, ax_cos = fig.subplots(1, 2)
    keys = list(CLASSES)
    xs = range(len(keys))
    rs = doc.get("reasonscore")
    if rs is not None:
        per = rs["per_class"]
        width = 0.28
        for j, (field, label) in enumerate((("top", "ReasonScore top-k"), ("random", "random"))):
            shares = [per[k][f"{field}_share"] for k in keys]
            # clipped at 0: an interval edge equal to the share can differ from it by rounding
            lo = [max(0.0, shares[i] - per[k][f"{field}_ci"][0]) for i, k in enumerate(keys)]
            hi = [max(0.0, per[k][f"{field}_ci"][1] - shares[i]) for i, k in enumerate(keys)]
            ax_cls.bar(
                [x + (j - 1) * width for x in xs],
                shares,
                width,
                yerr=[lo, hi],
                capsize=3,
                label=label,
            )
        ax_cls.bar(
            [x + width for x in xs],
            [per[k]["all_alive_share"] for k in keys],
            width,
            label="all non-dead",
            color="gray",
            alpha=0.6,
        )
    else:
        total = sum(doc["counts"].values()) or 1
        ax_cls.bar(list(xs), [doc["counts"][k] / total for k in keys], 0.6, label="all features")
    ax_cls.set_xticks(
        list(xs), [CLASSES[k].split(" (")[0] for k in keys], rotation=25, ha="right", fontsize=8
    )
    ax_cls.set(ylabel="share of features", title="classes")
    ax_cls.legend(fontsize=8)
    low = 1.0
    for i, name in enumerate(COND_NAMES):
        active = arrays["density"][i] > 0
        vals = arrays["cos_dec"][i][active].clamp(-1, 1).sort().values
        if vals.numel():
            low = min(low, float(vals[0]))
            share = torch.arange(1, vals.numel() + 1) / vals.numel()
            ax_cos.step(vals.numpy(), share.numpy(), where="post", label=name)
    threshold = doc["meta"]["thresholds"]["min_decoder_cos"]
    ax_cos.axvline(threshold, color="gray", ls="--", label="threshold")
    ax_cos.set_xlim(min(low, threshold) - 0.02, 1.005)
    ax_cos.set(
        xlabel="decoder cos(before, after fine-tune)",
        ylabel="share of active features with cos <= x",
        title="direction change per condition",
    )
    ax_cos.legend(fontsize=8)
    fig.tight_layout()
    return atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def write_report(
    out: Path,
    *,
    meta: dict[str, Any],
    arrays: dict[str, torch.Tensor],
    present: torch.Tensor,
    classes: list[str],
    counts: dict[str, int],
    patterns: dict[str, int],
    reasonscore: dict[str, Any] | None,
) -> tuple[Path, Path, Path]:
    """Write the three files into ``out``; returns their paths (json, md, png)."""
    rs = None
    if reasonscore is not None:
        rs = {
            **reasonscore,
            "top_rows": feature_rows(reasonscore["top"], arrays, classes),
            "random_rows": feature_rows(reasonscore["random"], arrays, classes),
        }
    doc: dict[str, Any] = {
        "meta": meta,
        "classes": CLASSES,
        "counts": counts,
        "patterns": patterns,
        "conditions": condition_summary(arrays, present),
        "reasonscore": rs,
        "feature_class": classes,
    }
    json_path = atomic_write_json(out / DIFF_RESULT_FILE, doc)
    md_path = atomic_write(out / DIFF_REPORT_FILE, _markdown(doc))
    plot_path = _plot(out / DIFF_PLOT_FILE, doc, arrays)
    return json_path, md_path, plot_path
