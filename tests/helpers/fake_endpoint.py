"""A small scripted OpenAI-compatible server for the eval tests.

It speaks just enough of vLLM's API (``/v1/models``, ``/v1/chat/completions``
with ``usage`` and ``vllm_xargs``) to exercise the client, the retry policy,
steering specs and the log, in milliseconds instead of a model's minutes.

The default "model" answers a problem correctly with a ``<think>`` trace;
steering makes the trace longer (more "Wait") and, above strength 3, wrong. A
spec naming an unknown SAE or a feature >= ``d_sae`` gets HTTP 400 like the
real plugin; a problem containing ``NOBOX`` gets an answer without a box;
``fail_first[problem_prefix] = k`` answers 503 to the first k requests of it.
A spec with a readout gets ``FakeModel.readout`` as ``sae_readout`` (400 when it is None).
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from benchmarks.grading import Grade, GraderKind
from benchmarks.problems import Problem
from benchmarks.server_process import free_port
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

Reply = tuple[int, dict[str, Any]]


def make_problems(n: int, *, nobox: int | None = None) -> list[Problem]:
    """``n`` arithmetic problems; problem ``nobox`` (if given) is answered without a box."""
    out = []
    for i in range(n):
        text = f"P{i}: what is {i} + {i + 1}?"
        if nobox == i:
            text += " NOBOX"
        out.append(Problem(id=f"p{i}", problem=text, answer=str(2 * i + 1)))
    return out


def chat_response(
    model: str, text: str, *, prompt_tokens: int = 5, completion_tokens: int = 7
) -> dict[str, Any]:
    """A minimal ``/v1/chat/completions`` response body carrying ``text``."""
    return {
        "id": "c",
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "code": status}}


@dataclass
class FakeModel:
    """The scripted behaviour; replace ``respond`` for special cases."""

    sae: str = "fake-sae"
    d_sae: int = 1000
    fail_first: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    wrong_above: float = 3.0
    refuse_seed: bool = False  # like our middleware on the CPU backend
    readout: dict[str, Any] | None = None
    """``sae_readout`` payload answered to a request whose spec asks for a readout (of
    ``sae``; any other SAE gets a 400); None: a server started without readout support."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def respond(self, body: dict[str, Any]) -> Reply:
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        m = re.search(r"\bP\d+:", user)
        start = m.start() if m else 0
        key = user[start:].split(":")[0]
        with self._lock:
            left = self.fail_first.get(key, 0)
            if left > 0:
                self.fail_first[key] = left - 1
                return 503, error_body(503, "overloaded, try again")
        if self.refuse_seed and body.get("seed") is not None:
            return 400, error_body(400, "per-request 'seed' is refused on vLLM's CPU backend")
        spec = None
        raw = (body.get("vllm_xargs") or {}).get("steering")
        if raw is not None:
            try:
                spec = SteeringSpec.from_json(raw)
            except ValueError as e:
                return 400, error_body(400, str(e))
        strength = 0.0
        if spec is not None:
            for iv in spec.interventions:
                if not isinstance(iv, FeatureIntervention):
                    continue
                if iv.sae != self.sae:
                    return 400, error_body(400, f"steering: unknown SAE {iv.sae!r}")
                if iv.feature >= self.d_sae:
                    return 400, error_body(
                        400, f"steering: feature {iv.feature} out of range (d_sae={self.d_sae})"
                    )
                strength = max(strength, iv.strength or 0.0)
        if spec is not None and spec.readout is not None:
            if self.readout is None:
                return 400, error_body(
                    400, "steering: readout: this server was started without readout support"
                )
            for k, r in enumerate(spec.readout.saes):
                if r.sae != self.sae:
                    return 400, error_body(
                        400, f"steering: readout.saes.{k}: unknown SAE {r.sae!r}"
                    )
        # "P3: what is 3 + 4?" -> 7
        nums = [int(t.strip("?")) for t in user[start:].split() if t.strip("?").isdigit()]
        answer = sum(nums[-2:])
        if strength > self.wrong_above:
            answer += 1
        waits = " ".join(["Wait, let me check."] * int(1 + 2 * strength))
        final = f"So the total is {answer}." if "NOBOX" in user else f"\\boxed{{{answer}}}"
        text = f"Hmm, add the numbers. {waits}\n</think>\n\n{final}"
        text = text[: 4 * body.get("max_tokens", 10**6)]
        n_tok = len(text.split())
        if self.delay_s:
            time.sleep(self.delay_s)
        extra = {} if spec is None or spec.readout is None else {"sae_readout": self.readout}
        return 200, {
            **extra,
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": len(user.split()),
                "completion_tokens": n_tok,
                "total_tokens": n_tok + len(user.split()),
            },
        }


class FakeServer:
    """Threaded HTTP server on 127.0.0.1:<free port>; ``base_url`` ends in ``/v1``."""

    def __init__(
        self,
        model: FakeModel | None = None,
        *,
        model_name: str = "fake-model",
        respond: Callable[[dict[str, Any]], Reply] | None = None,
    ) -> None:
        self.fake = model or FakeModel()
        self.model_name = model_name
        self._respond = respond or self.fake.respond
        self.requests: list[dict[str, Any]] = []
        self.routes: dict[str, Callable[[dict[str, Any]], Reply]] = {}
        """More POST routes by path (e.g. ``/tokenize``), each answering a JSON body."""
        self.listing: dict[str, Any] | None = None
        """``GET /v1/saes`` answers this (an sae-steer listing) when set; None: 404 (stock vLLM)."""
        self.owned_by: str | None = None
        """``owned_by`` of the listed model (``vllm`` makes it look like a vLLM server)."""
        self.refuse_status: int | None = None
        """Answer every request with this HTTP status (e.g. 401: a key the server refuses)."""
        self.in_flight = 0
        self.token_delay_s = 0.0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if outer.refuse_status is not None:
                    self._send(outer.refuse_status, error_body(outer.refuse_status, "refused"))
                    return
                if self.path.rstrip("/") == "/v1/models":
                    entry = {"id": outer.model_name, "object": "model"}
                    if outer.owned_by is not None:
                        entry["owned_by"] = outer.owned_by
                    self._send(200, {"object": "list", "data": [entry]})
                elif self.path.rstrip("/") == "/v1/saes" and outer.listing is not None:
                    self._send(200, outer.listing)
                else:
                    self._send(404, error_body(404, "not found"))

            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length", 0))
                body = json.loads(self.rfile.read(n))
                if outer.refuse_status is not None:
                    self._send(outer.refuse_status, error_body(outer.refuse_status, "refused"))
                    return
                route = outer.routes.get(self.path.rstrip("/"))
                if route is not None:
                    self._send(*route(body))
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, error_body(404, "not found"))
                    return
                if body.get("model") != outer.model_name:
                    self._send(404, error_body(404, f"model {body.get('model')} does not exist"))
                    return
                with outer._lock:
                    outer.requests.append(body)
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, payload = outer._respond(body)
                finally:
                    with outer._lock:
                        outer.in_flight -= 1
                if status == 200 and body.get("stream"):
                    self._stream(payload, body)
                else:
                    self._send(status, payload)

            def _stream(self, payload: dict[str, Any], body: dict[str, Any]) -> None:
                """Server-sent events, one word a chunk, then a usage chunk (vLLM's shape)."""
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                text = payload["choices"][0]["message"]["content"]
                words = text.split(" ")
                if body.get("ignore_eos"):
                    words = (words * (1 + body["max_tokens"] // max(1, len(words))))[
                        : body["max_tokens"]
                    ]
                base = {"id": "c", "object": "chat.completion.chunk", "created": 0}
                base["model"] = body["model"]
                for w in words:
                    ch = {**base, "choices": [{"index": 0, "delta": {"content": w + " "}}]}
                    self.wfile.write(f"data: {json.dumps(ch)}\n\n".encode())
                    self.wfile.flush()
                    if outer.token_delay_s:
                        time.sleep(outer.token_delay_s)
                usage = {"prompt_tokens": 5, "completion_tokens": len(words), "total_tokens": 5}
                last = {**base, "choices": [], "usage": usage}
                self.wfile.write(f"data: {json.dumps(last)}\n\n".encode())
                if "sae_readout" in payload:  # one final chunk right before [DONE], as served
                    tail = {**base, "choices": [], "sae_readout": payload["sae_readout"]}
                    self.wfile.write(f"data: {json.dumps(tail)}\n\n".encode())
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.port = free_port()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        # bursts of 64 connections; the default backlog of 5 drops some
        self.httpd.socket.listen(128)
        self.httpd.handle_error = lambda request, client_address: None  # type: ignore[method-assign]
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def sleepy_check(extracted: str, gold: str, kind: GraderKind, timeout_s: int) -> Grade:
    """A grading check that never returns: the Grader must kill it (picklable, top level)."""
    time.sleep(3600)
    return Grade(extracted, False, "error")
