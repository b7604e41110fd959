"""Show an ``sae_readout`` to a person: coloured terminal text and a standalone HTML page.

Pure rendering of a :class:`~sae_steer_vllm.readout_api.SAEReadoutResponse` (no network):
``sae-steer inspect`` (:mod:`benchmarks.inspect_cli`) prints :func:`render_terminal` and
writes :func:`render_html`. Both colour each read token by its *strength*: the largest
activation reported there (the top feature, or a watched one when ``top_k`` is 0), scaled
to the largest strength of the whole readout of that SAE, so the hottest token is always
full colour.

Token strings come from the model and are untrusted: the terminal view escapes control
characters (a token holding ``ESC`` cannot drive the terminal) and the page escapes HTML.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote

from sae_steer_vllm.constants import DASHBOARD_FEATURE_PAGE, DASHBOARD_INDEX
from sae_steer_vllm.errors import SaeSteerError, UsageError
from sae_steer_vllm.readout_api import SAEReadoutResponse, SAEReadoutResult

__all__ = [
    "ANSI_RAMP",
    "check_aligned",
    "dashboard_links",
    "render_html",
    "render_terminal",
    "token_strengths",
]

ANSI_RAMP = (230, 229, 228, 221, 220, 214, 208, 202, 196)
"""xterm-256 background colours from weak (pale yellow) to strong (red)."""
_RESET = "\x1b[0m"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_NEWLINE = "↵"


# ----------------------------------------------------------------- shared pieces
def check_aligned(readout: SAEReadoutResponse) -> None:
    """Refuse (exit 1, naming the SAE and list) a readout whose per-position lists differ in
    length, or whose watched rows do not match the watch list: nothing would line up."""
    for name, res in readout.saes.items():
        n = len(res.positions)
        for field, got in (("token_ids", res.token_ids), ("tokens", res.tokens)):
            if len(got) != n:
                raise SaeSteerError(
                    f"malformed sae_readout: SAE {name!r} has {n} positions but {len(got)} {field}"
                )
        if len(res.top_k) != n or (res.features and len(res.watched) != n):
            raise SaeSteerError(
                f"malformed sae_readout: SAE {name!r}: top_k / watched do not have one row "
                f"for each of its {n} positions"
            )
        if any(len(row) != len(res.features) for row in res.watched):
            raise SaeSteerError(
                f"malformed sae_readout: SAE {name!r}: a watched row does not have one value "
                f"for each of the {len(res.features)} watched features"
            )


def token_strengths(res: SAEReadoutResult) -> list[float]:
    """Per read position: the largest activation reported there (top-k and watched), >= 0."""
    out = []
    for i in range(len(res.positions)):
        acts = [a for _, a in res.top_k[i]] if i < len(res.top_k) else []
        if i < len(res.watched):
            acts += res.watched[i]
        out.append(max([0.0, *acts]))
    return out


def _scale(strengths: Iterable[float]) -> float:
    return max([0.0, *strengths])


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _unread_note(readout: SAEReadoutResponse, res: SAEReadoutResult, completion: int | None) -> str:
    """Why fewer generated tokens were read than generated (the last is never read)."""
    if completion is None or readout.positions == "prompt":
        return ""
    read = sum(1 for p in res.positions if p >= readout.prompt_tokens)
    unread = completion - read
    if unread <= 0:
        return ""
    last = ": the model never reads its last token" if unread == 1 else ""
    return f"{unread} generated token{'s' if unread != 1 else ''} not read{last}"


def _header(name: str, res: SAEReadoutResult, readout: SAEReadoutResponse) -> str:
    n_prompt = sum(1 for p in res.positions if p < readout.prompt_tokens)
    n_gen = len(res.positions) - n_prompt
    return (
        f"SAE {name} (layer {res.layer}), positions {readout.positions}: "
        f"{n_prompt} prompt + {n_gen} generated tokens read"
    )


# ----------------------------------------------------------------- terminal
def _ansi_bg(strength: float, scale: float) -> str:
    if strength <= 0 or scale <= 0:
        return ""
    frac = min(1.0, strength / scale)
    code = ANSI_RAMP[min(len(ANSI_RAMP) - 1, int(frac * len(ANSI_RAMP)))]
    return f"\x1b[48;5;{code}m\x1b[38;5;16m"


def _safe(text: str) -> str:
    """Control characters (ESC included) as visible ``\\xNN`` escapes; tabs kept."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _coloured_stream(tokens: list[str], strengths: list[float], scale: float, color: bool) -> str:
    out: list[str] = []
    for tok, s in zip(tokens, strengths, strict=True):
        pieces = _safe(tok).split("\n")
        for j, piece in enumerate(pieces):
            shown = piece + (_NEWLINE if j < len(pieces) - 1 else "")
            bg = _ansi_bg(s, scale) if color else ""
            out.append(f"{bg}{shown}{_RESET}" if bg and shown else shown)
            if j < len(pieces) - 1:
                out.append("\n")
    return "".join(out)


def _legend(scale: float) -> str:
    n = len(ANSI_RAMP)
    cells = "".join(
        f"\x1b[48;5;{c}m\x1b[38;5;16m {scale * (k + 1) / n:.2g} {_RESET}"
        for k, c in enumerate(ANSI_RAMP)
    )
    return f"colour scale (strongest activation at the token): {cells}"


def _features_text(pairs: list[tuple[int, float]]) -> str:
    return " ".join(f"f{f}:{a:.2f}" for f, a in pairs) or "-"


def _token_table(res: SAEReadoutResult, prompt_tokens: int) -> list[str]:
    watch = res.features
    head = f"{'pos':>5}  {'p/g':<3}  {'token':<18}  " + "".join(f"{'f' + str(f):>9}" for f in watch)
    lines = [head + ("  " if watch else "") + "top features"]
    for i, pos in enumerate(res.positions):
        tok = repr(res.tokens[i])
        tok = tok if len(tok) <= 18 else tok[:17] + "…"
        where = "p" if pos < prompt_tokens else "g"
        watched = "".join(f"{v:>9.3f}" for v in (res.watched[i] if i < len(res.watched) else []))
        lines.append(
            f"{pos:>5}  {where:<3}  {tok:<18}  {watched}{'  ' if watch else ''}"
            f"{_features_text(res.top_k[i])}"
        )
    return lines


def _summary_table(res: SAEReadoutResult) -> list[str]:
    if not res.features:
        return []
    n = max((s.tokens for s in res.summary.values()), default=0)
    lines = [
        f"watched features over {n} generated token{'s' if n != 1 else ''}:",
        f"{'feature':>9} {'mean':>9} {'max':>9} {'active':>8}",
    ]
    for f in res.features:
        s = res.summary.get(str(f))
        if s is None:
            lines.append(f"{'f' + str(f):>9} {'n/a':>9} {'n/a':>9} {'n/a':>8}")
            continue
        frac = "n/a" if s.active_fraction is None else f"{100 * s.active_fraction:.1f}%"
        lines.append(f"{'f' + str(f):>9} {_fmt(s.mean):>9} {_fmt(s.max):>9} {frac:>8}")
    return lines


def render_terminal(
    readout: SAEReadoutResponse, *, color: bool, completion_tokens: int | None = None
) -> str:
    """The read tokens coloured by strength (ANSI 256-colour backgrounds when ``color``),
    then one table row per token (position, p/g = prompt/generated, token, watched values,
    top features ``f123:4.56``) and the watched features' summary, per SAE."""
    check_aligned(readout)
    blocks: list[str] = []
    for name, res in readout.saes.items():
        strengths = token_strengths(res)
        scale = _scale(strengths)
        lines = [_header(name, res, readout)]
        split = next(
            (i for i, p in enumerate(res.positions) if p >= readout.prompt_tokens),
            len(res.positions),
        )
        for title, lo, hi in (("prompt", 0, split), ("completion", split, len(res.positions))):
            if hi > lo:
                lines.append(f"── {title} " + "─" * 40)
                lines.append(_coloured_stream(res.tokens[lo:hi], strengths[lo:hi], scale, color))
        note = _unread_note(readout, res, completion_tokens)
        if note:
            lines.append(f"({note})")
        if res.missing_positions:
            lines.append(f"(positions not received from the server: {res.missing_positions})")
        if color and scale > 0:
            lines.append(_legend(scale))
        if scale > 0:
            k = strengths.index(scale)
            who = f"f{res.top_k[k][0][0]}" if res.top_k[k] else "a watched feature"
            lines.append(f"strongest: {scale:.3f} ({who} at position {res.positions[k]})")
        lines.append("")
        lines += _token_table(res, readout.prompt_tokens)
        summary = _summary_table(res)
        if summary:
            lines += ["", *summary]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ----------------------------------------------------------------- HTML
def dashboard_links(dashboard: Path, page_dir: Path, features: Iterable[int]) -> dict[int, str]:
    """``feature -> relative href`` for those ``features`` whose dashboard page exists in
    ``dashboard`` (a folder written by ``sae-steer dashboard``), relative to ``page_dir``,
    the folder of the page that links to them."""
    if not dashboard.is_dir():
        raise UsageError(f"--dashboard {dashboard}: no such folder (build it: sae-steer dashboard)")
    if not (dashboard / DASHBOARD_INDEX).is_file():
        raise UsageError(
            f"--dashboard {dashboard}: no {DASHBOARD_INDEX}, not a folder written by "
            "sae-steer dashboard"
        )
    base = page_dir.resolve()
    links = {}
    for f in sorted(set(features)):
        page = dashboard / DASHBOARD_FEATURE_PAGE.format(feature=f)
        if page.is_file():
            rel = Path(os.path.relpath(page.resolve(), base)).as_posix()
            links[f] = quote(rel)
    return links


_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
section.sae{margin-bottom:2em}
.layout{display:flex;gap:1.5em;align-items:flex-start}
.tokens{flex:3;white-space:pre-wrap;font:16px/1.9 ui-monospace,monospace;
  border:1px solid #ddd;padding:.8em;border-radius:6px}
.tokens h3{font:600 13px system-ui,sans-serif;color:#666;margin:.3em 0}
.tok{cursor:pointer;border-radius:3px;padding:1px 0}
.tok.sel{outline:2px solid #1f5fbf}
.panel{flex:2;position:sticky;top:1em;border:1px solid #ddd;border-radius:6px;padding:.8em;
  font-size:14px;min-height:6em}
.panel ol{padding-left:1.4em;margin:.4em 0}
table{border-collapse:collapse;font-size:14px}
td,th{padding:.2em .7em;border-bottom:1px solid #eee;text-align:right}
.note{color:#666;font-size:13px}
"""

_JS = """
(function(){
  function show(tok){
    var sec=tok.closest('section'), panel=sec.querySelector('.panel');
    var d=document.getElementById(tok.dataset.detail);
    if(!d){return;}
    panel.innerHTML=d.innerHTML;
    sec.querySelectorAll('.tok.sel').forEach(function(t){t.classList.remove('sel');});
    tok.classList.add('sel');
  }
  function colour(sec, which){
    var toks=sec.querySelectorAll('.tok'), vals=[], mx=0;
    toks.forEach(function(t){
      var v = which<0 ? parseFloat(t.dataset.a) :
        parseFloat((t.dataset.w||'').split(' ')[which]||'0');
      vals.push(v>0?v:0); if(v>mx){mx=v;}
    });
    toks.forEach(function(t,k){
      t.style.background = mx>0 && vals[k]>0 ?
        'rgba(255,140,0,'+(vals[k]/mx).toFixed(3)+')' : 'transparent';
    });
  }
  document.querySelectorAll('.tok').forEach(function(t){
    t.addEventListener('mouseenter',function(){show(t);});
    t.addEventListener('click',function(){show(t);});
    t.addEventListener('focus',function(){show(t);});
  });
  document.querySelectorAll('section.sae').forEach(function(sec){
    var best=null, mx=-1;
    sec.querySelectorAll('.tok').forEach(function(t){
      var a=parseFloat(t.dataset.a); if(a>mx){mx=a;best=t;}
    });
    if(best){show(best);}
    var sel=sec.querySelector('select.colour-by');
    if(!sel){return;}
    sel.addEventListener('change',function(){colour(sec, parseInt(sel.value,10));});
    var m=/^#f(\\d+)$/.exec(location.hash);
    var opt=m && sel.querySelector('option[data-feature="'+m[1]+'"]');
    if(opt){sel.value=opt.value; colour(sec, parseInt(opt.value,10));}
  });
})();
"""


def _bg(strength: float, scale: float) -> str:
    if strength <= 0 or scale <= 0:
        return ""
    return f"background:rgba(255,140,0,{min(1.0, strength / scale):.3f})"


def _feature_ref(f: int, links: Mapping[int, str]) -> str:
    href = links.get(f)
    if href is None:
        return f'<span class="feature">f{f}</span>'
    return f'<a class="feature" href="{html.escape(href)}">f{f}</a>'


def _detail(
    res: SAEReadoutResult, i: int, prompt_tokens: int, links: Mapping[int, str], did: str
) -> str:
    pos = res.positions[i]
    where = "prompt" if pos < prompt_tokens else "generated"
    tok = html.escape(repr(res.tokens[i]))
    feats = (
        "".join(f"<li>{_feature_ref(f, links)} {a:.3f}</li>" for f, a in res.top_k[i])
        or "<li>no active feature</li>"
    )
    parts = [
        f'<div class="detail" id="{did}" hidden>',
        f"<b>position {pos}</b> ({where}) token <code>{tok}</code> id {res.token_ids[i]}",
        f'<ol class="top">{feats}</ol>',
    ]
    if res.features and i < len(res.watched):
        rows = "".join(
            f"<tr><td>{_feature_ref(f, links)}</td><td>{v:.3f}</td></tr>"
            for f, v in zip(res.features, res.watched[i], strict=True)
        )
        parts.append(
            f'<table class="watched"><tr><th>watched</th><th>value</th></tr>{rows}</table>'
        )
    parts.append("</div>")
    return "".join(parts)


def _token_span(
    res: SAEReadoutResult, i: int, strength: float, scale: float, detail_id: str
) -> str:
    tok = res.tokens[i]
    shown = html.escape(_safe(tok).replace("\n", _NEWLINE + "\n"))
    tops = ", ".join(f"f{f} {a:.2f}" for f, a in res.top_k[i][:3])
    title = html.escape(f"pos {res.positions[i]}: {tops or 'no active feature'}", quote=True)
    watched = " ".join(f"{v:.6g}" for v in (res.watched[i] if i < len(res.watched) else []))
    style = _bg(strength, scale)
    return (
        f'<span class="tok" tabindex="0" data-detail="{detail_id}" data-pos="{res.positions[i]}"'
        f' data-a="{strength:.6g}" data-w="{watched}" title="{title}"'
        + (f' style="{style}"' if style else "")
        + f">{shown}</span>"
    )


def _summary_html(res: SAEReadoutResult, links: Mapping[int, str]) -> str:
    if not res.features:
        return ""
    rows = []
    for f in res.features:
        s = res.summary.get(str(f))
        active = (
            "n/a" if s is None or s.active_fraction is None else f"{100 * s.active_fraction:.1f}%"
        )
        rows.append(
            f'<tr class="summary-row"><td>{_feature_ref(f, links)}</td>'
            f"<td>{_fmt(s.mean if s else None)}</td><td>{_fmt(s.max if s else None)}</td>"
            f"<td>{active}</td><td>{s.tokens if s else 'n/a'}</td></tr>"
        )
    return (
        '<h3>Watched features over the generated tokens</h3><table class="summary">'
        "<tr><th>feature</th><th>mean</th><th>max</th><th>active</th><th>tokens</th></tr>"
        + "".join(rows)
        + "</table>"
    )


def _section(
    k: int, name: str, res: SAEReadoutResult, readout: SAEReadoutResponse, links: Mapping[int, str]
) -> str:
    strengths = token_strengths(res)
    scale = _scale(strengths)
    spans: list[str] = []
    details: list[str] = []
    in_completion = False
    spans.append(
        "<h3>prompt</h3>" if res.positions and res.positions[0] < readout.prompt_tokens else ""
    )
    for i, pos in enumerate(res.positions):
        if pos >= readout.prompt_tokens and not in_completion:
            in_completion = True
            spans.append("<h3>completion</h3>")
        did = f"d-{k}-{i}"
        spans.append(_token_span(res, i, strengths[i], scale, did))
        details.append(_detail(res, i, readout.prompt_tokens, links, did))
    options = "".join(
        f'<option value="{j}" data-feature="{f}">watched f{f}</option>'
        for j, f in enumerate(res.features)
    )
    select = (
        '<label>colour by <select class="colour-by"><option value="-1">strongest feature'
        f"</option>{options}</select></label>"
        if options
        else ""
    )
    missing = (
        f'<p class="note">positions not received from the server: {res.missing_positions}</p>'
        if res.missing_positions
        else ""
    )
    return (
        f'<section class="sae" data-sae="{html.escape(name, quote=True)}">'
        f"<h2>{html.escape(_header(name, res, readout))}</h2>"
        f'<p class="note">Colour: the strongest reported activation at each token, relative '
        f"to the strongest of this readout ({scale:.3f}). Hover or click a token. {select}</p>"
        f"{missing}"
        f'<div class="layout"><div class="tokens">{"".join(spans)}</div>'
        f'<div class="panel"></div></div>'
        f'<div class="details">{"".join(details)}</div>'
        f"{_summary_html(res, links)}</section>"
    )


def render_html(
    readout: SAEReadoutResponse,
    *,
    title: str = "sae-steer inspect",
    links: Mapping[str, Mapping[int, str]] | None = None,
    completion_tokens: int | None = None,
) -> str:
    """A standalone page (inline CSS and JS, no external asset): the read tokens as spans
    shaded by strength; hovering or clicking one shows its top features and watched values
    (the strongest token is shown first). A menu, or ``#f123`` at the end of the page's
    address, colours the tokens by one watched feature instead. ``links``: per SAE name, ``feature -> href`` of its
    dashboard page (:func:`dashboard_links`); other features are plain text."""
    check_aligned(readout)
    links = links or {}
    sections = []
    for k, (name, res) in enumerate(readout.saes.items()):
        sections.append(_section(k, name, res, readout, links.get(name, {})))
        note = _unread_note(readout, res, completion_tokens)
        if note:
            sections.append(f'<p class="note">{html.escape(note)}</p>')
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{''.join(sections)}<script>{_JS}</script></body></html>\n"
    )
