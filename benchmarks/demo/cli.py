"""``sae-steer demo``: the parser (derived from :class:`DemoConfig`) and ``main``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.demo.config import DemoConfig, load_config
from benchmarks.options import add_option_groups, command_parser
from sae_steer_vllm.command import run_command

PROG = "sae-steer demo"

DESCRIPTION = (
    "The whole study on the default model: prepare it, train an SAE on its residual "
    "stream, rank features with ReasonScore, start a steering server with that SAE, "
    "steer GSM8K problems with the top features and with random features, and write a "
    "report with plots. Steps already done are reused (keyed on their configuration); "
    "the server keeps running at the end. About 45 minutes on 2 CPU cores from scratch."
)

EXAMPLES = (
    "examples:\n"
    "  sae-steer demo                                   # everything into runs/demo/\n"
    "  sae-steer demo --config configs/demo_tiny.json --out /tmp/tiny   # a 2-minute wiring check\n"
    "  sae-steer demo --base-url http://127.0.0.1:8000/v1 --sae-name demo   # your server\n"
    "Options given on the command line override --config."
)


GROUPS = {
    "output and model": ("out", "model"),
    "SAE training": (
        "collect_tokens",
        "train_tokens",
        "d_sae",
        "reuse_sae_from",
        "reuse_activations_from",
    ),
    "ReasonScore": ("score_tokens", "score_ctx", "token_check", "token_texts", "dashboard_top"),
    "study": (
        "dataset",
        "n_prompts",
        "n_features",
        "strengths",
        "mode",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "concurrency",
        "watch_top",
        "scope_arms",
        "scope_strength",
    ),
    "interpretation": (
        "distill",
        "diff",
        "diff_tokens",
        "explain_top",
        "explain_steering",
        "explain_max_tokens",
    ),
    "server": (
        "base_url",
        "sae_name",
        "host",
        "port",
        "vllm_args",
        "server_timeout",
        "think_start_marker",
        "think_end_marker",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(PROG, DESCRIPTION, EXAMPLES)
    p.add_argument("--config", type=Path, help="JSON file with any of the options below")
    add_option_groups(p, DemoConfig, GROUPS)
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k in DemoConfig.model_fields}

    def body() -> int:
        from benchmarks.demo.run import run_demo

        cfg = load_config(args.config, overrides)
        try:
            run_demo(cfg)
        except KeyboardInterrupt:
            print(
                f"\n{PROG}: interrupted; run the same command again to continue where it stopped",
                file=sys.stderr,
            )
            raise
        return 0

    return run_command(PROG, body)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
