"""Demo steps for the paper's interpretation half, each off unless its option is set
(``configs/paper_at_cpu_scale.json`` sets them all):

* ``distill`` (before the SAE): the model the study runs on becomes ``sae-steer distill``'s
  reasoning model, so the SAE, ReasonScore, server and study see a model trained to reason;
* ``explain`` (after the study, while the server runs): ``sae-steer explain`` of the top
  features and as many random ones with the served model as explainer and judge;
* ``steering effects``: ``sae-steer explain --steering`` of the top features;
* ``diff``: ``sae-steer diff`` of the SAE's model against the base model.

Each calls the same library verb as its command with the demo's folders, and each of those
verbs resumes on its own (the distill's cache, the explain log, the diff's per-condition
files), so a re-run of the demo repeats nothing that finished.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.demo.config import DemoConfig, PipelineError
from benchmarks.demo.state import say

STEERING_DIR = "steering_effects"
DIFF_DIR = "model_diff"


def step_distill(cfg: DemoConfig, base: Path) -> Path:
    """The distilled reasoning model (cached by the distill itself), or ``base`` when off."""
    if not cfg.distill:
        return base
    from sae_training.distill import DistillConfig, distill_model

    out = distill_model(DistillConfig.model_validate({"base": base}))
    say(f"reasoning model: {out}")
    return out


@dataclass(frozen=True)
class InterpretOutputs:
    """Where the interpretation steps wrote (None: the step was off)."""

    explain_summary: Path | None = None
    explanations: Path | None = None
    steering_table: Path | None = None
    diff_report: Path | None = None
    diff_plot: Path | None = None


def step_explain(
    cfg: DemoConfig,
    root: Path,
    sae_dir: Path,
    model_path: Path,
    base_url: str,
    model_name: str,
    top: list[int],
    random: list[int],
) -> tuple[Path, Path] | None:
    """(explanations.json, summary.md) for the top and random features, or None when off.

    The explanations go beside the SAE (the log and summary into its ``explain/`` folder),
    where the ranked table and the dashboards find them."""
    if not cfg.explain_top:
        return None
    from benchmarks.interpret.explain_cli import ExplainConfig, run_explain

    features = top[: cfg.explain_top] + random[: cfg.explain_top]
    n = cfg.explain_top
    say(
        f"explaining features {features} with the served model ({n} top by ReasonScore, {n} random)"
    )
    cmd = ExplainConfig.model_validate(
        {
            "sae": sae_dir,
            "features": features,
            "llm_url": base_url,
            "llm_model": model_name,
            "model": str(model_path),
            "max_tokens": cfg.explain_max_tokens,
            "resume": True,
            "seed": cfg.seed,
        }
    )
    return run_explain(cmd)


def step_steering_effects(
    cfg: DemoConfig, root: Path, sae_dir: Path, base_url: str, model_name: str, top: list[int]
) -> Path | None:
    """The steering-effects table of the top features, or None when off."""
    if not cfg.explain_steering:
        return None
    from benchmarks.interpret.explain_cli import ExplainConfig, run_explain

    s = cfg.scope_strength
    cmd = ExplainConfig.model_validate(
        {
            "sae": sae_dir,
            "features": top[: cfg.explain_steering],
            "llm_url": base_url,
            "llm_model": model_name,
            "max_tokens": cfg.explain_max_tokens,
            "out": root / STEERING_DIR,
            "resume": True,
            "seed": cfg.seed,
            "steering": True,
            "steer_sae": cfg.sae_name,
            "strengths": [-s, s],
            # two prompts: the describe prompt shows 3 x 2 outputs of 128 tokens, well
            # inside the demo server's 2,048-token context (4 prompts filled it, and the
            # answer was cut after 23 tokens on the first CPU-scale run)
            "n_steer_prompts": 2,
        }
    )
    result = run_explain(cmd)
    if not result[0].is_file():
        raise PipelineError("the steering-effects step wrote no table")
    return result[0]


def step_diff(
    cfg: DemoConfig, root: Path, sae_dir: Path, model_path: Path, base: Path, stats: Path
) -> tuple[Path, Path | None] | None:
    """(model_diff.md, its plot) of the study's model against the base model, or None."""
    if not cfg.diff:
        return None
    if model_path.resolve() == base.resolve():
        raise PipelineError("--diff compares the distilled model with its base: add --distill")
    from sae_training.diffing import DiffConfig, diff_models

    opts: dict[str, object] = {
        "sae": sae_dir,
        "model_a": str(model_path),
        "model_b": str(base),
        "stats": stats,
        "out": root / DIFF_DIR,
        "seed": cfg.seed,
    }
    if cfg.diff_tokens is not None:
        opts["tokens"] = cfg.diff_tokens
    res = diff_models(DiffConfig.model_validate(opts))
    say("feature classes: " + ", ".join(f"{k} {v}" for k, v in res.counts.items()))
    return res.report_path, res.plot_path
