"""The start-up self-check refuses an engine that would silently serve requests unsteered."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from sae_steer_vllm.self_check import SelfCheckError, check_steering_live


def _serve(live: bool, vector_layers: list[int]) -> tuple[ThreadingHTTPServer, list[dict]]:
    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a: Any) -> None:
            pass

        def _send(self, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/v1/saes":
                self._send(
                    {
                        "model": {"d_model": 8, "num_layers": 2},
                        "limits": {"vector_layers": vector_layers},
                    }
                )
            else:
                self._send({"data": [{"id": "m"}]})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            shift = 2.0 if (live and "vllm_xargs" in body) else 0.0
            lps = [None] + [{"1": {"logprob": -1.0 - shift}} for _ in range(3)]
            self._send({"choices": [{"text": "x", "prompt_logprobs": lps}]})

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, seen


@pytest.fixture
def fake() -> Iterator[Any]:
    servers: list[ThreadingHTTPServer] = []

    def make(live: bool, vector_layers: list[int] | None = None) -> tuple[str, list[dict]]:
        srv, seen = _serve(live, [0, 1] if vector_layers is None else vector_layers)
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}", seen

    yield make
    for s in servers:
        s.shutdown()


def test_a_live_steering_path_passes(fake: Any) -> None:
    url, seen = fake(live=True)
    assert "passed" in check_steering_live(url, timeout=10)
    steered = json.loads(seen[1]["vllm_xargs"]["steering"])["interventions"][0]
    assert steered["layer"] == 0 and len(steered["vector"]) == 8
    assert "vllm_xargs" not in seen[0]


def test_a_dead_steering_path_is_refused(fake: Any) -> None:
    url, _ = fake(live=False)
    with pytest.raises(SelfCheckError, match="not live"):
        check_steering_live(url, timeout=10)


def test_no_vector_layer_skips_with_a_reason(fake: Any) -> None:
    url, seen = fake(live=False, vector_layers=[])
    assert "skipped" in check_steering_live(url, timeout=10)
    assert not seen


def test_a_port_not_yet_listening_is_waited_for(fake: Any) -> None:
    """uvicorn logs its start-up line before it listens: a refused connection is retried."""
    import socket
    import time

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused, as in vLLM
    port = holder.getsockname()[1]
    started: list[float] = []

    def listen_later() -> None:
        time.sleep(1.5)
        holder.close()
        srv = ThreadingHTTPServer(("127.0.0.1", port), _serve(True, [0])[0].RequestHandlerClass)
        started.append(time.monotonic())
        threading.Thread(target=srv.serve_forever, daemon=True).start()

    threading.Thread(target=listen_later, daemon=True).start()
    t0 = time.monotonic()
    assert "passed" in check_steering_live(f"http://127.0.0.1:{port}", timeout=10)
    assert started and started[0] - t0 > 1.0


def test_a_port_that_never_listens_fails_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from sae_steer_vllm import self_check

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    monkeypatch.setattr(self_check, "LISTEN_WAIT_S", 1.0)
    try:
        with pytest.raises(SelfCheckError, match="/v1/saes failed"):
            check_steering_live(f"http://127.0.0.1:{port}", timeout=5)
    finally:
        holder.close()
