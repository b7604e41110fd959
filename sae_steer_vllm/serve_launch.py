"""Running vLLM's API server under ``sae-steer serve``: its output live, its exit code, and
one line that says what to change when it fails to start.

Why a child process and not ``exec``: an exec'd vLLM that fails during start-up leaves the
user with 150 lines of tracebacks from three processes, the root cause somewhere in the
middle. As a child, vLLM's stdout and stderr still reach the terminal unchanged (teed, so a
person sees its progress), while the last few hundred lines stay in a ring buffer; a
non-zero exit before uvicorn's "Application startup complete" is matched against the
known causes (:data:`DIAGNOSES`) and reported as one line, the exit code stays non-zero.

What ``exec`` gave and this keeps: ``sae-steer serve`` still execs, into this module
(:func:`main`, standard library only: the supervisor that lives as long as the server holds
tens of MB, not the 0.5 GB of torch the pre-flight checks loaded), so the pid a caller
recorded is the supervisor's. vLLM stays in its process group, so Ctrl-C at the terminal and
``kill -- -PGID`` (``benchmarks.server_process``) reach every vLLM process as before; a
signal sent to the pid alone is forwarded (:func:`supervise`); the exit code is vLLM's
(128 + N when a signal ended it).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, BinaryIO, TextIO, cast

from .errors import EXIT_USAGE, SaeSteerError

READY_MARKER = "Application startup complete"
"""uvicorn's log line once vLLM serves; failures after it are not start-up failures."""
TAIL_LINES = 400
"""Lines of vLLM output kept for the diagnosis (its tracebacks are ~150 lines)."""
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
HELP_CMD = "python -m vllm.entrypoints.openai.api_server --help"
SUPERVISOR = "sae_steer_vllm.serve_launch"
"""``python -m`` this module: ``[--port N] -- CMD...`` runs CMD under :func:`supervise`."""
PROG = "sae-steer serve"

_PREFIX = re.compile(
    r"^(?:\([^()]*pid=\d+\)\s+)?"  # (EngineCore pid=12) / (VllmWorker-0 pid=13)
    r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d \d\d:\d\d:\d\d\s+\[[^\]]*\]\s?)?"
)
_EXCEPTION = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?(\w*(?:Error|Exception|Exit)|Exception): (.+)$")
_WRAPPERS = (
    "initialization failed",  # EngineCore's / WorkerProc's "see root cause" re-raises
    "See root cause above",
    "See stack trace for root cause",
    "died unexpectedly",
)


class ServeStartError(SaeSteerError, RuntimeError):
    """vLLM did not start: the message is the one-line diagnosis."""


@dataclass(frozen=True)
class Failure:
    """What is known about a start-up that ended: vLLM's output and how it exited."""

    output: str
    returncode: int
    port: int | None = None


Rule = Callable[[re.Match[str], Failure], str]


def _port(f: Failure) -> str:
    return str(f.port) if f.port is not None else "the port"


DIAGNOSES: tuple[tuple[re.Pattern[str], Rule], ...] = (
    (
        re.compile(
            r"Available memory on node (\d+) \(([\d.]+)/([\d.]+) GiB\) on startup is less than "
            r"desired CPU memory utilization \(([\d.]+), ([\d.]+) GiB\)"
        ),
        lambda m, f: (
            f"vLLM's CPU backend wants {m[4]} of NUMA node {m[1]}'s memory ({m[5]} GiB) free at "
            f"start-up but only {m[2]} of {m[3]} GiB is: drop --gpu-memory-utilization so "
            "sae-steer serve sizes the KV cache itself (--cpu-kv-cache-gib auto), or free memory"
        ),
    ),
    (
        re.compile(
            r"Available memory on node (\d+) \(([\d.]+)/([\d.]+) GiB\) on kv cache allocation is "
            r"less than requested memory for kv \(([\d.]+)"
        ),
        lambda m, f: (
            f"the KV cache ({m[4]} GiB) does not fit: only {m[2]} of {m[3]} GiB of NUMA node "
            f"{m[1]} was available once the model had loaded; give a smaller --cpu-kv-cache-gib "
            "(or 'auto', without VLLM_CPU_KVCACHE_SPACE), or free memory"
        ),
    ),
    (
        re.compile(
            r"max seq len \((\d+)\), \(([\d.]+) GiB KV cache is needed, which is larger than the "
            r"available KV cache memory \(([\d.]+) GiB\)"
        ),
        lambda m, f: (
            f"a {m[3]} GiB KV cache cannot hold one request of {m[1]} tokens ({m[2]} GiB): "
            "lower --max-model-len or raise --cpu-kv-cache-gib"
        ),
    ),
    (
        re.compile(r"No available memory for the cache blocks"),
        lambda m, f: (
            "no memory was left for the KV cache after loading the model: give "
            "--cpu-kv-cache-gib N (on a GPU: raise --gpu-memory-utilization), or free memory"
        ),
    ),
    (
        re.compile(r"[Aa]ddress already in use"),
        lambda m, f: f"port {_port(f)} is already in use: stop what listens there or pass --port N",
    ),
    (
        re.compile(r"User-specified max_model_len \((\d+)\) is greater than the derived.*?(\d+)"),
        lambda m, f: f"--max-model-len {m[1]} is longer than the model allows ({m[2]}): lower it",
    ),
    (
        re.compile(r"^[\w.\-]+: error: (.+)$", re.M),
        lambda m, f: f"vLLM rejected a flag: {m[1]} (all flags: {HELP_CMD})",
    ),
)


def _clean(line: str) -> str:
    return _PREFIX.sub("", line.rstrip("\r\n"), count=1).strip()


def root_exception(output: str) -> str | None:
    """The first exception line that is not a "see the root cause above" wrapper: with
    chained tracebacks and several processes, the first one printed is the cause."""
    for raw in output.splitlines():
        m = _EXCEPTION.match(_clean(raw))
        if m and not any(w in m[2] for w in _WRAPPERS):
            return f"{m[1]}: {m[2]}"
    return None


def diagnose(failure: Failure, limit: int = 400) -> str:
    """One line: what went wrong during vLLM's start-up and what to change."""
    text = "\n".join(_clean(line) for line in failure.output.splitlines())
    for pattern, rule in DIAGNOSES:
        m = pattern.search(text)
        if m:
            return rule(m, failure)
    rc = failure.returncode
    cause = root_exception(failure.output)
    if rc == -signal.SIGKILL or (cause is None and "died unexpectedly" in text):
        return (
            "a vLLM process was killed while starting, most likely by the kernel's out-of-memory "
            "killer: give a smaller --cpu-kv-cache-gib or --max-num-seqs, or free memory"
        )
    how = f"code {rc}" if rc >= 0 else f"signal {-rc}"
    if cause is None:
        return f"vLLM exited with {how} while starting (its output is above)"
    if len(cause) > limit:
        cause = cause[: limit - 3] + "..."
    return f"vLLM failed to start ({how}): {cause} (its output is above)"


def check_port(host: str | None, port: int) -> None:
    """Refuse in a second, not after vLLM's imports, when ``host:port`` cannot be bound
    (the same bind vLLM makes: ``SO_REUSEADDR``, all interfaces when no host is given)."""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host or "", port))
        except OSError as e:
            where = f"{host}:{port}" if host else f"port {port}"
            if e.errno == errno.EADDRINUSE:
                raise ServeStartError(
                    f"{where} is already in use: stop what listens there or pass --port N"
                ) from None
            raise ServeStartError(f"cannot listen on {where}: {e.strerror}") from None


class _Tee:
    """Copies one stream of the child to ours and keeps its last lines."""

    def __init__(self, src: IO[bytes], dst: BinaryIO, tail: deque[str], ready: threading.Event):
        self.src, self.dst, self.tail, self.ready = src, dst, tail, ready
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        partial = b""
        fd = self.src.fileno()
        while chunk := os.read(fd, 65536):
            try:
                self.dst.write(chunk)
                self.dst.flush()
            except (OSError, ValueError):
                pass  # our terminal went away; keep draining so vLLM never blocks on a pipe
            lines = (partial + chunk).split(b"\n")
            partial = lines.pop()
            for line in lines:
                text = line.decode(errors="replace")
                self.tail.append(text)
                if READY_MARKER in text:
                    self.ready.set()
        if partial:
            self.tail.append(partial.decode(errors="replace"))


class _TextSink:
    """A text stream (e.g. one a test harness replaced) seen as a binary one."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, data: bytes) -> int:
        return self.stream.write(data.decode(errors="replace"))

    def flush(self) -> None:
        self.stream.flush()


def _binary(stream: TextIO) -> BinaryIO:
    buf = getattr(stream, "buffer", None)
    return buf if buf is not None else cast(BinaryIO, _TextSink(stream))


def supervise(
    cmd: Sequence[str],
    env: Mapping[str, str],
    *,
    port: int | None = None,
    self_check: bool = False,
    stdout: BinaryIO | None = None,
    stderr: BinaryIO | None = None,
) -> int:
    """Run vLLM; return its exit code, or raise :class:`ServeStartError` with one line when
    it ends with an error before it served (not when we forwarded a signal that ended it).

    Signals: Ctrl-C at a terminal already reaches vLLM (same process group), so SIGINT is
    forwarded only when we are not the terminal's foreground group; SIGTERM, SIGHUP and
    SIGQUIT sent to our pid are forwarded (vLLM's handlers ignore a repeat once it shuts
    down, so the same signal also arriving by ``killpg`` is harmless).
    """
    out = stdout if stdout is not None else _binary(sys.stdout)
    err = stderr if stderr is not None else _binary(sys.stderr)
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    ready = threading.Event()
    stopped_by: list[int] = []
    child: list[subprocess.Popen[bytes]] = []
    check_failed: list[str] = []

    def forward(signum: int, _frame: object) -> None:
        stopped_by.append(signum)
        if signum == signal.SIGINT and _terminal_sent_it():
            return
        if child and child[0].returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child[0].pid, signum)

    # Handlers first: a signal that arrives while vLLM starts must not kill us without it.
    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        proc = subprocess.Popen(
            list(cmd), env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        child.append(proc)
        if stopped_by:
            proc.send_signal(stopped_by[-1])
        assert proc.stdout is not None and proc.stderr is not None
        tees = [_Tee(proc.stdout, out, tail, ready), _Tee(proc.stderr, err, tail, ready)]
        if self_check and port is not None:
            threading.Thread(
                target=_self_check, args=(proc, ready, port, cmd, err, check_failed), daemon=True
            ).start()
        rc = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    for t in tees:
        t.thread.join(timeout=10)
    if check_failed:
        raise ServeStartError(check_failed[0])
    if rc == 0 or ready.is_set() or stopped_by:
        return rc if rc >= 0 else 128 - rc
    raise ServeStartError(diagnose(Failure("\n".join(tail), rc, port)))


def _self_check(
    proc: subprocess.Popen[bytes],
    ready: threading.Event,
    port: int,
    cmd: Sequence[str],
    err: BinaryIO,
    failed: list[str],
) -> None:
    """Once vLLM serves, prove steering is live (:mod:`.self_check`); if not, say so in one
    line and stop vLLM, so a server that would silently ignore steering never stays up."""
    from .self_check import SelfCheckError, check_steering_live

    while not ready.wait(1.0):
        if proc.poll() is not None:
            return
    args = list(cmd)
    api_key = args[args.index("--api-key") + 1] if "--api-key" in args[:-1] else None
    api_key = api_key or os.environ.get("VLLM_API_KEY")
    try:
        line = check_steering_live(f"http://127.0.0.1:{port}", api_key=api_key)
    except SelfCheckError as e:
        failed.append(f"start-up self-check failed: {e}")
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        return
    err.write(f"{PROG}: {line}\n".encode())
    err.flush()


def _terminal_sent_it() -> bool:
    """Whether our process group is the terminal's foreground group (then a SIGINT came from
    Ctrl-C, which the terminal delivered to vLLM as well)."""
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: list[str]) -> int:
    """``python -m sae_steer_vllm.serve_launch [--port N] -- CMD...``: what ``sae-steer serve``
    execs into once its checks are done, so the long-lived supervisor holds only the standard
    library (tens of MB), not the torch and transformers the checks loaded. The environment
    is vLLM's, passed through."""
    port: int | None = None
    self_check = False
    if argv[:1] == ["--self-check"]:
        self_check, argv = True, argv[1:]
    if argv[:1] == ["--port"]:
        port, argv = int(argv[1]), argv[2:]
    if argv[:1] != ["--"] or len(argv) < 2:
        print(f"usage: python -m {SUPERVISOR} [--self-check] [--port N] -- CMD...", file=sys.stderr)
        return EXIT_USAGE
    try:
        return supervise(argv[1:], os.environ, port=port, self_check=self_check)
    except SaeSteerError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
