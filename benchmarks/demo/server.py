"""Demo step 4: the background steering server; start it, find it again, stop only our own.

Why a record file: ``sae-steer demo`` leaves the server running when it ends (so a person
can steer it straight away). Re-running the demo should then reuse that server when it
serves the same SAE and statistics, and replace it when it does not. ``server.json`` in
the demo folder holds the process id, port and a fingerprint of what it serves; the demo
only ever stops a process listed there (started by :mod:`benchmarks.server_process` in
its own session, so its process group holds exactly the vLLM engine and workers).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks import server_process
from benchmarks.client import EndpointError, resolve_model
from benchmarks.demo.config import DemoConfig
from benchmarks.demo.state import State, file_digest, say
from sae_steer_vllm.constants import SAELENS_WEIGHTS, SERVER_FILE, SERVER_LOG
from sae_steer_vllm.files import atomic_write_json, json_digest


@dataclass(frozen=True)
class ServerRecord:
    """What ``server.json`` holds about a server the demo started."""

    pid: int
    host: str
    port: int
    key: str
    log: str
    model: str
    sae_name: str
    command: list[str]

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def read_record(folder: Path) -> ServerRecord | None:
    try:
        return ServerRecord(**json.loads((folder / SERVER_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def stop_recorded(folder: Path, timeout: float = 60.0) -> bool:
    """Stop the server listed in ``server.json`` (only that process group). True if one ran."""
    rec = read_record(folder)
    return rec is not None and server_process.stop_process_group(rec.pid, timeout)


def reusable(folder: Path, key: str) -> ServerRecord | None:
    """The recorded server if it is alive, healthy and serves exactly ``key``."""
    rec = read_record(folder)
    if rec is None or rec.key != key or not server_process.pid_alive(rec.pid):
        return None
    return rec if server_process.healthy(rec.root_url) else None


def serve_command(cfg: DemoConfig, sae_dir: Path, model: Path, port: int) -> list[str]:
    """``sae-steer serve`` with the demo's SAE, as the README's users would run it."""
    return [
        sys.executable,
        "-m",
        "sae_steer_vllm.cli",
        "serve",
        "--sae",
        f"{cfg.sae_name}={sae_dir.resolve()}",
        "--model",
        str(model),
        "--served-model-name",
        model.name,
        "--host",
        cfg.host,
        "--port",
        str(port),
        *(["--readout"] if cfg.watch_top else []),
        # the phases of `positions: thinking / answer` (the study's scope arms)
        "--think-start-marker",
        cfg.think_start_marker,
        "--think-end-marker",
        cfg.think_end_marker,
        *cfg.vllm_args,
    ]


def start_server(
    folder: Path, cfg: DemoConfig, *, key: str, sae_dir: Path, model: Path
) -> ServerRecord:
    """Start ``sae-steer serve`` in the background, record it, wait for /health.

    The process outlives the demo on purpose; its output goes to ``server.log``. It is
    recorded before the wait, so an interrupted start-up is still stopped by the next run.
    """
    from tqdm import tqdm

    port = cfg.port
    if not server_process.port_free(cfg.host, port):
        port = server_process.free_port(cfg.host)
    cmd = serve_command(cfg, sae_dir, model, port)
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    log = folder / SERVER_LOG
    srv = server_process.launch(cmd, log, host=cfg.host, port=port, env=env)
    rec = ServerRecord(
        pid=srv.pid,
        host=cfg.host,
        port=port,
        key=key,
        log=str(log.resolve()),
        model=model.name,
        sae_name=cfg.sae_name,
        command=cmd,
    )
    atomic_write_json(folder / SERVER_FILE, asdict(rec))
    bar = tqdm(desc="waiting for /health", unit="s", bar_format="{desc}: {n:.0f}s", leave=True)

    def tick(waited: float) -> None:
        bar.n = waited
        bar.refresh()

    try:
        srv.wait_healthy(cfg.server_timeout, on_wait=tick)
    finally:
        bar.close()
    return rec


def step_server(
    cfg: DemoConfig, root: Path, sae_dir: Path, stats_path: Path, model_path: Path, state: State
) -> tuple[str, str, ServerRecord | None]:
    """(base_url, served model name, the record; None when --base-url names your server)."""
    if cfg.base_url:
        try:
            model = resolve_model(cfg.base_url, None)
        except EndpointError as e:
            raise EndpointError(
                f"{e}; start one with `sae-steer serve --sae {cfg.sae_name}=PATH` "
                "or drop --base-url"
            ) from None
        say(f"using the server at {cfg.base_url} (model {model}, SAE {cfg.sae_name!r})")
        return cfg.base_url, model, None
    key = json_digest(
        {
            "sae": file_digest(sae_dir / SAELENS_WEIGHTS),
            "stats": file_digest(stats_path),
            "model": str(model_path),
            "name": cfg.sae_name,
            "args": cfg.vllm_args,
            **({"readout": True} if cfg.watch_top else {}),
            "think_markers": [cfg.think_start_marker, cfg.think_end_marker],
        }
    )
    rec = reusable(root, key)
    if rec is not None:
        say(f"reusing the running server (pid {rec.pid}) at {rec.base_url}")
        state.mark("server", key, True)
        return rec.base_url, rec.model, rec
    if stop_recorded(root):
        say("stopped the previous demo server (it served another SAE or configuration)")
    state.mark("server", key, False)
    say(f"starting vLLM (about 1-2 minutes on 2 cores); log: {root / SERVER_LOG}")
    rec = start_server(root, cfg, key=key, sae_dir=sae_dir, model=model_path)
    state.mark("server", key, True, pid=rec.pid)
    say(f"server pid {rec.pid} at {rec.base_url}")
    return rec.base_url, rec.model, rec
