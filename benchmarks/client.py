"""One chat request against an OpenAI-compatible endpoint, with the retry policy.

Uses the stock ``openai`` ``AsyncOpenAI`` client (its own retries off) so the
policy is explicit and logged: connection errors, timeouts, 429 and 5xx are
retried with exponential backoff and jitter; 400/422 mean the request (in
practice: the steering spec) is wrong and are never retried; 401/403/404 mean
the endpoint or model name is wrong and stop the run.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sae_steer_vllm.errors import EXIT_UNREACHABLE, SaeSteerError, UsageError
from sae_steer_vllm.readout_api import SAEReadoutResponse, readout_from_response
from sae_steer_vllm.sae_api import SAES_PATH, SAEList, check_spec_against
from sae_steer_vllm.spec import SteeringSpec, SteeringSpecError, steering_extra_body

ErrorKind = Literal["spec_rejected", "transient", "bad_response"]


class EndpointError(SaeSteerError, RuntimeError):
    """The endpoint cannot serve this run at all (unreachable, wrong model, auth)."""

    exit_code = EXIT_UNREACHABLE


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 30.0

    def delay(self, attempt: int) -> float:
        """Backoff before attempt ``attempt + 1`` (attempt counts from 1), with +-25% jitter."""
        d = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        return d * random.uniform(0.75, 1.25)


# ---------------------------------------------------- response validation
class _Usage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    content: str | None = None
    reasoning_content: str | None = None  # vLLM with --reasoning-parser (older name)
    reasoning: str | None = None  # vLLM with --reasoning-parser (newer name)


class _Choice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    message: _Message
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # vLLM with return_token_ids: the completion's ids


class _ChatResponse(BaseModel):
    model_config = ConfigDict(extra="ignore")
    choices: list[_Choice] = Field(min_length=1)
    usage: _Usage | None = None


@dataclass
class ChatOutcome:
    """What one request produced: text and token counts, or an error."""

    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_estimated: bool = False
    token_ids: list[int] | None = None
    latency_s: float = 0.0
    attempts: int = 0
    error: str | None = None
    error_kind: ErrorKind | None = None
    connection_failed: bool = False
    readout: SAEReadoutResponse | None = None
    """The response's ``sae_readout`` (a spec with ``readout``), parsed; None without one."""


def make_client(base_url: str, *, api_key: str = "EMPTY", timeout_s: float = 3600.0) -> Any:
    """``AsyncOpenAI`` with retries disabled (we retry ourselves)."""
    return openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)


def merge_extra_body(spec: SteeringSpec | None, extra: dict[str, Any] | None) -> dict[str, Any]:
    """The steering ``extra_body`` merged with user extras (``vllm_xargs`` dicts are merged)."""
    body: dict[str, Any] = dict(extra or {})
    steer = steering_extra_body(spec)
    if "vllm_xargs" in steer:
        xargs = dict(body.get("vllm_xargs") or {})
        xargs.update(steer["vllm_xargs"])
        body["vllm_xargs"] = xargs
    return body


def _parse(resp: Any) -> ChatOutcome:
    raw = resp.model_dump() if hasattr(resp, "model_dump") else resp
    try:
        r = _ChatResponse.model_validate(raw)
    except ValidationError as e:
        return ChatOutcome(
            error=f"malformed response: {e.errors()[0]['msg']}", error_kind="bad_response"
        )
    try:
        readout = readout_from_response(raw)
    except ValidationError as e:
        return ChatOutcome(
            error=f"malformed sae_readout: {e.errors()[0]['msg']}", error_kind="bad_response"
        )
    ch = r.choices[0]
    content = ch.message.content or ""
    reasoning = ch.message.reasoning_content or ch.message.reasoning
    # a server-side reasoning parser splits the trace off: put it back in front
    text = f"{reasoning}\n</think>\n\n{content}" if reasoning else content
    out = ChatOutcome(text=text, finish_reason=ch.finish_reason, token_ids=ch.token_ids)
    out.readout = readout
    if r.usage is not None and r.usage.completion_tokens is not None:
        out.completion_tokens = r.usage.completion_tokens
        out.prompt_tokens = r.usage.prompt_tokens
    else:  # no usage block: estimate (~4 characters a token) and say so in the log
        out.completion_tokens = max(1, len(text) // 4) if text else 0
        out.tokens_estimated = True
    return out


def status_message(e: openai.APIStatusError) -> str:
    body = e.body
    msg: Any = None
    if isinstance(body, dict):
        msg = body.get("message")
        if msg is None and isinstance(body.get("error"), dict):
            msg = body["error"].get("message")
    return f"HTTP {e.status_code}: {msg or e.message}"[:2000]


async def chat_once(
    client: Any,
    model: str,
    messages: list[dict[str, str]],
    *,
    temperature: float,
    top_p: float,
    max_tokens: int,
    seed: int | None,
    spec: SteeringSpec | None,
    extra_body: dict[str, Any] | None = None,
    retry: RetryPolicy = RetryPolicy(),
    stop: list[str] | None = None,
    return_token_ids: bool = False,
) -> ChatOutcome:
    """Send one chat request with the retry policy; errors come back in the outcome.

    ``return_token_ids`` asks vLLM for the completion's token ids (sent only to servers
    known to be vLLM: other servers may refuse the unknown field). Raises
    :class:`EndpointError` only for 401/403/404 (the run cannot succeed).
    """
    kwargs: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "extra_body": merge_extra_body(spec, extra_body),
    }
    if stop:
        kwargs["stop"] = list(stop)
    if return_token_ids:
        kwargs["extra_body"]["return_token_ids"] = True
    if seed is not None:
        kwargs["seed"] = seed
    last = ""
    conn_failed = False
    for attempt in range(1, retry.max_attempts + 1):
        t0 = time.perf_counter()
        try:
            resp = await client.chat.completions.create(**kwargs)
        except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
            return ChatOutcome(
                error=status_message(e), error_kind="spec_rejected", attempts=attempt
            )
        except (
            openai.AuthenticationError,
            openai.PermissionDeniedError,
            openai.NotFoundError,
        ) as e:
            raise EndpointError(status_message(e)) from None
        except openai.APIStatusError as e:  # 429, 5xx, others: transient
            last = status_message(e)
            conn_failed = False
        except openai.APIConnectionError as e:  # includes APITimeoutError
            cause = e.__cause__ or e
            last = f"{type(e).__name__}: {cause}"[:500]
            conn_failed = True
        else:
            out = _parse(resp)
            out.latency_s = time.perf_counter() - t0
            out.attempts = attempt
            return out
        if attempt < retry.max_attempts:
            await asyncio.sleep(retry.delay(attempt))
    return ChatOutcome(
        error=f"gave up after {retry.max_attempts} attempts: {last}",
        error_kind="transient",
        attempts=retry.max_attempts,
        connection_failed=conn_failed,
    )


async def check_endpoint(client: Any, model: str | None, *, attempts: int = 2) -> list[str]:
    """Fail fast with a clear :class:`EndpointError` when the server is unreachable.

    Returns the served model ids; a model not among them is an error too,
    since every request would then fail with 404.
    """
    last = ""
    for i in range(attempts):
        try:
            page = await client.models.list()
            ids = [m.id for m in page.data]
            break
        except openai.APIConnectionError as e:
            last = str(e.__cause__ or e)
        except openai.NotFoundError:
            return []  # a server without /models: nothing to check against
        except openai.APIStatusError as e:
            raise EndpointError(f"{client.base_url}models: {status_message(e)}") from None
        if i + 1 < attempts:
            await asyncio.sleep(1.0)
    else:
        raise EndpointError(f"cannot reach the server at {client.base_url} ({last})")
    if model is not None and ids and model not in ids:
        raise EndpointError(f"model {model!r} is not served at {client.base_url}; served: {ids}")
    return ids


async def served_by_vllm(client: Any) -> bool:
    """Whether the endpoint is a vLLM server (its ``/v1/models`` entries say ``owned_by:
    vllm``): only then are vLLM's own request fields (structured outputs) sent."""
    try:
        page = await client.models.list()
    except openai.OpenAIError:
        return False
    return bool(page.data) and all(getattr(m, "owned_by", None) == "vllm" for m in page.data)


async def first_served_model(base_url: str, *, api_key: str = "EMPTY") -> str:
    """The first model the server lists (what ``--model`` defaults to)."""
    client = make_client(base_url, api_key=api_key, timeout_s=30)
    try:
        ids = await check_endpoint(client, None)
    finally:
        await client.close()
    if not ids:
        raise EndpointError(f"{base_url} lists no models: pass --model")
    return ids[0]


def resolve_model(base_url: str, model: str | None, *, api_key: str = "EMPTY") -> str:
    """``model`` when given, else the first model served at ``base_url`` (blocking)."""
    if model:
        return model
    return asyncio.run(first_served_model(base_url, api_key=api_key))


# ---------------------------------------------------- what the server can steer with
def _notice(msg: str) -> None:
    print(msg, file=sys.stderr)


async def fetch_sae_list(client: Any, *, notice: Callable[[str], None] = _notice) -> SAEList | None:
    """``GET /v1/saes`` as an :class:`SAEList`; None, after a one-line ``notice``, when the
    server has no such endpoint (stock vLLM, other servers) or answers something else."""
    where = f"{str(client.base_url).rstrip('/')}/{SAES_PATH.rsplit('/', 1)[1]}"
    skip = f"{where}: {{}}; skipping the spec pre-check (the server will judge each spec)"
    try:
        raw = await client.get(SAES_PATH.rsplit("/", 1)[1], cast_to=object)
    except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
        raise EndpointError(f"{where}: {status_message(e)}") from None
    except openai.APIStatusError as e:
        notice(skip.format(f"HTTP {e.status_code}, not an sae-steer server"))
        return None
    except openai.APIError as e:  # connection trouble, a body that is not JSON
        notice(skip.format(type(e).__name__))
        return None
    try:
        return SAEList.model_validate(raw)
    except ValidationError:
        notice(skip.format("not an sae-steer listing"))
        return None


def check_sweep_against(specs: Mapping[str, SteeringSpec | None], listing: SAEList) -> None:
    """Refuse a sweep whose specs this server would refuse, naming each spec and its problem
    (the server's own admission rules, :func:`~sae_steer_vllm.sae_api.check_spec_against`)."""
    problems = []
    for name, spec in specs.items():
        if spec is None:
            continue
        try:
            check_spec_against(spec, listing)
        except SteeringSpecError as e:
            problems.append(f"spec {name!r}: {e}")
    if problems:
        served = (
            ", ".join(
                f"{e.name} (layer {e.layer}, {e.d_sae} features, {'/'.join(e.modes)})"
                for e in listing.data
            )
            or "none"
        )
        raise UsageError(
            "the server cannot run this sweep:\n  "
            + "\n  ".join(problems)
            + f"\nSAEs it serves: {served}"
        )
