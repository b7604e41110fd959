"""The one server-process helper (``benchmarks.server_process``) with stand-in servers.

No vLLM here: a few lines of Python play the server, so start-up, the health wait, the
log tail on failure and stopping the whole process group are checked in seconds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from benchmarks.server_process import ServerError, free_port, launch, pid_alive, port_free

HEALTHY = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *a):
        pass
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def test_start_wait_and_stop_the_process_group(tmp_path: Path) -> None:
    port = free_port()
    srv = launch(
        [sys.executable, "-c", HEALTHY, str(port)], tmp_path / "s.log", port=port, healthy_within=60
    )
    assert srv.base_url == f"http://127.0.0.1:{port}/v1"
    assert not port_free("127.0.0.1", port)
    srv.stop()
    assert srv.proc.poll() is not None and not pid_alive(srv.pid)
    assert "listening" in (tmp_path / "s.log").read_text()


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    code = "print('CUDA out of memory', flush=True); raise SystemExit(3)"
    with pytest.raises(ServerError, match=r"exited with code 3(.|\n)*CUDA out of memory"):
        launch(
            [sys.executable, "-c", code], tmp_path / "s.log", port=free_port(), healthy_within=60
        )


def test_a_server_that_never_answers_is_stopped(tmp_path: Path) -> None:
    code = "import os, time; print('loading pid', os.getpid(), flush=True); time.sleep(600)"
    with pytest.raises(ServerError, match=r"did not become healthy in 2s(.|\n)*loading") as e:
        launch([sys.executable, "-c", code], tmp_path / "s.log", port=free_port(), healthy_within=2)
    assert "s.log" in str(e.value)
    pid = int(str(e.value).split("loading pid")[1].split()[0])
    assert not pid_alive(pid)
