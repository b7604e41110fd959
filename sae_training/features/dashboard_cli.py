"""``sae-steer dashboard``: static HTML pages for the top features, from the statistics file.

The command is :func:`~sae_training.features.dashboard.build_dashboard`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from sae_steer_vllm.command import CommandConfig, run_model_command
from sae_steer_vllm.constants import DASHBOARD_DIR, STATS_FILE
from sae_steer_vllm.errors import UsageError
from sae_steer_vllm.sae.hub import HF_PREFIX, resolve_sae_location
from sae_training.features.dashboard import build_dashboard
from sae_training.recipe import DEFAULT_OUT

PROG = "sae-steer dashboard"


class DashboardCommand(CommandConfig):
    """Static HTML dashboards for the top features by ReasonScore: top activating contexts with
    per-token shading, activation histogram, logit lens, density, ReasonScore and its parts;
    index.html sorted by score; explanations and their scores when `sae-steer explain` wrote
    them. Needs the statistics written by `sae-steer score`; runs no model forward.
    """

    sae: Path = DEFAULT_OUT
    """SAE folder holding feature_stats.safetensors, or Hub address
    hf:owner/repo[/subfolder][@revision] (then --out is required)"""
    stats: Path | None = None
    """statistics file (default: <sae>/feature_stats.safetensors)"""
    model: str | None = None
    """HF model folder (default: from the statistics)"""
    top_k: int = Field(30, gt=0)
    """number of feature pages"""
    out: Path | None = None
    """output folder (default: <sae>/dashboard)"""
    explanations: Path | None = None
    """explanations.json written by `sae-steer explain`, shown with their scores on the pages
    (default: the one in the SAE folder or beside the statistics, when there is one)"""


def _run(cmd: DashboardCommand) -> int:
    sae = cmd.sae
    if str(sae).startswith(HF_PREFIX):  # the one resolver the server uses; cache stays read-only
        if cmd.out is None:
            raise UsageError(f"--sae {sae}: pass --out (pages are not written into the Hub cache)")
        sae = resolve_sae_location(str(sae))
    stats = cmd.stats or sae / STATS_FILE
    if cmd.explanations is not None and not cmd.explanations.exists():
        raise UsageError(f"--explanations {cmd.explanations} not found (run `sae-steer explain`)")
    if not stats.is_file():
        raise UsageError(f"{stats} not found (run `sae-steer score --sae {cmd.sae}`)")
    index = build_dashboard(
        stats,
        cmd.out or sae / DASHBOARD_DIR,
        top_k=cmd.top_k,
        model_path=cmd.model,
        sae_path=sae,
        progress=True,
        explanations=cmd.explanations,
    )
    print(f"wrote {index}")
    return 0


def main(argv: list[str]) -> int:
    """``sae-steer dashboard [options]``: options are the fields of :class:`DashboardCommand`."""
    return run_model_command(PROG, DashboardCommand, _run, argv)
