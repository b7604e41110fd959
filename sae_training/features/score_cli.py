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
from sae_steer_vllm.sae.hub import HF_PREFIX, resolve_sae_location
from sae_training.corpus import data_file
from sae_training.features.ranked_table import load_ranked_table
from sae_training.features.score import DEFAULT_CTX, SMALL_CTX, score_sae
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
    """SAE folder (SAELens, sparsify or lm-saes layout) or Hub address
    hf:owner/repo[/subfolder][@revision] (then --out is required)"""
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
    top_k: int | None = Field(None, gt=0)
    """rows in the ranked table (default 100; not with --quantile)"""
    quantile: float | None = Field(None, gt=0.0, lt=1.0)
    """instead of --top-k: every feature whose ReasonScore is above this quantile of all
    features' scores (the paper's candidate selection: 0.997)"""
    burn_in: int | None = Field(None, ge=0)
    """tokens of left context every counted position has (default 16, at most a quarter of
    --ctx): consecutive windows overlap by this much and a window's first burn-in positions
    are run but not counted (window-start tokens have no left context and would dominate
    the maxima)"""
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
    sae = _local_sae(cmd.sae, cmd.out)
    if not sae.is_dir():
        raise UsageError(
            f"SAE folder {cmd.sae} not found (train one with `sae-steer train` or pass --sae)"
        )
    if not data_file(cmd.corpus).is_file():
        raise UsageError(f"corpus {cmd.corpus} not found")
    if cmd.top_k is not None and cmd.quantile is not None:
        raise UsageError("give --top-k or --quantile, not both")
    ctx = cmd.ctx or (SMALL_CTX if cmd.small else DEFAULT_CTX)
    if cmd.burn_in is not None and cmd.burn_in > ctx // 2:
        raise UsageError(f"--burn-in {cmd.burn_in} is more than half of the {ctx}-token window")
    # no_grad as a context, not set_grad_enabled(False): main() is also called in-process
    # (tests) and must not switch autograd off for its caller
    with torch.no_grad():
        res = score_sae(
            sae,
            cmd.model,
            cmd.corpus,
            small=cmd.small,
            max_tokens=cmd.max_tokens,
            ctx=cmd.ctx,
            kind=cmd.kind,
            text_column=cmd.text_column,
            vocab_path=cmd.vocab,
            top_k=cmd.top_k or 100,
            quantile=cmd.quantile,
            burn_in=cmd.burn_in,
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
    print(f"tokens     : {doc['meta']['n_tokens']}  (burn-in {doc['meta'].get('burn_in')})")
    print(f"selection  : {doc['meta']['selection']}, {len(doc['features'])} features")
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


def _local_sae(sae: Path, out: Path | None) -> Path:
    """``--sae`` as a local folder: Hub addresses resolve through the one resolver the
    server uses; their cache folder is never written to, so they need ``--out``."""
    if not str(sae).startswith(HF_PREFIX):
        return sae
    if out is None:
        raise UsageError(f"--sae {sae}: pass --out (results are not written into the Hub cache)")
    return resolve_sae_location(str(sae))


def main(argv: list[str]) -> int:
    """``sae-steer score [options]``: options are the fields of :class:`ScoreCommand`."""
    return run_model_command(PROG, ScoreCommand, _run, argv)
