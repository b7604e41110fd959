"""``sae-steer score``: feature statistics, ReasonScore, token-dependence check, ranked table.

The command is :func:`~sae_training.features.score.score_sae` plus a printed summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from sae_steer_vllm.command import CommandConfig, run_model_command
from sae_steer_vllm.constants import TRACE_CORPUS
from sae_steer_vllm.errors import UsageError
from sae_training.corpus import data_file
from sae_training.features.ranked_table import load_ranked_table
from sae_training.features.score import score_sae
from sae_training.recipe import DEFAULT_OUT

PROG = "sae-steer score"


class ScoreCommand(CommandConfig):
    """One streaming pass of the model over reasoning traces: per-feature statistics (max
    activation, density, quantiles, per-group means), ReasonScore (alpha 0.7, window (1, 2),
    decoder norms folded), a token-dependence check of the top features, and a ranked table.
    Writes feature_stats.safetensors (read by the server to turn 'strength' into an
    activation), reasonscore_top.json and .csv.
    """

    sae: Path = DEFAULT_OUT
    """SAE folder, SAELens or sparsify layout"""
    model: str | None = None
    """HF model folder (default: the default model)"""
    corpus: str = TRACE_CORPUS
    """JSONL corpus; a bare name is looked up in the shared data folder"""
    kind: Literal["trace", "chat", "text"] = "trace"
    """trace: problem/reasoning/answer rendered through the chat template; chat: 'messages';
    text: one text column"""
    text_column: str = "text"
    """column for --kind text"""
    max_tokens: int | None = Field(None, gt=0)
    """token budget (default 200000; 2000 with --small)"""
    ctx: int | None = Field(None, gt=0)
    """tokens per window (default 1024; 256 with --small)"""
    batch_size: int = Field(1, gt=0)
    """windows per forward pass"""
    vocab: str | None = None
    """vocabulary JSON (default: the paper's)"""
    top_k: int = Field(100, gt=0)
    """rows in the ranked table"""
    token_check: int = Field(20, ge=0)
    """run the token-dependence check on this many top features, 0 to skip"""
    token_texts: int | None = Field(None, gt=0)
    """non-reasoning texts to inject into (default: 32; 4 with --small)"""
    dashboard_top: int = Field(0, ge=0)
    """also write dashboards for the top K (0: none)"""
    out: Path | None = None
    """output folder (default: the SAE folder)"""
    small: bool = False
    """quick run: 2k tokens, 256-token windows, 4 texts for the token check"""
    device: str = "cpu"
    """torch device"""
    progress: bool = True
    """show progress bars"""


def _run(cmd: ScoreCommand) -> int:
    if not cmd.sae.is_dir():
        raise UsageError(
            f"SAE folder {cmd.sae} not found (train one with `sae-steer train` or pass --sae)"
        )
    if not data_file(cmd.corpus).is_file():
        raise UsageError(f"corpus {cmd.corpus} not found")
    # no_grad as a context, not set_grad_enabled(False): main() is also called in-process
    # (tests) and must not switch autograd off for its caller
    with torch.no_grad():
        res = score_sae(
            cmd.sae,
            cmd.model,
            cmd.corpus,
            small=cmd.small,
            max_tokens=cmd.max_tokens,
            ctx=cmd.ctx,
            kind=cmd.kind,
            text_column=cmd.text_column,
            vocab_path=cmd.vocab,
            top_k=cmd.top_k,
            token_check=cmd.token_check,
            token_texts=cmd.token_texts,
            dashboard_top=cmd.dashboard_top,
            out_dir=cmd.out,
            batch_size=cmd.batch_size,
            device=cmd.device,
            progress=cmd.progress,
        )
    doc = load_ranked_table(res.table_json)
    print(f"statistics : {res.stats}")
    print(f"table      : {res.table_json}  {res.table_csv}")
    if res.dashboard:
        print(f"dashboard  : {res.dashboard}")
    print(f"tokens     : {doc['meta']['n_tokens']}")
    print(
        f"{'rank':>4} {'feature':>8} {'score':>10} {'Hn':>6} {'density':>8} {'inj.ratio':>9}  group"
    )
    for r in doc["features"][:15]:
        ratio = "" if r["injection_ratio"] is None else f"{r['injection_ratio']:.2f}"
        print(
            f"{r['rank']:>4} {r['feature']:>8} {r['reasonscore']:>10.3e} "
            f"{r['entropy_norm']:>6.3f} {r['density']:>8.4f} {ratio:>9}  {r['top_group']}"
        )
    return 0


def main(argv: list[str]) -> int:
    """``sae-steer score [options]``: options are the fields of :class:`ScoreCommand`."""
    return run_model_command(PROG, ScoreCommand, _run, argv)
