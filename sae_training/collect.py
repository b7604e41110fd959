"""``sae-steer collect``: cache resid_post activations of one or more layers to disk.

The cache (safetensors shards + meta.json, :mod:`sae_training.activation_cache`) is what
``sae-steer train --activations`` and the speed benchmark read, so several SAEs
(architectures, widths, seeds) can be trained on identical data without running the
model again.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_training.activation_cache import DEFAULT_SHARD_TOKENS
from sae_training.collection import CacheDtype, CollectConfig, collect_to_disk
from sae_training.corpus import Split, TextMix
from sae_training.lm import ResidReader, load_model, model_or_default

PROG = "sae-steer collect"


class CollectCommand(CommandConfig):
    """Run an HF causal LM over a mix of chat conversations and reasoning traces (rendered
    through the model's chat template, packed into rows of --context-size tokens) and store
    resid_post (the output of decoder layer L) of every non-special token as safetensors
    shards. Memory stays at about one shard.
    """

    model: str | None = None
    """HF model folder (default: the prepared default model)"""
    layers: list[int]
    """decoder layer indices (0-based)"""
    tokens: int
    """number of (non-special) token activations to store"""
    out: Path
    """cache folder to write"""
    context_size: int = CollectConfig.context_size
    """tokens per packed row"""
    prepend_bos: bool = CollectConfig.prepend_bos
    """start every row with BOS; --no-prepend-bos packs plain stream tokens (SAELens
    prepend_bos false, what `sae-steer train --recipe paper-r1` trains on)"""
    batch_rows: int = CollectConfig.batch_rows
    """rows per forward pass"""
    trace_ratio: float = TextMix.trace_ratio
    """fraction of documents from reasoning traces"""
    chat: str = TextMix.chat
    """chat JSONL (name in the shared data dir, or a path)"""
    traces: str = TextMix.traces
    """reasoning-trace JSONL"""
    split: Split = CollectConfig.split
    """document split: train or eval (every 50th document is eval)"""
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    """tokens per shard file"""
    dtype: CacheDtype = CollectConfig.dtype
    """storage dtype"""
    seed: int = TextMix.seed
    """seed of the document mix"""
    progress: bool = True
    """show a progress bar"""


def _run(cmd: CollectCommand) -> int:
    model_path = model_or_default(cmd.model)
    cfg = CollectConfig(
        model=str(model_path),
        layers=tuple(cmd.layers),
        tokens=cmd.tokens,
        context_size=cmd.context_size,
        prepend_bos=cmd.prepend_bos,
        batch_rows=cmd.batch_rows,
        split=cmd.split,
        dtype=cmd.dtype,
        mix=TextMix(chat=cmd.chat, traces=cmd.traces, trace_ratio=cmd.trace_ratio, seed=cmd.seed),
    )
    model, tok = load_model(model_path)
    ResidReader(model, cfg.layers)  # layer range check before touching the data
    t0 = time.perf_counter()
    folder = collect_to_disk(
        cfg, tok, model, cmd.out, shard_tokens=cmd.shard_tokens, progress=cmd.progress
    )
    secs = time.perf_counter() - t0
    print(
        f"{cfg.tokens} tokens x layers {list(cfg.layers)} in {secs:.0f}s "
        f"({cfg.tokens / secs:.0f} tok/s) -> {folder}"
    )
    return 0


def main(argv: list[str]) -> int:
    """``sae-steer collect [options]``: options are the fields of :class:`CollectCommand`."""
    p = argparse.ArgumentParser(
        prog=PROG,
        description=CollectCommand.__doc__,
        epilog="example: sae-steer collect --model ~/.cache/sae-steer/models/SmolLM2-135M-Instruct --layers 18 --tokens 200000 --out runs/acts",
    )
    add_model_options(p, CollectCommand)
    args = p.parse_args(argv)
    return run_command(PROG, lambda: _run(model_from_args(CollectCommand, args)))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
