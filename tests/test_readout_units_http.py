"""Fast unit tests of the readout's HTTP side (no server): the ASGI responder that adds
``sae_readout`` to a completion or to its event stream, and the admission rules of a
readout request (what is refused, what is written for the worker, how it is salted).

The responder is driven with scripted ASGI messages; its event-stream parser is checked
against every way the stream can be cut into body messages (hypothesis). Readout values
come from a :class:`ReadoutStore`, the way the receiver files them.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sae_steer_vllm.admission import (
    REQUEST_ID_KEY,
    AdmissionError,
    admit,
    prepare_readout,
    salt_for,
)
from sae_steer_vllm.readout_api import SAEReadoutResponse, readout_from_response
from sae_steer_vllm.readout_response import ReadoutResponder, TokenTexts
from sae_steer_vllm.readout_server import PendingReadout, ReadoutStore, socket_address
from sae_steer_vllm.readout_wire import ID_RE, READOUT_ID_KEY, READOUT_TO_KEY, ReadoutBlock
from sae_steer_vllm.spec import SteeringSpec

RID = "0123456789abcdef0123456789abcdef"
PROMPT, GENERATED = [101, 102, 103], [201, 202, 203]  # read positions 0..4 (5 is never read)
ADDRESS = socket_address()[0]
CHAT = ("POST", "/v1/chat/completions")
COMPLETIONS = ("POST", "/v1/completions")


def block(positions: list[int], base: float = 1.0) -> ReadoutBlock:
    m = len(positions)
    return ReadoutBlock(
        readout_id=RID,
        sae="a",
        positions=np.array(positions, np.int64),
        top_ids=np.tile(np.array([[7, 3]], np.int32), (m, 1)),
        top_vals=np.array([[base + p, 0.5] for p in positions], np.float32).reshape(m, 2),
        watched=np.array([[base + p] for p in positions], np.float32).reshape(m, 1),
    )


def opened(positions: str = "all") -> tuple[ReadoutStore, PendingReadout]:
    store = ReadoutStore(max_bytes=1 << 20)
    spec = SteeringSpec.from_obj(
        {"readout": {"saes": [{"sae": "a", "top_k": 2, "features": [9]}], "positions": positions}}
    )
    assert spec.readout is not None
    return store, store.open(RID, spec.readout)


def drive(
    messages: list[dict[str, Any]],
    pending: PendingReadout,
    *,
    keep: bool = False,
    wait_s: float = 2.0,
    late: tuple[ReadoutStore, list[ReadoutBlock]] | None = None,
) -> list[dict[str, Any]]:
    """Feed ``messages`` to a responder; ``late`` blocks arrive 50 ms after the last one."""
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        responder = ReadoutResponder(
            send,
            pending,
            keep_token_ids=keep,
            texts=TokenTexts(None),
            layers={"a": 4},
            wait_s=wait_s,
        )

        async def arrive() -> None:
            await asyncio.sleep(0.05)
            assert late is not None
            for b in late[1]:
                late[0].add(b)

        task = asyncio.create_task(arrive()) if late else None
        for m in messages:
            await responder(m)
        if task:
            await task

    asyncio.run(asyncio.wait_for(main(), 10))  # a responder that hangs fails here
    return sent


def start(ctype: bytes, status: int = 200, length: int | None = None) -> dict[str, Any]:
    headers = [(b"content-type", ctype)]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http.response.start", "status": status, "headers": headers}


def body(data: bytes, more: bool = False) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def chat_json(**extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ñ!"}, "token_ids": GENERATED}
        ],
        "prompt_token_ids": PROMPT,
        **extra,
    }


# --------------------------------------------------------------------------- JSON
def _json_response(
    payload: dict[str, Any], pending: PendingReadout, **kw: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    raw = json.dumps(payload).encode()
    sent = drive(
        [start(b"application/json", length=len(raw)), body(raw[:7], True), body(raw[7:])],
        pending,
        **kw,
    )
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["more_body"] is False
    lengths = [v for k, v in sent[0]["headers"] if k.lower() == b"content-length"]
    assert lengths == [str(len(sent[1]["body"])).encode()]  # one header, the new length
    return sent[0], json.loads(sent[1]["body"])


def test_json_response_gets_sae_readout_and_hides_token_ids() -> None:
    store, pending = opened()
    store.add(block([0, 1, 2, 3, 4]))
    _, obj = _json_response(chat_json(), pending)
    readout = readout_from_response(obj)
    assert readout is not None and readout.prompt_tokens == 3
    res = readout.saes["a"]
    assert res.positions == [0, 1, 2, 3, 4] and res.missing_positions == []
    assert res.token_ids == PROMPT + GENERATED[:2] and res.layer == 4
    assert res.top_k[3] == [(7, 4.0), (3, 0.5)] and res.watched[3] == [4.0]
    assert res.summary["9"].tokens == 2  # generated positions 3, 4
    assert obj["prompt_token_ids"] is None and obj["choices"][0]["token_ids"] is None
    assert obj["choices"][0]["message"] == {"role": "assistant", "content": "ñ!"}
    assert {k: obj[k] for k in ("id", "object", "created", "model")} == {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
    }


def test_json_response_keeps_token_ids_the_client_asked_for() -> None:
    """Completions put prompt ids per choice; the client's own return_token_ids keeps them."""
    store, pending = opened("generated")
    store.add(block([3, 4]))
    payload = {
        "object": "text_completion",
        "choices": [{"index": 0, "text": "x", "token_ids": GENERATED, "prompt_token_ids": PROMPT}],
    }
    _, obj = _json_response(payload, pending, keep=True)
    assert obj["choices"][0]["token_ids"] == GENERATED
    assert obj["choices"][0]["prompt_token_ids"] == PROMPT
    res = SAEReadoutResponse.model_validate(obj["sae_readout"]).saes["a"]
    assert res.positions == [3, 4] and res.token_ids == GENERATED[:2]


@pytest.mark.parametrize(
    ("status", "ctype", "data"),
    [
        (400, b"application/json", b'{"error": {"message": "bad"}, "choices": []}'),
        (200, b"text/plain", b"hello"),
    ],
)
def test_other_responses_pass_through_unchanged(status: int, ctype: bytes, data: bytes) -> None:
    _, pending = opened()
    messages = [start(ctype, status, len(data)), body(data[:3], True), body(data[3:])]
    assert drive(messages, pending, wait_s=0.01) == messages


def test_error_event_stream_passes_through() -> None:
    _, pending = opened()
    data = b'data: {"error": "x", "choices": []}\n\n'
    sent = drive([start(b"text/event-stream", 500), body(data[:5], True), body(data[5:])], pending)
    assert sent[0]["status"] == 500 and b"".join(m["body"] for m in sent[1:]) == data
    assert sent[-1]["more_body"] is False and len(sent) == 3


@pytest.mark.parametrize("data", [b"not json", b'{"no": "choices"}', b"[1, 2]"])
def test_json_that_is_not_a_completion_passes_through(data: bytes) -> None:
    _, pending = opened()
    sent = drive([start(b"application/json", length=len(data)), body(data)], pending, wait_s=0.01)
    assert sent[1]["body"] == data
    assert [v for k, v in sent[0]["headers"] if k == b"content-length"] == [str(len(data)).encode()]


# --------------------------------------------------------------------------- SSE
def _events(generated: list[int], *, done: bool = True) -> bytes:
    chunk = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 7, "model": "m"}
    out = [
        dict(chunk, choices=[{"index": 0, "delta": {"role": "assistant"}}], prompt_token_ids=PROMPT)
    ]
    for t in generated:
        out.append(dict(chunk, choices=[{"index": 0, "delta": {"content": "é"}, "token_ids": [t]}]))
    text = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in out)
    return text + (b"data: [DONE]\n\n" if done else b"")


def _stream(raw: bytes, cuts: list[int], pending: PendingReadout, **kw: Any) -> list[bytes]:
    """The events the client sees, after the stream was cut at ``cuts``."""
    edges = [0, *sorted(set(cuts)), len(raw)]
    parts = [raw[a:b] for a, b in zip(edges, edges[1:], strict=False)]
    messages = [start(b"text/event-stream", length=123)]
    messages += [body(p, more=i < len(parts) - 1) for i, p in enumerate(parts)]
    sent = drive(messages, pending, **kw)
    assert sent[0]["type"] == "http.response.start"
    assert not [k for k, _ in sent[0]["headers"] if k.lower() == b"content-length"]
    bodies = sent[1:]
    assert all(m["more_body"] for m in bodies[:-1]) and bodies[-1]["more_body"] is False
    text = b"".join(m["body"] for m in bodies)
    assert text.endswith(b"\n\n")
    return text[:-2].split(b"\n\n")


def _check_stream(events: list[bytes], *, done: bool = True) -> SAEReadoutResponse:
    if done:
        assert events[-1] == b"data: [DONE]"
        events = events[:-1]
    objs = [json.loads(e.removeprefix(b"data: ")) for e in events]
    last = objs[-1]  # the readout chunk: last before [DONE] (or before the end)
    assert last["choices"] == [] and [o for o in objs if "sae_readout" in o] == [last]
    assert {k: last[k] for k in ("id", "object", "created", "model")} == {
        "id": "chatcmpl-9",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
    }
    assert objs[0]["prompt_token_ids"] is None  # hidden: the client did not ask
    assert all(o["choices"][0]["token_ids"] is None for o in objs[1:-1])
    assert [o["choices"][0]["delta"].get("content") for o in objs[1:-1]] == ["é"] * 3
    readout = readout_from_response(last)
    assert readout is not None
    return readout


@settings(
    max_examples=40, deadline=2000, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(cuts=st.lists(st.integers(0, len(_events(GENERATED))), max_size=8))
def test_stream_cut_anywhere_gives_the_same_events(cuts: list[int]) -> None:
    raw = _events(GENERATED)
    store, pending = opened()
    store.add(block([0, 1, 2, 3, 4]))
    reference = _stream(raw, [], pending)
    assert _stream(raw, cuts, pending) == reference
    readout = _check_stream(reference)
    assert readout.saes["a"].positions == [0, 1, 2, 3, 4]


def test_stream_cut_byte_by_byte() -> None:
    raw = _events(GENERATED)
    store, pending = opened()
    store.add(block([0, 1, 2, 3, 4]))
    assert _stream(raw, list(range(len(raw))), pending) == _stream(raw, [], pending)


def test_stream_without_done_still_gets_the_readout_before_closing() -> None:
    store, pending = opened("generated")
    store.add(block([3, 4]))
    events = _stream(_events(GENERATED, done=False), [40, 41], pending)
    readout = _check_stream(events, done=False)
    assert readout.saes["a"].positions == [3, 4] and readout.saes["a"].missing_positions == []


def test_stream_keeps_token_ids_when_asked() -> None:
    store, pending = opened()
    store.add(block([0, 1, 2, 3, 4]))
    events = _stream(_events(GENERATED), [], pending, keep=True)
    objs = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    assert objs[0]["prompt_token_ids"] == PROMPT
    assert [o["choices"][0]["token_ids"] for o in objs[1:-1]] == [[t] for t in GENERATED]


# --------------------------------------------------------------------------- waiting
def test_responder_waits_for_blocks_that_arrive_late() -> None:
    store, pending = opened()
    store.add(block([0, 1, 2]))  # the prompt arrived; the generated positions come later
    events = _stream(_events(GENERATED), [], pending, late=(store, [block([3]), block([4])]))
    res = _check_stream(events).saes["a"]
    assert res.positions == [0, 1, 2, 3, 4] and res.missing_positions == []
    raw = json.dumps(chat_json()).encode()
    store2, pending2 = opened()
    sent = drive(
        [start(b"application/json"), body(raw)], pending2, late=(store2, [block([0, 1, 2, 3, 4])])
    )
    assert json.loads(sent[1]["body"])["sae_readout"]["saes"]["a"]["missing_positions"] == []


def test_responder_reports_missing_positions_instead_of_hanging() -> None:
    store, pending = opened()
    store.add(block([0, 1, 3]))
    events = _stream(_events(GENERATED), [], pending, wait_s=0.05)
    res = _check_stream(events).saes["a"]
    assert res.positions == [0, 1, 3] and res.missing_positions == [2, 4]


def test_responder_does_not_wait_for_dropped_blocks() -> None:
    store, pending = opened()
    store.max_bytes = block([0, 1, 2]).nbytes
    store.add(block([0, 1, 2]))
    store.add(block([3, 4]))  # over the bound: dropped, lost for good
    assert pending.dropped == 1
    # wait_s=30 would time out drive()'s 10 s guard if the responder waited
    res = _check_stream(_stream(_events(GENERATED), [], pending, wait_s=30)).saes["a"]
    assert res.positions == [0, 1, 2] and res.missing_positions == [3, 4]


# --------------------------------------------------------------------------- admission
def spec(positions: str = "all", *, steer: bool = False) -> SteeringSpec:
    raw: dict[str, Any] = {"readout": {"saes": [{"sae": "a"}], "positions": positions}}
    if steer:
        raw["interventions"] = [{"sae": "a", "feature": 3, "value": 2.0}]
    return SteeringSpec.from_obj(raw)


def request(**extra: Any) -> dict[str, Any]:
    return {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "vllm_xargs": {},
        **extra,
    }


_REFUSALS: list[tuple[tuple[str, str], dict[str, Any], str, str]] = [
    (("POST", "/v1/responses"), {}, "vllm_xargs.steering.readout", "POST /v1/responses"),
    (("POST", "/v1/messages"), {}, "vllm_xargs.steering.readout", "POST /v1/messages"),
    (CHAT, {"n": 2}, "n", "'n': 2"),
    (COMPLETIONS, {"best_of": 3}, "best_of", "'best_of': 3"),
    (CHAT, {"use_beam_search": True}, "use_beam_search", "beam search"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, "prompt", "one prompt"),
    (COMPLETIONS, {"prompt": [[1, 2], [3]]}, "prompt", "one prompt"),
    (CHAT, {"include_reasoning": False}, "include_reasoning", "include_reasoning"),
    # vLLM 0.32's request models coerce these (pydantic lax mode: n="2" -> 2, 2.0 -> 2,
    # "false" and 0 -> False), so they run exactly like the refused values above
    (CHAT, {"n": "2"}, "n", "n"),
    (CHAT, {"n": 2.0}, "n", "n"),
    (COMPLETIONS, {"best_of": "3"}, "best_of", "best_of"),
    (CHAT, {"include_reasoning": "false"}, "include_reasoning", "include_reasoning"),
    (CHAT, {"include_reasoning": 0}, "include_reasoning", "include_reasoning"),
]


@pytest.mark.parametrize(("route", "extra", "param", "words"), _REFUSALS)
def test_prepare_readout_refusals(
    route: tuple[str, str], extra: dict[str, Any], param: str, words: str
) -> None:
    data = request(**extra)
    with pytest.raises(AdmissionError) as e:
        prepare_readout(*route, data, spec(), ADDRESS)
    assert e.value.status == 400 and e.value.param == param and words in str(e.value)
    assert READOUT_ID_KEY not in data["vllm_xargs"] and "return_token_ids" not in data


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 1},
        {"n": None},
        {"best_of": 1},
        {"prompt": [1, 2, 3]},
        {"prompt": ["one"]},
        {"include_reasoning": True},
    ],
)
def test_prepare_readout_accepts_one_sequence(extra: dict[str, Any]) -> None:
    data = request(**extra)
    rid = prepare_readout("POST", "/v1/completions", data, spec(), ADDRESS)
    assert ID_RE.match(rid) and data["vllm_xargs"][READOUT_ID_KEY] == rid


@pytest.mark.parametrize("positions", ["all", "prompt"])
def test_prepare_readout_salts_each_request_that_reads_the_prompt(positions: str) -> None:
    a, b = request(cache_salt="mine"), request()
    rid_a = prepare_readout(*CHAT, a, spec(positions), ADDRESS)
    rid_b = prepare_readout(*CHAT, b, spec(positions), ADDRESS)
    assert rid_a != rid_b
    assert a["vllm_xargs"] == {READOUT_ID_KEY: rid_a, READOUT_TO_KEY: ADDRESS}
    assert a["return_token_ids"] is True and b["return_token_ids"] is True
    assert a["cache_salt"] != b["cache_salt"] and "mine" not in a["cache_salt"]
    assert rid_a in a["cache_salt"] and rid_b in b["cache_salt"]


def test_generated_only_readout_keeps_the_clients_salt() -> None:
    a, b = request(cache_salt="mine"), request()
    prepare_readout(*CHAT, a, spec("generated"), ADDRESS)
    prepare_readout(*CHAT, b, spec("generated"), ADDRESS)
    assert a["cache_salt"] == "mine" and "cache_salt" not in b
    assert a["return_token_ids"] is True


def _admit(data: dict[str, Any], path: str = "/v1/chat/completions") -> SteeringSpec | None:
    return admit("POST", path, data, check=lambda s: None, max_spec_bytes=1 << 20, request_id="r-1")


@pytest.mark.parametrize(
    "raw",
    [spec().to_json(), spec(steer=True).to_json(), json.dumps({"interventions": []})],
)
def test_admit_strips_client_supplied_internal_keys(raw: str) -> None:
    forged = {READOUT_ID_KEY: RID, READOUT_TO_KEY: "ipc:///tmp/sae-steer-readout-0123abcd.sock"}
    data = request(vllm_xargs={"steering": raw, **forged})
    _admit(data)
    assert READOUT_ID_KEY not in data["vllm_xargs"] and READOUT_TO_KEY not in data["vllm_xargs"]
    generate = {"sampling_params": {"extra_args": {"steering": raw, **forged}}}
    _admit(generate, "/inference/v1/generate")
    assert set(generate["sampling_params"]["extra_args"]) <= {"steering", REQUEST_ID_KEY}


def test_readout_does_not_change_the_steering_salt() -> None:
    alone = request(vllm_xargs={"steering": spec("generated").to_json()}, cache_salt="mine")
    assert _admit(alone) is not None
    assert alone["cache_salt"] == "mine"  # reading changes no KV: the client's salt stays
    assert alone["vllm_xargs"][REQUEST_ID_KEY] == "r-1"
    bare = request(vllm_xargs={"steering": spec().to_json()})
    _admit(bare)
    assert "cache_salt" not in bare
    steer = spec(steer=True)
    plain = SteeringSpec.from_obj({"interventions": [{"sae": "a", "feature": 3, "value": 2.0}]})
    assert steer.cache_salt() == plain.cache_salt()
    with_readout = request(vllm_xargs={"steering": steer.to_json()})
    without = request(vllm_xargs={"steering": plain.to_json()})
    _admit(with_readout)
    _admit(without)
    assert with_readout["cache_salt"] == without["cache_salt"] == plain.cache_salt()
    salted = request(vllm_xargs={"steering": steer.to_json()}, cache_salt="tenant")
    _admit(salted)
    assert salted["cache_salt"] == salt_for(plain, "tenant") != plain.cache_salt()
    # the steering salt stays when only generated positions are read
    prepare_readout(*CHAT, with_readout, spec("generated", steer=True), ADDRESS)
    assert with_readout["cache_salt"] == plain.cache_salt()
