"""``sae-steer``: one console script, one subcommand per job.

Subcommands are imported lazily so ``sae-steer --help`` answers instantly and
``sae-steer eval`` never imports torch or vLLM. Each subcommand module exposes
``main(argv: list[str]) -> int`` with its own argparse parser.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": (
        "sae_steer_vllm.default_model",
        "Turn the embedded SmolLM2-135M-Instruct GGUF into an HF safetensors folder.",
    ),
    "serve": (
        "sae_steer_vllm.serve",
        "Start vLLM's OpenAI-compatible server with SAE steering (any vllm serve flag works).",
    ),
    "convert": (
        "sae_steer_vllm.sae.convert",
        "Turn a pickled SAE (.pt/.pth) into the SAELens safetensors layout the server loads.",
    ),
    "collect": (
        "sae_training.collect",
        "Run a model over a chat + reasoning-trace mix and cache resid_post activations.",
    ),
    "train": ("sae_training.train", "Train an SAE (standard / topk / batchtopk) on activations."),
    "vocab": (
        "sae_training.features.vocab_cli",
        "Re-derive a reasoning vocabulary by comparing reasoning and non-reasoning corpora.",
    ),
    "score": (
        "sae_training.features.score_cli",
        "One streaming pass: feature statistics, max activations and ReasonScore.",
    ),
    "dashboard": (
        "sae_training.features.dashboard_cli",
        "Static HTML dashboards for the top features.",
    ),
    "explain": (
        "benchmarks.interpret.explain_cli",
        "Explain features with an LLM and score the explanations (detection, fuzzing); "
        "--steering: what steering each feature does, clustered.",
    ),
    "distill": (
        "sae_training.distill.cli",
        "Fine-tune the default model on R1 reasoning traces: a reasoning model to diff against.",
    ),
    "diff": (
        "sae_training.diffing.cli",
        "Model diffing: which SAE features need the reasoning model, reasoning data, or both.",
    ),
    "eval": (
        "benchmarks.eval",
        "Run AIME / MATH-500 / GSM8K (or any JSONL) against an OpenAI endpoint, with sweeps.",
    ),
    "bench": ("benchmarks.bench_serving", "Measure serving tokens/s for steered/unsteered mixes."),
    "inspect": (
        "benchmarks.inspect_cli",
        "Show which SAE features fire on each token of a prompt and the served model's answer.",
    ),
    "demo": (
        "benchmarks.demo.cli",
        "The whole study on the default model: train, score, serve, measure, report.",
    ),
}


def _usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = [
        "usage: sae-steer COMMAND [options]   (sae-steer COMMAND --help for details)",
        "",
        "Steer a served LLM with sparse-autoencoder features, and find the features to steer with.",
        "",
        "commands:",
    ]
    lines += [f"  {n.ljust(width)}  {h}" for n, (_, h) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"sae-steer: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    rc: int = module.main(rest)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
