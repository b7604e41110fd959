"""The wire format of a readout's answer (``sae_readout`` in a completion), for both ends.

A request asks for a readout with ``SteeringSpec.readout`` (:mod:`sae_steer_vllm.spec`); the
server answers with one extra top-level object in the completion JSON (non-streaming), or in
one final chunk just before ``data: [DONE]`` (streaming), that :class:`SAEReadoutResponse`
parses. The stock ``openai`` client keeps unknown top-level fields, so::

    resp = client.chat.completions.create(..., extra_body=spec.extra_body())
    readout = readout_from_response(resp)          # or resp.model_extra["sae_readout"]
    for tok, top in zip(readout.saes["demo"].tokens, readout.saes["demo"].top_k):
        print(repr(tok), top[:3])

What a position means: the activations at position ``p`` are those of the residual stream
after the model read token ``p`` (SAELens's and Neuronpedia's convention). The model never
reads its last generated token (generation stops once it is sampled), so that token has no
readout; ``positions`` says exactly which positions were read.

This module imports neither torch nor vLLM: clients and benchmarks use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .spec import Positions

RESPONSE_KEY = "sae_readout"
"""Top-level key of the readout in a completion (and in the final stream chunk)."""


STATS_PATH = "/v1/readout/stats"
"""``GET``: the API process's readout store (:class:`ReadoutStats`), for operators and tests."""


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FeatureSummary(_Wire):
    """One watched feature over the request's generated, read tokens."""

    tokens: int = Field(ge=0, description="generated tokens read (the denominator)")
    mean: float | None = Field(description="mean activation; None when no token was read")
    max: float | None = None
    active_fraction: float | None = Field(
        default=None, description="fraction of those tokens where the feature is > 0"
    )


class SAEReadoutResult(_Wire):
    """Everything read from one SAE, one entry per read position (all lists aligned)."""

    layer: int = Field(ge=0, description="the decoder layer whose resid_post the SAE reads")
    positions: list[int] = Field(description="token positions (0 = first prompt token)")
    token_ids: list[int]
    tokens: list[str] = Field(description="each token decoded on its own")
    top_k: list[list[tuple[int, float]]] = Field(
        description="per position: (feature, activation) of the active features with the "
        "largest activations, largest first (fewer than top_k where fewer are active)"
    )
    features: list[int] = Field(default_factory=list, description="the watch list")
    watched: list[list[float]] = Field(
        default_factory=list, description="per position: the watched features' values"
    )
    summary: dict[str, FeatureSummary] = Field(
        default_factory=dict, description="watched feature (as a string) -> its summary"
    )
    missing_positions: list[int] = Field(
        default_factory=list,
        description="positions that should have been read but were not received (empty "
        "unless the server dropped data under memory pressure; never filled with guesses)",
    )


class SAEReadoutResponse(_Wire):
    """``sae_readout``: what the request asked to read, per SAE name."""

    object: str = "sae_readout"
    positions: Positions
    prompt_tokens: int = Field(ge=0)
    saes: dict[str, SAEReadoutResult]


def readout_from_response(resp: Any) -> SAEReadoutResponse | None:
    """The readout of a completion or a stream chunk: an ``openai`` response object or its
    dict. None when it carries none (a request without readout, or a chunk before the last)."""
    raw: Any
    if isinstance(resp, Mapping):
        raw = resp.get(RESPONSE_KEY)
    else:
        extra = getattr(resp, "model_extra", None) or {}
        raw = extra.get(RESPONSE_KEY, getattr(resp, RESPONSE_KEY, None))
    if raw is None:
        return None
    return SAEReadoutResponse.model_validate(raw)


class ReadoutStats(_Wire):
    """``GET /v1/readout/stats``: what this API server process holds for running readouts."""

    enabled: bool = Field(description="the server accepts readout requests")
    open: int = Field(ge=0, description="readout requests being answered now")
    bytes: int = Field(ge=0, description="bytes of readout values held for them")
    max_bytes: int = Field(ge=0, description="readout_max_pending_bytes")
    dropped_blocks: int = Field(ge=0, description="blocks dropped because the store was full")
    stale_blocks: int = Field(
        ge=0, description="blocks that arrived for a request already answered or abandoned"
    )
