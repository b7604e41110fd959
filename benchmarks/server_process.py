"""The one way sae-steer starts, waits for and stops a vLLM server process.

Used by ``sae-steer demo`` (its background server), the speed harnesses
(``plugin_speed``) and the test suite's shared ``steer_server`` fixture, so a
start-up failure reads the same everywhere: the server's exit code or the
timeout, and the tail of its log (vLLM's own error is almost always there).

Why a session of its own: ``vllm serve`` forks an engine process and workers.
Started with ``start_new_session`` the server leads a process group that holds
exactly those processes, so :func:`stop_process_group` ends all of them and
nothing else.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from sae_steer_vllm.errors import SaeSteerError

LOG_TAIL_CHARS = 3000


class ServerError(SaeSteerError, RuntimeError):
    """A server could not be started or does not answer; the message quotes its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_free(host: str, port: int) -> bool:
    """Whether ``port`` can be bound on ``host`` (nobody listens there)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def healthy(root_url: str, timeout: float = 2.0) -> bool:
    """``GET {root_url}/health`` answers 200 (vLLM's readiness probe)."""
    try:
        with urllib.request.urlopen(root_url.rstrip("/") + "/health", timeout=timeout) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def log_tail(log: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file ('' when it cannot be read)."""
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as ended where ``/proc`` shows it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.is_file():
        try:
            return stat.read_text().split(") ", 1)[1][:1] != "Z"
        except (OSError, IndexError):
            return True
    return True


def stop_process_group(pid: int, timeout: float = 60.0) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``timeout`` s.

    Only for a process started in its own session (:func:`launch`): its group is
    exactly the server and its children. Returns False when it was not running.
    """
    if not pid_alive(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)  # reap our own child so it does not linger as a zombie
        time.sleep(0.2)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    return True


@dataclass
class ServerProcess:
    """A server started by :func:`launch`: its process, address and log."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def root_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root (``.../v1``)."""
        return self.root_url + "/v1"

    def wait_healthy(
        self, timeout: float = 900.0, on_wait: Callable[[float], None] | None = None
    ) -> None:
        """Block until ``/health`` answers; raise :class:`ServerError` with the log tail if the
        process exits first or ``timeout`` seconds pass (then the process group is stopped).
        ``on_wait(seconds_waited)`` is called about once a second (a progress display)."""
        t0 = time.monotonic()
        while True:
            waited = time.monotonic() - t0
            if self.proc.poll() is not None:
                raise ServerError(
                    f"the server exited with code {self.proc.returncode} during start-up; "
                    f"log {self.log}:\n{log_tail(self.log)}"
                )
            if healthy(self.root_url):
                return
            if waited > timeout:
                self.stop()
                raise ServerError(
                    f"the server did not become healthy in {timeout:.0f}s; "
                    f"log {self.log}:\n{log_tail(self.log)}"
                )
            if on_wait is not None:
                on_wait(waited)
            time.sleep(1.0)

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the whole process group (server, engine, workers) and reap the server."""
        stop_process_group(self.proc.pid, timeout)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)


def launch(
    cmd: Sequence[str],
    log: Path,
    *,
    host: str = "127.0.0.1",
    port: int,
    env: Mapping[str, str] | None = None,
    healthy_within: float | None = None,
) -> ServerProcess:
    """Start ``cmd`` (which must listen on ``host:port``) in its own session, output to ``log``.

    With ``healthy_within`` (seconds), also wait for ``/health``; a server that never gets
    there is stopped and :class:`ServerError` raised with its log tail. Without it, return
    at once (the demo records the process before waiting, see
    :meth:`ServerProcess.wait_healthy`).
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        proc = subprocess.Popen(
            list(cmd),
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    srv = ServerProcess(proc=proc, host=host, port=port, log=log)
    if healthy_within is not None:
        try:
            srv.wait_healthy(healthy_within)
        except BaseException:
            srv.stop()
            raise
    return srv
