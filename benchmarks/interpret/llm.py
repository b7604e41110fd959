"""The LLM that writes and judges explanations: one chat prompt in, one text out.

Built on :mod:`benchmarks.client` (the eval's retry policy: connection errors, timeouts,
429 and 5xx retried with backoff; 401/403/404 stop the run as :class:`EndpointError`,
exit 3), with what interpretation runs add: a concurrency limit (a semaphore) and a hard
budget over the whole run (``max_requests``; a retried request counts once), so a run
against a paid endpoint can never send more than it was allowed; and, on a vLLM server,
answers constrained to the format the caller reads (vLLM's structured outputs: a regex or
a JSON schema), so a small model's answer is always readable - what it says is then the
only thing scored. Other endpoints get the plain prompt (they may refuse the field).
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from benchmarks.client import (
    EndpointError,
    RetryPolicy,
    chat_once,
    check_endpoint,
    make_client,
    served_by_vllm,
)
from sae_steer_vllm.errors import SaeSteerError


class LLMConfig(BaseModel):
    """Where the explainer / judge LLM is and how much of it a run may use."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    """OpenAI-compatible base URL ending in /v1"""
    model: str
    """served model name"""
    api_key: str = Field(default="EMPTY", exclude=True, repr=False)
    """never written to any file (``exclude``) nor shown (``repr``)"""
    concurrency: int = Field(8, gt=0)
    max_requests: int | None = Field(None, ge=0)
    """hard budget over the whole run: requests sent, a retried request counted once"""
    max_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.0, ge=0.0)
    constrain: Literal["auto", "on", "off"] = "auto"
    """constrain each answer to the format that is read (vLLM structured outputs): auto =
    when the endpoint is a vLLM server (its /v1/models says ``owned_by: vllm``)"""


class LLMBudgetExhausted(SaeSteerError):
    """``max_requests`` are spent: the caller stops cleanly and keeps what is done."""


class LLMRequestError(SaeSteerError):
    """One request failed for good (refused with 400, or still failing after the retries)."""


class LLM:
    """An async chat client with a semaphore and a request budget (see the module docstring)."""

    def __init__(self, cfg: LLMConfig, *, retry: RetryPolicy = RetryPolicy()) -> None:
        self.cfg = cfg
        self.retry = retry
        self._client: Any = make_client(cfg.url, api_key=cfg.api_key, timeout_s=600.0)
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._made = 0

    @property
    def requests_made(self) -> int:
        """Requests sent so far (each counted once however often it was retried)."""
        return self._made

    @property
    def budget_left(self) -> int | None:
        if self.cfg.max_requests is None:
            return None
        return max(0, self.cfg.max_requests - self._made)

    @property
    def constrained(self) -> bool:
        """Answers are constrained (``constrain`` is on, or auto was resolved by :meth:`check`)."""
        return self.cfg.constrain == "on"

    async def check(self) -> list[str]:
        """Fail before any work when the endpoint is unreachable, refuses us (401/403) or
        does not serve ``cfg.model`` (:class:`EndpointError`, exit 3); returns the served ids.

        Resolves ``constrain="auto"`` to on or off (``self.cfg`` afterwards says which)."""
        ids = await check_endpoint(self._client, self.cfg.model)
        if self.cfg.constrain == "auto":
            vllm = await served_by_vllm(self._client)
            self.cfg = self.cfg.model_copy(update={"constrain": "on" if vllm else "off"})
        return ids

    async def ask(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        system: str | None = None,
        regex: str | None = None,
        json_schema: dict[str, Any] | None = None,
    ) -> str:
        """The model's answer to one user prompt (temperature from the config).

        ``regex`` / ``json_schema``: the form the caller reads the answer in; sent as vLLM
        structured outputs when :attr:`constrained` (else the prompt alone asks for it).

        Raises :class:`LLMBudgetExhausted` once ``max_requests`` requests were sent,
        :class:`LLMRequestError` when this request cannot be answered, and
        :class:`EndpointError` when the endpoint refuses the run as a whole.
        """
        if self.cfg.max_requests is not None and self._made >= self.cfg.max_requests:
            raise LLMBudgetExhausted(f"the budget of {self.cfg.max_requests} requests is spent")
        self._made += 1  # counted before waiting: every counted request is sent
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        extra: dict[str, Any] | None = None
        if self.constrained and (regex is not None or json_schema is not None):
            form = {"regex": regex} if regex is not None else {"json": json_schema}
            extra = {"structured_outputs": form}
        async with self._sem:
            out = await chat_once(
                self._client,
                self.cfg.model,
                messages,
                temperature=self.cfg.temperature,
                top_p=1.0,
                max_tokens=max_tokens or self.cfg.max_tokens,
                seed=None,
                spec=None,
                extra_body=extra,
                retry=self.retry,
            )
        if out.error is not None:
            if out.connection_failed:
                raise EndpointError(f"{self.cfg.url}: {out.error}")
            raise LLMRequestError(f"{self.cfg.url}: {out.error}")
        if extra is not None and out.finish_reason == "length":
            # a constrained answer stopped by a token limit is unfinished by construction
            raise LLMRequestError(
                f"the answer was cut at the token limit ({max_tokens or self.cfg.max_tokens} "
                "tokens, or the server's context length when the prompt is long): "
                f"{out.text[:120]!r}"
            )
        return out.text

    async def close(self) -> None:
        await self._client.close()
