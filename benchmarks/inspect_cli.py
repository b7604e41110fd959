"""``sae-steer inspect``: which SAE features fire on a prompt and on the model's answer.

Sends ONE chat completion with a readout spec (``SteeringSpec.readout``, optionally with
steering from ``--steer``) through the stock ``openai`` client, then prints the prompt and
completion tokens coloured by activation, a per-token table of the top features and the
watched features' summary (:mod:`benchmarks.readout_view`); ``--html`` writes the same as a
standalone page whose feature numbers link to ``--dashboard`` pages.

Exit codes as everywhere (:mod:`sae_steer_vllm.errors`): 2 when the server refuses the
request (its HTTP 400 message is printed: unknown SAE, a server without ``--readout``, a
limit), 3 when it cannot be reached, 1 when its answer carries no usable ``sae_readout``.
:func:`inspect_once` is the same request as a library call.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import openai
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from benchmarks.client import EndpointError, make_client, resolve_model, status_message
from benchmarks.options import CommaList, EndpointOptions, command_parser
from benchmarks.readout_view import check_aligned, dashboard_links, render_html, render_terminal
from sae_steer_vllm.command import CommandConfig, add_model_options, model_from_args, run_command
from sae_steer_vllm.errors import SaeSteerError, UsageError
from sae_steer_vllm.files import atomic_write
from sae_steer_vllm.readout_api import RESPONSE_KEY, SAEReadoutResponse, readout_from_response
from sae_steer_vllm.spec import READOUT_TOP_K, Positions, SteeringSpec

PROG = "sae-steer inspect"
DESCRIPTION = (
    "Send one chat completion that asks the server for an SAE readout, then show the prompt "
    "and the answer token by token, coloured by how strongly features fire, with each "
    "token's top features and the watched features' summary; --html writes the same as a "
    "standalone page."
)
EXAMPLES = """examples:
  sae-steer inspect --sae demo "What is 17 * 23? Think step by step."
  sae-steer inspect --sae demo --watch 123,456 --positions generated --html view.html \\
      --dashboard runs/sae/dashboard "Why is the sky blue?"
  sae-steer inspect --sae demo --chat chat.json --steer clamp.json --max-tokens 128
"""


class ChatMessage(BaseModel):
    """One message of a ``--chat`` file."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


_CHAT = TypeAdapter(list[ChatMessage])


class InspectConfig(CommandConfig):
    """What ``sae-steer inspect`` asks and shows (the endpoint is :class:`EndpointOptions`)."""

    prompt: str | None = Field(default=None, json_schema_extra={"cli": {"metavar": "PROMPT"}})
    """the user message (or give --chat)"""
    chat: Path | None = Field(default=None, json_schema_extra={"cli": {"metavar": "FILE"}})
    """JSON file: a list of {"role", "content"} messages, sent instead of PROMPT"""
    sae: str = Field(min_length=1)
    """registered SAE to read (its name in GET /v1/saes)"""
    top_k: int = Field(default=READOUT_TOP_K, ge=0)
    """top features reported per token (at most the server's readout_max_top_k)"""
    watch: CommaList[int] = []
    """comma list of features whose value is reported at every token, plus their summary
    over the generated tokens"""
    positions: Positions = "all"
    """which tokens are read: all, prompt or generated"""
    max_tokens: int = Field(default=64, ge=1)
    """tokens to generate"""
    temperature: float = Field(default=0.0, ge=0.0)
    """sampling temperature (0: greedy)"""
    steer: Path | None = Field(default=None, json_schema_extra={"cli": {"metavar": "FILE"}})
    """JSON file holding one steering spec ({"interventions": [...]}) applied in the same
    request: see what steering does to the features"""
    color: bool = True
    """colour the tokens by activation (only when stdout is a terminal and NO_COLOR is
    unset); --no-color: plain text"""
    html: Path | None = Field(default=None, json_schema_extra={"cli": {"metavar": "FILE"}})
    """also write a standalone HTML view of the readout to this file"""
    dashboard: Path | None = Field(default=None, json_schema_extra={"cli": {"metavar": "DIR"}})
    """folder written by `sae-steer dashboard` for this SAE: --html links feature numbers to
    their pages there (only features that have one)"""
    timeout_s: float = Field(default=600.0, gt=0)
    """give up on the request after this many seconds"""


@dataclass(frozen=True)
class Inspection:
    """One inspected completion: the readout, and what the completion said about itself."""

    readout: SAEReadoutResponse
    text: str
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None


def load_chat(path: Path) -> list[dict[str, str]]:
    """A ``--chat`` file as OpenAI messages; a bad file is a usage error naming it."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UsageError(f"--chat {path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--chat {path}: not JSON ({e})") from None
    if isinstance(raw, dict) and "messages" in raw:
        raw = raw["messages"]
    try:
        msgs = _CHAT.validate_python(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise UsageError(
            f"--chat {path}: expected a JSON list of {{role, content}} messages "
            f"({loc}: {first['msg']})"
        ) from None
    if not msgs:
        raise UsageError(f"--chat {path}: no messages")
    return [m.model_dump() for m in msgs]


def build_spec(cfg: InspectConfig) -> SteeringSpec:
    """The request's spec: ``--steer``'s interventions (if any) plus the readout."""
    base: dict[str, Any] = {}
    if cfg.steer is not None:
        try:
            text = cfg.steer.read_text(encoding="utf-8")
        except OSError as e:
            raise UsageError(f"--steer {cfg.steer}: cannot read ({e.strerror})") from None
        steer = SteeringSpec.from_json(text)
        if steer.readout is not None:
            raise UsageError(f"--steer {cfg.steer}: has a readout; inspect sets it (--sae ...)")
        base = steer.model_dump(exclude_none=True)
    base["readout"] = {
        "saes": [{"sae": cfg.sae, "top_k": cfg.top_k, "features": list(cfg.watch)}],
        "positions": cfg.positions,
    }
    return SteeringSpec.from_obj(base)


def messages_of(cfg: InspectConfig) -> list[dict[str, str]]:
    if (cfg.prompt is None) == (cfg.chat is None):
        raise UsageError("give a PROMPT or --chat FILE (exactly one)")
    if cfg.chat is not None:
        return load_chat(cfg.chat)
    return [{"role": "user", "content": str(cfg.prompt)}]


async def fetch_inspection(
    base_url: str, model: str, cfg: InspectConfig, *, api_key: str = "EMPTY"
) -> Inspection:
    """Send the one chat request and parse its ``sae_readout``; errors as documented above."""
    messages = messages_of(cfg)
    spec = build_spec(cfg)
    client = make_client(base_url, api_key=api_key, timeout_s=cfg.timeout_s)
    try:
        resp = await client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=cfg.max_tokens,
            temperature=cfg.temperature,
            extra_body=spec.extra_body(),
        )
    except (openai.BadRequestError, openai.UnprocessableEntityError) as e:
        raise UsageError(f"the server refused the request: {status_message(e)}") from None
    except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError) as e:
        raise EndpointError(f"{base_url}: {status_message(e)}") from None
    except openai.APIStatusError as e:
        raise SaeSteerError(f"{base_url}: {status_message(e)}") from None
    except openai.APIConnectionError as e:
        raise EndpointError(f"cannot reach the server at {base_url} ({e.__cause__ or e})") from None
    finally:
        await client.close()
    return _inspection(resp, cfg.sae)


def _inspection(resp: Any, sae: str) -> Inspection:
    try:
        readout = readout_from_response(resp)
    except ValidationError as e:
        first = e.errors()[0]
        raise SaeSteerError(
            f"the server's {RESPONSE_KEY} is malformed "
            f"({'.'.join(map(str, first['loc']))}: {first['msg']})"
        ) from None
    if readout is None:
        raise SaeSteerError(
            f"the response carries no {RESPONSE_KEY!r}: this server ignored the readout "
            "request (not sae-steer with readout support? start it with sae-steer serve "
            "--readout)"
        )
    if sae not in readout.saes:
        raise SaeSteerError(
            f"the server's {RESPONSE_KEY} has no entry for SAE {sae!r} "
            f"(it has: {sorted(readout.saes)})"
        )
    check_aligned(readout)
    choice = resp.choices[0] if getattr(resp, "choices", None) else None
    message = getattr(choice, "message", None)
    usage = getattr(resp, "usage", None)
    return Inspection(
        readout=readout,
        text=(getattr(message, "content", None) or "") if message is not None else "",
        prompt_tokens=getattr(usage, "prompt_tokens", None),
        completion_tokens=getattr(usage, "completion_tokens", None),
        finish_reason=getattr(choice, "finish_reason", None),
    )


def inspect_once(
    base_url: str, model: str | None, cfg: InspectConfig, *, api_key: str = "EMPTY"
) -> SAEReadoutResponse:
    """One inspected completion's readout (blocking); ``model`` None: the first one served.

    Example: ``inspect_once(url, None, InspectConfig(sae="demo", prompt="Hi", watch=[3]))``.
    """
    model = resolve_model(base_url, model, api_key=api_key)
    return asyncio.run(fetch_inspection(base_url, model, cfg, api_key=api_key)).readout


def use_color(cfg: InspectConfig, stream: Any = None) -> bool:
    """Colour only when asked, writing to a terminal, and NO_COLOR (no-color.org) is unset."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return cfg.color and bool(isatty and isatty()) and not os.environ.get("NO_COLOR")


def run_inspect(endpoint: EndpointOptions, cfg: InspectConfig) -> int:
    """The whole command; returns 0 (failures raise, :func:`run_command` maps them)."""
    messages_of(cfg)  # refuse a bad prompt / chat file before touching the network
    build_spec(cfg)
    if cfg.dashboard is not None:
        if cfg.html is None:
            raise UsageError("--dashboard only adds links to the --html page: give --html too")
        dashboard_links(cfg.dashboard, cfg.html.parent, [])  # a bad folder fails now, not later
    model = resolve_model(endpoint.url, endpoint.model, api_key=endpoint.key)
    got = asyncio.run(fetch_inspection(endpoint.url, model, cfg, api_key=endpoint.key))
    print(
        render_terminal(got.readout, color=use_color(cfg), completion_tokens=got.completion_tokens),
        end="",
    )
    if cfg.html is not None:
        links = {}
        if cfg.dashboard is not None:
            res = got.readout.saes[cfg.sae]
            seen = {f for row in res.top_k for f, _ in row} | set(res.features)
            links[cfg.sae] = dashboard_links(cfg.dashboard, cfg.html.parent, seen)
        page = render_html(
            got.readout,
            title=f"sae-steer inspect: {cfg.sae} on {model}",
            links=links,
            completion_tokens=got.completion_tokens,
        )
        atomic_write(cfg.html, page)
        print(f"\nwrote {cfg.html}")
    return 0


def main(argv: list[str]) -> int:
    parser = command_parser(PROG, DESCRIPTION, EXAMPLES)
    add_model_options(parser, EndpointOptions, group="endpoint")
    add_model_options(parser, InspectConfig, group="readout", positional=["prompt"])
    args = parser.parse_args(argv)
    return run_command(
        PROG,
        lambda: run_inspect(
            model_from_args(EndpointOptions, args), model_from_args(InspectConfig, args)
        ),
    )


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
