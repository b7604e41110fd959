"""Put a request's readout into its HTTP response: ``sae_readout`` in the completion JSON, or
one final chunk just before ``data: [DONE]`` when streaming.

Only responses of requests that asked for a readout pass through here; every other
response is forwarded byte for byte. Which tokens were read comes from the response
itself: the middleware asks vLLM for ``return_token_ids`` (and hides them again when the
client did not ask), so the prompt length and the generated ids are exact, and the
expected positions are known: prompt positions ``0..P-1`` and generated positions
``P..P+G-2`` (the last generated token is never read by the model). The response waits
for those (``readout_wait_s`` at most; the worker sends each step's values before that
step's tokens reach the API server, so it rarely waits) and lists any that never came as
``missing_positions``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from .readout_api import RESPONSE_KEY
from .readout_server import PendingReadout, merged

Send = Callable[[dict[str, Any]], Any]
_DONE = b"data: [DONE]"


class TokenTexts:
    """Each token id decoded on its own (cached), with the server's tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            try:
                text = str(self.tokenizer.decode([token_id])) if self.tokenizer else ""
            except Exception:  # noqa: BLE001 - an id the tokenizer cannot show is still reported
                text = ""
            if len(self._cache) < 200_000:
                self._cache[token_id] = text
        return text


class ReadoutTokens:
    """Prompt and generated token ids as the response reports them (one choice)."""

    def __init__(self) -> None:
        self.prompt: list[int] | None = None
        self.generated: list[int] = []

    def take(self, obj: dict[str, Any], *, streaming: bool, keep: bool) -> None:
        """Record the ids of a completion (or a chunk) and hide them unless ``keep``."""
        if isinstance(obj.get("prompt_token_ids"), list):  # chat: top level
            self.prompt = list(obj["prompt_token_ids"])
            if not keep:
                obj["prompt_token_ids"] = None
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            if isinstance(choice.get("prompt_token_ids"), list):  # completions: per choice
                self.prompt = list(choice["prompt_token_ids"])
                if not keep:
                    choice["prompt_token_ids"] = None
            ids = choice.get("token_ids")
            if isinstance(ids, list):
                if streaming:
                    self.generated.extend(ids)
                else:
                    self.generated = list(ids)
                if not keep:
                    choice["token_ids"] = None


def expected_positions(spec_positions: str, n_prompt: int, n_generated: int) -> set[int]:
    out: set[int] = set()
    if spec_positions in ("all", "prompt"):
        out.update(range(n_prompt))
    if spec_positions in ("all", "generated"):
        out.update(range(n_prompt, n_prompt + max(n_generated - 1, 0)))
    return out


def build_readout(
    pending: PendingReadout, tokens: ReadoutTokens, texts: TokenTexts, layers: dict[str, int]
) -> dict[str, Any]:
    """The ``sae_readout`` object (see :class:`~sae_steer_vllm.readout_api.SAEReadoutResponse`)."""
    prompt = tokens.prompt or []
    ids_all = prompt + tokens.generated
    n_prompt = len(prompt)
    expected = expected_positions(pending.spec.positions, n_prompt, len(tokens.generated))
    saes: dict[str, Any] = {}
    for r in pending.spec.saes:
        got = merged(pending, r.sae)
        keep = sorted(p for p in got if p < len(ids_all) and (p in expected or p >= n_prompt))
        if pending.spec.positions == "prompt":
            keep = [p for p in keep if p < n_prompt]
        elif pending.spec.positions == "generated":
            keep = [p for p in keep if p >= n_prompt]
        top_k: list[list[list[float | int]]] = []
        watched: list[list[float]] = []
        gen_rows: list[np.ndarray] = []
        for p in keep:
            ids, vals, w = got[p]
            active = vals > 0
            top_k.append(
                [
                    [int(i), float(v)]
                    for i, v in zip(
                        ids[active], np.round(vals[active].astype(np.float64), 6), strict=True
                    )
                ]
            )
            watched.append(np.round(w.astype(np.float64), 6).tolist())
            if p >= n_prompt:
                gen_rows.append(w)
        saes[r.sae] = {
            "layer": layers.get(r.sae, 0),
            "positions": keep,
            "token_ids": [ids_all[p] for p in keep],
            "tokens": [texts(ids_all[p]) for p in keep],
            "top_k": top_k,
            "features": list(r.features),
            "watched": watched if r.features else [],
            "summary": _summary(r.features, gen_rows),
            "missing_positions": sorted(expected - set(keep)),
        }
    return {
        "object": "sae_readout",
        "positions": pending.spec.positions,
        "prompt_tokens": n_prompt,
        "saes": saes,
    }


def _summary(features: list[int], rows: list[np.ndarray]) -> dict[str, Any]:
    if not features:
        return {}
    if not rows:
        return {
            str(f): {"tokens": 0, "mean": None, "max": None, "active_fraction": None}
            for f in features
        }
    m = np.stack(rows).astype(np.float64)  # [tokens, watched]
    return {
        str(f): {
            "tokens": int(m.shape[0]),
            "mean": round(float(m[:, j].mean()), 6),
            "max": round(float(m[:, j].max()), 6),
            "active_fraction": round(float((m[:, j] > 0).mean()), 6),
        }
        for j, f in enumerate(features)
    }


class ReadoutResponder:
    """Wraps ASGI ``send`` for one readout request: rewrites its JSON or its event stream."""

    def __init__(
        self,
        send: Send,
        pending: PendingReadout,
        *,
        keep_token_ids: bool,
        texts: TokenTexts,
        layers: dict[str, int],
        wait_s: float,
    ) -> None:
        self.send = send
        self.pending = pending
        self.keep = keep_token_ids
        self.texts = texts
        self.layers = layers
        self.wait_s = wait_s
        self.tokens = ReadoutTokens()
        self._start: dict[str, Any] | None = None
        self._streaming = False
        self._passthrough = False
        self._body = bytearray()
        self._meta: dict[str, Any] = {}
        self._emitted = False

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "http.response.start":
            status = int(message.get("status", 200))
            ctype = _header(message, b"content-type") or ""
            self._streaming = ctype.startswith("text/event-stream")
            self._passthrough = status != 200 or not (
                self._streaming or ctype.startswith("application/json")
            )
            if self._passthrough or self._streaming:
                headers = [
                    (k, v) for k, v in message.get("headers", []) if k.lower() != b"content-length"
                ]
                await self.send(dict(message, headers=headers) if self._streaming else message)
            else:
                self._start = message
            return
        if kind != "http.response.body" or self._passthrough:
            await self.send(message)
            return
        self._body += message.get("body", b"")
        more = bool(message.get("more_body", False))
        if self._streaming:
            await self._stream_events(final=not more)
        elif not more:
            await self._send_json()

    # ------------------------------------------------------------ non-streaming
    async def _send_json(self) -> None:
        body = bytes(self._body)
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "choices" in obj:
            self.tokens.take(obj, streaming=False, keep=self.keep)
            obj[RESPONSE_KEY] = await self._readout()
            body = json.dumps(obj, ensure_ascii=False).encode()
        assert self._start is not None
        headers = [
            (k, v) for k, v in self._start.get("headers", []) if k.lower() != b"content-length"
        ]
        headers.append((b"content-length", str(len(body)).encode()))
        await self.send(dict(self._start, headers=headers))
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    # ------------------------------------------------------------ streaming
    async def _stream_events(self, *, final: bool) -> None:
        out = bytearray()
        while True:
            cut = self._body.find(b"\n\n")
            if cut < 0:
                break
            event = bytes(self._body[: cut + 2])
            del self._body[: cut + 2]
            if event.strip() == _DONE and not self._emitted:
                out += await self._readout_event()
            out += self._rewrite_event(event)
        if final:
            if self._body:
                out += bytes(self._body)
                self._body.clear()
            if not self._emitted:
                out += await self._readout_event()
        if out or final:
            await self.send(
                {"type": "http.response.body", "body": bytes(out), "more_body": not final}
            )

    def _rewrite_event(self, event: bytes) -> bytes:
        line = event.strip()
        if not line.startswith(b"data: {"):
            return event
        try:
            obj = json.loads(line[len(b"data: ") :])
        except ValueError:
            return event
        if not isinstance(obj, dict):
            return event
        for key in ("id", "object", "created", "model"):
            if key in obj and key not in self._meta:
                self._meta[key] = obj[key]
        self.tokens.take(obj, streaming=True, keep=self.keep)
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    async def _readout_event(self) -> bytes:
        self._emitted = True
        chunk = dict(self._meta)
        chunk["choices"] = []
        chunk[RESPONSE_KEY] = await self._readout()
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode() + b"\n\n"

    async def _readout(self) -> dict[str, Any]:
        n_prompt = len(self.tokens.prompt or [])
        want = expected_positions(self.pending.spec.positions, n_prompt, len(self.tokens.generated))

        def complete() -> bool:
            if self.pending.dropped:  # lost for good: do not wait for it
                return True
            return all(want <= self.pending.positions(r.sae) for r in self.pending.spec.saes)

        await self.pending.wait_for(complete, self.wait_s)
        return build_readout(self.pending, self.tokens, self.texts, self.layers)


def _header(message: dict[str, Any], name: bytes) -> str | None:
    for k, v in message.get("headers", []):
        if bytes(k).lower() == name:
            return bytes(v).decode("latin-1")
    return None
