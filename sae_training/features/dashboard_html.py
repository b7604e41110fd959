"""The dashboard pages as HTML strings: self-contained (inline CSS and SVG, no scripts,
no network resources), built from a :class:`FeatureStats` and a tokenizer."""

from __future__ import annotations

import html
from typing import Any

import torch

from sae_steer_vllm.constants import DASHBOARD_FEATURE_PAGE, DASHBOARD_INDEX
from sae_training.features.explanations import ExplanationScore, FeatureExplanation
from sae_training.features.feature_stats import FeatureStats

HIST_BARS = 64

CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px;
       color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin: 0 0 6px 0; } h2 { font-size: 16px; margin: 22px 0 8px 0; }
a { color: #0b57d0; text-decoration: none; } a:hover { text-decoration: underline; }
table { border-collapse: collapse; background: #fff; }
th, td { border: 1px solid #ddd; padding: 3px 8px; font-size: 13px; text-align: right; }
th { background: #f0f0f3; } td.l, th.l { text-align: left; }
.grid { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
.card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; }
.context { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 13px;
           background: #fff; border: 1px solid #e3e3e3; border-radius: 4px; padding: 6px 8px;
           margin: 4px 0; white-space: pre-wrap; word-break: break-all; }
.tok { border-radius: 2px; } .tok.peak { outline: 1.5px solid #b3261e; }
.left { border-right: 2px solid #b3261e; padding-right: 2px; margin-right: 2px; }
.tok.burnin { color: #8a8a8a; text-decoration: underline dotted #8a8a8a; }
.val { color: #666; font-size: 12px; margin-left: 8px; }
.bar { fill: #4a78c2; } .gbar { background: #e08a2c; height: 12px; display: inline-block; }
.detector { color: #b3261e; font-weight: 600; }
.muted { color: #777; font-size: 12px; }
.explanation-text { font-size: 15px; margin: 4px 0 8px 0; max-width: 760px; }
"""


def token_text(tokenizer: Any, tid: int) -> str:
    s = str(tokenizer.decode([tid]))
    return s.replace("\n", "↵").replace("\t", "⇥")


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 1e-3:
        return f"{v:.3e}"
    return f"{v:.4f}"


def histogram_svg(
    counts: torch.Tensor, hist_max: float, width: int = 420, height: int = 150
) -> str:
    """Bars of log(1 + count) over ``[0, hist_max]``, ``HIST_BARS`` bars."""
    c = counts.double()
    if c.numel() % HIST_BARS == 0 and c.numel() > HIST_BARS:
        c = c.reshape(HIST_BARS, -1).sum(dim=1)
    total = int(c.sum())
    pad_l, pad_b = 34, 22
    w, h = width - pad_l - 6, height - pad_b - 8
    parts = [
        f'<svg class="histogram" width="{width}" '
        f'height="{height}" role="img" aria-label="activation histogram">',
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
    ]
    if total > 0:
        y = torch.log1p(c)
        ymax = float(y.max())
        bw = w / len(c)
        for i, v in enumerate(y.tolist()):
            bh = 0.0 if ymax == 0 else v / ymax * h
            if bh > 0:
                parts.append(
                    f'<rect class="bar" x="{pad_l + i * bw:.2f}" y="{8 + h - bh:.2f}" '
                    f'width="{max(bw - 0.6, 0.4):.2f}" height="{bh:.2f}">'
                    f"<title>{int(c[i])} tokens</title></rect>"
                )
    else:
        parts.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" '
            f'font-size="12" fill="#777">never fires</text>'
        )
    parts.append(
        f'<line x1="{pad_l}" y1="{8 + h}" x2="{pad_l + w}" y2="{8 + h}" stroke="#333"/>'
        f'<text x="{pad_l}" y="{height - 6}" font-size="11">0</text>'
        f'<text x="{pad_l + w}" y="{height - 6}" font-size="11" text-anchor="end">'
        f"{_fmt(hist_max)}</text>"
        f'<text x="4" y="14" font-size="10" fill="#555">log n</text></svg>'
    )
    return "".join(parts)


def context_html(
    tokenizer: Any,
    tokens: list[int],
    acts: list[float],
    peak: int,
    scale: float,
    value: float,
    n_burn_in: int = 0,
) -> str:
    """One top context: the left context (the tokens before the peak, in a ``left`` span
    closed by a rule), the peak (outlined) and what follows. The first ``n_burn_in`` shown
    tokens lie in the window's burn-in: run for context, never counted (grey, dotted)."""
    left: list[str] = []
    rest: list[str] = []
    for j, (tid, a) in enumerate(zip(tokens, acts, strict=True)):
        if tid < 0:
            continue
        alpha = 0.0 if scale <= 0 else max(0.0, min(1.0, a / scale))
        cls = "tok peak" if j == peak else "tok burnin" if j < n_burn_in else "tok"
        title = "burn-in: context only, not counted" if j < n_burn_in else f"{a:.4f}"
        (left if j < peak else rest).append(
            f'<span class="{cls}" style="background: rgba(240,90,20,{alpha:.3f})" '
            f'title="{title}">{_esc(token_text(tokenizer, tid))}</span>'
        )
    left_html = f'<span class="left" title="left context">{"".join(left)}</span>' if left else ""
    return (
        f'<div class="context">{left_html}{"".join(rest)}'
        f'<span class="val">{_fmt(value)}</span></div>'
    )


def score_text(sc: ExplanationScore | None, digits: int = 3) -> str:
    """A balanced accuracy with its 95% interval, or "not scored"."""
    if sc is None:
        return "not scored"
    return f"{sc.balanced_accuracy:.{digits}f} [{sc.ci_low:.{digits}f}, {sc.ci_high:.{digits}f}]"


def _verdict(row: dict[str, Any] | None) -> str:
    """The token-dependence check's verdict, from the ranked table's row."""
    if not row or row.get("injection_ratio") is None:
        return '<span class="muted">not checked</span>'
    ratio = f"injection ratio {row['injection_ratio']:.3f}"
    if row.get("likely_token_detector"):
        return f'<span class="detector">likely token detector</span> ({ratio})'
    return f"needs reasoning context ({ratio})"


def explanation_card(e: FeatureExplanation | None, row: dict[str, Any] | None) -> str:
    """The explanation, its two scores (balanced accuracy, 0.5 = chance, 95% interval, over
    held-out contexts the explainer never saw) and the token-dependence verdict beside them."""
    if e is None:
        return (
            '<div class="card explanation"><h2>Explanation</h2><p class="muted">'
            "Not explained in the <code>sae-steer explain</code> run.</p></div>"
        )
    trs = []
    for method, sc in (("detection", e.detection), ("fuzzing", e.fuzzing)):
        counts = (
            ""
            if sc is None
            else f"{sc.n_positive} should fit, {sc.n_negative} should not, {sc.n_unclear} unclear"
        )
        trs.append(
            f'<tr><th class="l">{method}</th><td data-score="{method}">{score_text(sc)}</td>'
            f'<td class="l muted">{counts}</td></tr>'
        )
    trs.append(
        f'<tr><th class="l">token dependence</th><td class="l" colspan="2" '
        f'data-score="token-dependence">{_verdict(row)}</td></tr>'
    )
    return (
        '<div class="card explanation"><h2>Explanation</h2>'
        f'<p class="explanation-text">{_esc(e.explanation)}</p>'
        '<table class="explanation-scores"><tr><th class="l">score</th>'
        '<th>balanced accuracy [95% CI]</th><th class="l">held-out contexts</th></tr>'
        f"{''.join(trs)}</table></div>"
    )


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>{body}</body></html>\n"
    )


def feature_page(
    stats: FeatureStats,
    f: int,
    rank: int,
    tokenizer: Any,
    lens: tuple[list[tuple[int, float]], list[tuple[int, float]]],
    row: dict[str, Any] | None,
    explanation: FeatureExplanation | None = None,
    has_explanations: bool = False,
) -> str:
    """One feature's page; with ``has_explanations`` (an explanations file exists) an
    explanation card comes first (:func:`explanation_card`)."""
    t = stats.tensors
    ctx_before = int(stats.meta.get("ctx_before", 16))
    burn_in = int(stats.meta.get("burn_in", 0))  # 0 in files written before burn-in
    mx = float(t["max_activation"][f])
    levels = [float(q) for q in t["quantile_levels"].tolist()]
    qs = t["quantiles"][f].tolist()
    summary = [
        ("ReasonScore", _fmt(float(t["reasonscore"][f]))),
        ("rank", str(rank)),
        ("μ+ share (μ+ᵢ / Σμ+)", _fmt(float(t["pos_term"][f]))),
        ("normalised entropy Hn", _fmt(float(t["entropy_norm"][f]))),
        ("μ− share (μ−ᵢ / Σμ−)", _fmt(float(t["neg_term"][f]))),
        ("μ+ (folded)", _fmt(float(t["mean_pos"][f]))),
        ("μ− (folded)", _fmt(float(t["mean_neg"][f]))),
        ("density", f"{float(t['density'][f]):.5f}"),
        ("max activation (raw)", _fmt(mx)),
        ("max activation (folded)", _fmt(float(t["max_activation_folded"][f]))),
    ]
    if "quantile_unit" in t:
        level = stats.meta.get("quantile_unit_level")
        summary.append((f"quantile unit (q={level}, raw)", _fmt(float(t["quantile_unit"][f]))))
    summary += [
        (f"q{round(q * 100)} of non-zero", _fmt(v)) for q, v in zip(levels, qs, strict=True)
    ]
    if row and row.get("injection_ratio") is not None:
        det = row.get("likely_token_detector")
        summary.append(
            (
                "token injection ratio",
                f"{row['injection_ratio']:.3f}"
                + (' <span class="detector">likely token detector</span>' if det else ""),
            )
        )
    stat_rows = "".join(
        f'<tr><th class="l">{_esc(k)}</th><td data-stat="{_esc(k)}">{v}</td></tr>'
        for k, v in summary
    )
    share = t["group_share"][f].tolist()
    group_rows = "".join(
        f'<tr><td class="l">{_esc(g)}</td><td>{p:.3f}</td><td class="l">'
        f'<span class="gbar" style="width:{p * 160:.1f}px"></span></td></tr>'
        for g, p in zip(stats.groups, share, strict=True)
    )

    def lens_table(name: str, items: list[tuple[int, float]]) -> str:
        body = "".join(
            f'<tr><td class="l"><code>{_esc(token_text(tokenizer, tid))}</code></td>'
            f"<td>{v:+.3f}</td></tr>"
            for tid, v in items
        )
        return (
            f'<table class="logit-lens" data-kind="{name}"><tr><th class="l">{name} tokens</th>'
            f"<th>logit</th></tr>{body}</table>"
        )

    contexts = []
    for s in range(t["top_values"].shape[1]):
        v = float(t["top_values"][f, s])
        if v <= 0:
            continue
        contexts.append(
            context_html(
                tokenizer,
                t["top_ctx_tokens"][f, s].tolist(),
                t["top_ctx_acts"][f, s].tolist(),
                ctx_before,
                mx,
                v,
                # shown token j sits at window position top_pos + j - ctx_before
                max(0, burn_in - int(t["top_pos"][f, s]) + ctx_before),
            )
        )
    ctx_html = "".join(contexts) or '<p class="muted">This feature never fired on the corpus.</p>'
    body = (
        f'<p><a href="{DASHBOARD_INDEX}">← all features</a></p><h1 id="feature" data-feature="{f}">'
        f"Feature {f}</h1>"
        f'<p class="muted">corpus {_esc(str(stats.meta.get("corpus", {}).get("path", "")))}, '
        f"{stats.meta.get('n_tokens', '?')} tokens</p>"
        + (explanation_card(explanation, row) if has_explanations else "")
        + f'<div class="grid"><div class="card"><h2>Scores</h2><table class="stats">{stat_rows}'
        f'</table></div><div class="card"><h2>Activation histogram</h2>'
        f"{histogram_svg(t['hist_counts'][f], float(t['hist_max'][f]))}"
        f'<h2>Reasoning-word groups (p<sub>ij</sub>)</h2><table class="groups">{group_rows}'
        f'</table></div><div class="card"><h2>Logit lens</h2><div class="grid">'
        f"{lens_table('top', lens[0])}{lens_table('bottom', lens[1])}</div></div></div>"
        f'<h2>Top activating contexts</h2><p class="muted">Each context shows '
        f"{ctx_before} tokens of left context before the peak (outlined), then what "
        f"follows; grey dotted tokens are the window's burn-in ({burn_in} tokens run for "
        f"context, never counted).</p>"
        f'<div class="contexts">{ctx_html}</div>'
    )
    return _page(f"Feature {f}", body)


def index_page(
    stats: FeatureStats,
    feats: list[int],
    rows: dict[int, dict[str, Any]],
    lens_top: dict[int, list[str]],
    explained: dict[int, FeatureExplanation] | None = None,
) -> str:
    """The ranking; with ``explained`` (an explanations file exists) also the explanation
    and both scores beside the token-dependence ratio."""
    t = stats.tensors
    trs = []
    for rank, f in enumerate(feats, 1):
        r = rows.get(f, {})
        ratio = r.get("injection_ratio")
        ratio_s = "" if ratio is None else f"{ratio:.2f}"
        if r.get("likely_token_detector"):
            ratio_s = f'<span class="detector">{ratio_s}</span>'
        share = t["group_share"][f]
        group = stats.groups[int(share.argmax())] if float(share.sum()) > 0 else ""
        trs.append(
            f'<tr class="feature-row" data-feature="{f}"><td>{rank}</td>'
            f'<td><a href="{DASHBOARD_FEATURE_PAGE.format(feature=f)}">{f}</a></td>'
            f"<td>{_fmt(float(t['reasonscore'][f]))}</td><td>{_fmt(float(t['pos_term'][f]))}</td>"
            f"<td>{float(t['entropy_norm'][f]):.3f}</td><td>{_fmt(float(t['neg_term'][f]))}</td>"
            f"<td>{float(t['density'][f]):.4f}</td><td>{_fmt(float(t['max_activation'][f]))}</td>"
            f'<td>{ratio_s}</td>{_explained_cells(explained, f)}<td class="l">{_esc(group)}</td>'
            f'<td class="l"><code>{_esc(" ".join(lens_top.get(f, [])))}</code></td></tr>'
        )
    meta = stats.meta
    body = (
        "<h1>ReasonScore: top features</h1>"
        f'<p class="muted">SAE {_esc(str(meta.get("sae", "")))} · model '
        f"{_esc(str(meta.get('model', '')))} · {meta.get('n_tokens', '?')} tokens · "
        f"alpha {meta.get('alpha')} · window {meta.get('window')} · "
        f"{stats.d_sae} features · token-detector rule: injection ratio ≥ 0.5</p>"
        '<table id="ranking"><tr><th>rank</th><th>feature</th><th>ReasonScore</th>'
        "<th>μ+ share</th><th>Hn</th><th>μ− share</th><th>density</th><th>max act</th>"
        "<th>inj. ratio</th>"
        + (
            ""
            if explained is None
            else '<th class="l">explanation</th><th>detection</th><th>fuzzing</th>'
        )
        + '<th class="l">top group</th><th class="l">logit lens top</th></tr>'
        + "".join(trs)
        + "</table>"
        + (
            ""
            if explained is None
            else '<p class="muted">detection, fuzzing: balanced accuracy of the explanation '
            "on held-out contexts the explainer never saw (0.5 = chance) [95% CI]</p>"
        )
    )
    return _page("ReasonScore: top features", body)


def _explained_cells(explained: dict[int, FeatureExplanation] | None, f: int) -> str:
    if explained is None:
        return ""
    e = explained.get(f)
    if e is None:
        return '<td class="l muted">not explained</td><td></td><td></td>'
    return (
        f'<td class="l explanation">{_esc(e.explanation)}</td>'
        f'<td data-score="detection">{score_text(e.detection, 2)}</td>'
        f'<td data-score="fuzzing">{score_text(e.fuzzing, 2)}</td>'
    )
