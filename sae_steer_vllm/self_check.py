"""Start-up self-check: one unsteered and one steered forward, whose difference proves the
steering path is live in the served engine.

Why: every failure mode of a plugin that hooks a serving engine (a runner that never calls our
hooks, tables never filled, a vLLM version whose interface moved) looks the same from outside:
requests succeed and are silently unsteered. Two one-token requests right after start-up turn
that into a refusal to serve. The steered request adds a large raw vector at the first layer
that takes vectors, so the check needs no SAE and works for any registered set.

Standard library only: it runs in the lean supervisor (:mod:`.serve_launch`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Any

from .errors import SaeSteerError

PROMPT = "The quick brown fox jumps over the lazy dog because"
SCALE = 64.0
LISTEN_WAIT_S = 60.0
"""How long a refused connection is retried: uvicorn logs "Application startup complete"
(the supervisor's cue) before it calls ``listen()`` on the socket vLLM bound early, so on a
loaded machine the first request can arrive while the port refuses connections."""


class SelfCheckError(SaeSteerError, RuntimeError):
    """The served engine does not apply steering; the message says what was seen."""


def _call(
    root_url: str, path: str, body: dict[str, Any] | None, api_key: str | None, timeout: float
) -> Any:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(root_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:
        detail = e.read().decode(errors="replace")[:300]
        raise SelfCheckError(f"{path} answered HTTP {e.code}: {detail}") from None
    except (OSError, ValueError) as e:
        refused = isinstance(getattr(e, "reason", e), ConnectionRefusedError)
        raise SelfCheckError(f"{path} failed: {e}") from (
            ConnectionRefusedError() if refused else None
        )


def _prompt_logprobs(choice: dict[str, Any]) -> list[float]:
    out: list[float] = []
    for entry in choice.get("prompt_logprobs") or []:
        if entry:
            out.extend(float(v["logprob"]) for v in entry.values())
    return out


def check_steering_live(
    root_url: str, *, api_key: str | None = None, timeout: float = 300.0
) -> str:
    """Raise :class:`SelfCheckError` unless a steered forward differs from an unsteered one;
    return a one-line description of what was checked."""
    deadline = time.monotonic() + LISTEN_WAIT_S
    while True:
        try:
            saes = _call(root_url, "/v1/saes", None, api_key, timeout)
            break
        except SelfCheckError as e:
            if not isinstance(e.__cause__, ConnectionRefusedError) or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    layers = saes.get("limits", {}).get("vector_layers") or []
    if not layers:
        return "self-check skipped: no layer takes raw vectors (vector_layers is empty)"
    layer, d_model = int(layers[0]), int(saes["model"]["d_model"])
    model = _call(root_url, "/v1/models", None, api_key, timeout)["data"][0]["id"]
    body: dict[str, Any] = {
        "model": model,
        "prompt": PROMPT,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
    }
    plain = _call(root_url, "/v1/completions", body, api_key, timeout)["choices"][0]
    vector = [1.0 if i % 2 == 0 else -1.0 for i in range(d_model)]
    spec = {"interventions": [{"layer": layer, "vector": vector, "scale": SCALE}]}
    body["vllm_xargs"] = {"steering": json.dumps(spec)}
    steered = _call(root_url, "/v1/completions", body, api_key, timeout)["choices"][0]
    a, b = _prompt_logprobs(plain), _prompt_logprobs(steered)
    if not a or len(a) != len(b):
        raise SelfCheckError("the server returned no prompt logprobs to compare")
    shift = max(abs(x - y) for x, y in zip(a, b, strict=True))
    if shift < 1e-3:
        raise SelfCheckError(
            f"a steered request gave the same logprobs as an unsteered one (max shift {shift:.1e}): "
            "the steering path is not live in this engine, so requests would be served "
            "unsteered. Report the vLLM version and model runner; --no-self-check skips this"
        )
    return f"self-check passed: a vector at layer {layer} moved prompt logprobs by {shift:.2f}"
