"""How the demo's reports write numbers: a value, an estimate with its CI, a paired difference
and its verdict (one owner for the study report and its scope section)."""

from __future__ import annotations

from benchmarks.metrics import CI, Estimate


def fmt_num(x: float, digits: int = 1) -> str:
    return "–" if x != x else f"{x:.{digits}f}"


def fmt_est(e: Estimate, digits: int = 1) -> str:
    return f"{fmt_num(e.mean, digits)} [{fmt_num(e.lo, digits)}, {fmt_num(e.hi, digits)}]"


def fmt_ci(c: CI | None, digits: int = 1) -> str:
    if c is None or c.diff != c.diff:  # NaN: a measure some records could not give
        return "–"
    sign = "+" if c.diff >= 0 else ""
    return f"{sign}{c.diff:.{digits}f} [{c.lo:.{digits}f}, {c.hi:.{digits}f}]"


def verdict(c: CI | None) -> str:
    if c is None or c.diff != c.diff:
        return "not measured"
    if c.lo > 0:
        return "higher (95% CI excludes 0)"
    if c.hi < 0:
        return "lower (95% CI excludes 0)"
    return "no detectable difference (95% CI includes 0)"
