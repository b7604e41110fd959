"""The eval's readout: every request of a sweep also reads chosen SAE features, and the report
shows how each arm moved them ("does clamping the top ReasonScore feature raise the activity
of the other reasoning features while the model generates?").

Three parts, one concept:

* the request: :func:`readout_request` builds what ``sae-steer eval --readout SAE --watch
  F1,F2`` asks of the server (no top-k, the watch list, generated positions only: all the
  table needs, and the smallest answer); :func:`with_readout` merges it into each arm's spec
  (an unsteered arm sends a readout-only spec); :func:`check_readout` refuses, before the
  first request, a server whose ``GET /v1/saes`` says it cannot read it;
* the record: :func:`readout_summaries` keeps only each watched feature's summary over the
  generated tokens (``SampleRecord.readout``), never per-token values;
* the table: :func:`readout_table` (per dataset, arm, SAE and watched feature: the mean over
  problems of the per-sample mean activation and active fraction, each with a bootstrap CI,
  and its paired difference to the unsteered arm) and :func:`readout_markdown`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from pydantic import BaseModel, ValidationError

from benchmarks.metrics import CI, Estimate, bootstrap_mean, fmt, paired_bootstrap
from benchmarks.results import SampleRecord
from benchmarks.sweep import BASELINE, SpecMap
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.readout_api import FeatureSummary, SAEReadoutResponse
from sae_steer_vllm.sae_api import SAEList, check_readout_against
from sae_steer_vllm.spec import ReadoutSpec, SAEReadout, SteeringSpec, SteeringSpecError

__all__ = [
    "READOUT_NOTE",
    "ReadoutRow",
    "check_arms",
    "check_readout",
    "readout_markdown",
    "readout_request",
    "readout_summaries",
    "readout_table",
    "with_readout",
]


# ------------------------------------------------------------------ the request
def readout_request(sae: str, watch: Sequence[int]) -> ReadoutSpec:
    """Watch ``watch`` of ``sae`` at the generated tokens, no top-k (only summaries are kept)."""
    try:
        return ReadoutSpec(
            saes=[SAEReadout(sae=sae, top_k=0, features=list(watch))], positions="generated"
        )
    except ValidationError as e:  # an empty, negative or repeated watch list
        msg = e.errors()[0]["msg"]
        raise UsageError(f"--readout {sae} --watch {','.join(map(str, watch))}: {msg}") from None


def with_readout(spec: SteeringSpec | None, readout: ReadoutSpec | None) -> SteeringSpec | None:
    """The spec one request of this arm sends: the arm's steering plus the sweep's readout."""
    if readout is None:
        return spec
    if spec is None:
        return SteeringSpec(readout=readout)
    return SteeringSpec(interventions=spec.interventions, positions=spec.positions, readout=readout)


def check_arms(specs: SpecMap, readout: ReadoutSpec | None) -> None:
    """A sweep-wide readout and an arm with its own readout cannot both be sent."""
    if readout is None:
        return
    own = [name for name, s in specs.items() if s is not None and s.readout is not None]
    if own:
        raise UsageError(
            f"spec(s) {own} carry their own readout; --readout adds one to every arm: "
            "drop one of the two"
        )


def check_readout(readout: ReadoutSpec, listing: SAEList | None, why: str = "") -> None:
    """Refuse, before the first request, a readout the server's listing says it cannot do.

    ``listing`` None (no ``GET /v1/saes``: stock vLLM or another server) cannot read SAE
    features at all; ``why`` says what the listing request answered.
    """
    if listing is None:
        answer = why.split("; skipping")[0]  # fetch_sae_list's notice, less its fallback
        raise UsageError(
            "--readout needs an sae-steer server started with --readout, and this one has no "
            f"SAE listing{f' ({answer})' if answer else ''}"
        )
    try:
        check_readout_against(readout, listing.by_name(), listing.limits.readout)
    except SteeringSpecError as e:
        raise UsageError(f"the server cannot run this readout: {e}") from None


# ------------------------------------------------------------------ the record
def readout_summaries(resp: SAEReadoutResponse) -> dict[str, dict[str, FeatureSummary]]:
    """SAE -> watched feature -> summary over the generated tokens (what a record keeps)."""
    return {name: dict(res.summary) for name, res in resp.saes.items()}


# ------------------------------------------------------------------ the table
class ReadoutRow(BaseModel):
    """One watched feature under one arm, over that arm's samples."""

    dataset: str
    spec_name: str
    sae: str
    feature: int
    n_samples: int
    """Samples whose summary has at least one generated token read."""
    mean_tokens: float
    """Generated tokens read per sample (the summaries' denominator), averaged."""
    mean_activation: Estimate
    """Per problem: the mean over its samples of the per-sample mean activation; then the
    mean over problems, with a 95% bootstrap CI over problems."""
    active_fraction: Estimate
    """The same for the fraction of generated tokens where the feature is active."""
    mean_vs_baseline: CI | None = None
    """Paired over problems: this arm minus the unsteered arm (None for that arm itself)."""
    active_vs_baseline: CI | None = None


_Group = dict[tuple[str, str, str, int], list[tuple[str, FeatureSummary]]]


def _gather(records: Iterable[SampleRecord]) -> _Group:
    """(dataset, arm, SAE, feature) -> [(problem id, summary)] of the answered samples."""
    out: _Group = {}
    for r in records:
        if not r.ok or not r.readout:
            continue
        for sae, feats in r.readout.items():
            for f, s in feats.items():
                if s.tokens > 0 and s.mean is not None:
                    out.setdefault((r.dataset, r.spec_name, sae, int(f)), []).append(
                        (r.problem_id, s)
                    )
    return out


def _per_problem(rows: list[tuple[str, FeatureSummary]], field: str) -> dict[str, float]:
    by: dict[str, list[float]] = {}
    for pid, s in rows:
        v = getattr(s, field)
        by.setdefault(pid, []).append(float(v) if v is not None else 0.0)
    return {pid: float(np.mean(v)) for pid, v in by.items()}


def readout_table(
    records: Sequence[SampleRecord], *, baseline: str = BASELINE, seed: int = 0
) -> list[ReadoutRow]:
    """Per (dataset, arm, SAE, watched feature): mean activation and active fraction with
    CIs, and the paired difference to ``baseline`` (the unsteered arm) of the same dataset.

    Arms appear in first-seen order (the baseline first), features in the watch list's
    order. Samples with no generated token read (an empty completion) carry no summary
    values and are left out; failed samples too.
    """
    groups = _gather(records)
    arms = dict.fromkeys((r.dataset, r.spec_name) for r in records)
    arm_order = {k: i for i, k in enumerate(arms)}
    ds_order = {ds: i for i, ds in enumerate(dict.fromkeys(ds for ds, _ in arms))}

    def order(k: tuple[str, str, str, int]) -> tuple[object, ...]:
        ds, arm = k[0], k[1]
        return (ds_order[ds], arm != baseline, arm_order[(ds, arm)], k[2])

    out = []
    keys = sorted(groups, key=order)  # stable: each arm's features keep the watch order
    for key in keys:
        ds, arm, sae, f = key
        rows = groups[key]
        act, frac = _per_problem(rows, "mean"), _per_problem(rows, "active_fraction")
        row = ReadoutRow(
            dataset=ds,
            spec_name=arm,
            sae=sae,
            feature=f,
            n_samples=len(rows),
            mean_tokens=float(np.mean([s.tokens for _, s in rows])),
            mean_activation=bootstrap_mean(list(act.values()), seed=seed),
            active_fraction=bootstrap_mean(list(frac.values()), seed=seed),
        )
        base = groups.get((ds, baseline, sae, f))
        if arm != baseline and base is not None:
            row.mean_vs_baseline = paired_bootstrap(act, _per_problem(base, "mean"), seed=seed)
            row.active_vs_baseline = paired_bootstrap(
                frac, _per_problem(base, "active_fraction"), seed=seed
            )
        out.append(row)
    return out


def _est(e: Estimate, digits: int, pct: bool = False) -> str:
    return f"{fmt(e.mean, digits, pct)} [{fmt(e.lo, digits, pct)}, {fmt(e.hi, digits, pct)}]"


def _delta(c: CI | None, digits: int, pct: bool = False) -> str:
    if c is None:
        return "–"
    sign = "+" if c.diff >= 0 else ""
    return f"{sign}{fmt(c.diff, digits, pct)} [{fmt(c.lo, digits, pct)}, {fmt(c.hi, digits, pct)}]"


def readout_markdown(rows: Sequence[ReadoutRow], *, dataset_column: bool = True) -> str:
    """The table: one line per (arm, watched feature); activations with 3 decimals, active
    fractions in percent."""
    head = "| arm | SAE | feature | samples | tokens read | mean activation (95% CI) "
    head += "| Δ mean activation | active % (95% CI) | Δ active (pts) |"
    if dataset_column:
        head = "| dataset " + head
    n_cols = head.count("|") - 1
    lines = [head, "|" + "---|" * n_cols]
    for r in rows:
        cells = [
            r.spec_name,
            r.sae,
            str(r.feature),
            str(r.n_samples),
            fmt(r.mean_tokens, 0),
            _est(r.mean_activation, 3),
            _delta(r.mean_vs_baseline, 3),
            _est(r.active_fraction, 1, True),
            _delta(r.active_vs_baseline, 1, True),
        ]
        if dataset_column:
            cells.insert(0, r.dataset)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


READOUT_NOTE = (
    "Watched features, read by the server during generation (`sae_readout` summaries: the "
    "SAE's encode of resid_post at its layer, before any intervention at that layer, over "
    "the generated tokens read). Per sample: the mean activation and the fraction of tokens "
    "where the feature is active (> 0); per problem: the mean over its samples; the table: "
    "the mean over problems with a 95% percentile bootstrap over problems (2000 resamples). "
    "Δ: paired over problems against the unsteered arm `{baseline}`. A steered feature read "
    "at its own layer shows what the SAE saw, not the clamp target: read a later layer to "
    "see the intervention itself."
)
