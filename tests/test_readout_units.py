"""Fast unit tests of the readout transport and its response assembly (no server, no engine).

What the server tests (``test_readout.py``) cannot reach cheaply: malformed worker messages,
the address and id checks a worker applies, the bounded store under memory pressure,
positions received twice (recomputation after preemption), the exact bytes a read position
costs, and how ``sae_readout`` is assembled from what arrived; plus the readout spec's own
validation and the client-side check against ``GET /v1/saes``. The ASGI responder and the
admission rules are in ``test_readout_units_http.py``.
"""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sae_steer_vllm.readout_api import SAEReadoutResponse
from sae_steer_vllm.readout_response import ReadoutTokens, TokenTexts, build_readout
from sae_steer_vllm.readout_server import PendingReadout, ReadoutStore, merged, socket_address
from sae_steer_vllm.readout_wire import (
    ADDRESS_RE,
    ID_RE,
    READOUT_ID_KEY,
    READOUT_TO_KEY,
    ReadoutBlock,
    WireError,
    decode,
    encode,
)
from sae_steer_vllm.readout_worker import read_target
from sae_steer_vllm.sae_api import ReadoutLimits, SAEEntry, check_readout_against
from sae_steer_vllm.spec import ReadoutSpec, SAEReadout, SteeringSpec, SteeringSpecError

RID = "0123456789abcdef0123456789abcdef"
FUZZ = settings(
    max_examples=100,
    deadline=2000,
    database=None,  # no .hypothesis/ folder in the repository
    suppress_health_check=[HealthCheck.too_slow],
)


def block(
    positions: list[int], k: int = 2, w: int = 1, *, sae: str = "a", rid: str = RID, base: float = 1
) -> ReadoutBlock:
    """``m`` rows; row i: ids i*10.., values descending from base+i, watched base+i+0.5.."""
    m = len(positions)
    vals = np.array([[base + i - 0.25 * j for j in range(k)] for i in range(m)], np.float32)
    return ReadoutBlock(
        readout_id=rid,
        sae=sae,
        positions=np.array(positions, np.int64),
        top_ids=np.array([[10 * i + j for j in range(k)] for i in range(m)], np.int32).reshape(
            m, k
        ),
        top_vals=vals.reshape(m, k),
        watched=np.array(
            [[base + i + 0.5 + j for j in range(w)] for i in range(m)], np.float32
        ).reshape(m, w),
    )


def readout_spec(positions: str = "all", **sae: Any) -> ReadoutSpec:
    return ReadoutSpec.model_validate(
        {"saes": [{"sae": "a", "top_k": 2, "features": [5], **sae}], "positions": positions}
    )


# --------------------------------------------------------------------------- wire
def test_wire_round_trip_keeps_values_shapes_and_dtypes() -> None:
    blocks = [
        block([3, 4, 5], k=4, w=3, sae="sae-ünï"),
        block([7], k=0, w=2, rid="f" * 32),  # watch list only
        block([8, 9], k=3, w=0),  # top-k only
        block([], k=2, w=2),  # nothing read this step
    ]
    out = decode(encode(blocks))
    assert len(out) == len(blocks)
    for a, b in zip(blocks, out, strict=True):
        assert (b.readout_id, b.sae) == (a.readout_id, a.sae)
        for name in ("positions", "top_ids", "top_vals", "watched"):
            x, y = getattr(a, name), getattr(b, name)
            assert y.shape == x.shape and y.dtype == x.dtype, name
            np.testing.assert_array_equal(y, x)
        assert b.nbytes == a.nbytes
    assert out[1].top_ids.shape == (1, 0) and out[2].watched.shape == (2, 0)


def _header(blocks: list[dict[str, Any]], v: Any = 1) -> bytes:
    return json.dumps({"v": v, "blocks": blocks}).encode()


_ONE = {"id": RID, "sae": "a", "m": 1, "k": 1, "w": 1}
_GOOD = encode([block([0], k=1, w=1)])
MALFORMED: dict[str, list[bytes]] = {
    "empty": [],
    "not JSON": [b"{nope", *_GOOD[1:]],
    "not UTF-8": [b"\xff\xfe\x00", *_GOOD[1:]],
    "header a list": [b"[1]", *_GOOD[1:]],
    "wrong version": [_header([_ONE], v=2), *_GOOD[1:]],
    "no version": [json.dumps({"blocks": [_ONE]}).encode(), *_GOOD[1:]],
    "blocks not a list": [json.dumps({"v": 1, "blocks": "x"}).encode()],
    "a frame missing": [_header([_ONE]), *_GOOD[1:4]],
    "a frame too many": [_header([_ONE]), *_GOOD[1:], b""],
    "positions one byte short": [_header([_ONE]), _GOOD[1][:-1], *_GOOD[2:]],
    "values one value long": [_header([_ONE]), *_GOOD[1:3], _GOOD[3] + b"\0" * 4, _GOOD[4]],
    "m larger than the arrays": [_header([dict(_ONE, m=2)]), *_GOOD[1:]],
    "negative m": [_header([dict(_ONE, m=-1)]), b"", b"", b"", b""],
    # sizes all 0 with m=0: only the sign check stops a reshape(0, -1)
    "negative k": [_header([dict(_ONE, m=0, k=-1)]), b"", b"", b"", b""],
    "negative w": [_header([dict(_ONE, m=0, w=-3)]), b"", b"", b"", b""],
    "entry missing a key": [_header([{"id": RID, "sae": "a", "m": 1, "k": 1}]), *_GOOD[1:]],
    "entry a string": [_header(["abc"]), *_GOOD[1:]],  # type: ignore[list-item]
    "entry null": [_header([None]), *_GOOD[1:]],  # type: ignore[list-item]
    "m not a number": [_header([dict(_ONE, m="x")]), *_GOOD[1:]],
    "m NaN": [_header([dict(_ONE, m=float("nan"))]), *_GOOD[1:]],
    # json.loads reads Infinity and 1e400 as float('inf'): int() raises OverflowError
    "m Infinity": [_header([dict(_ONE, m=float("inf"))]), *_GOOD[1:]],
    "k 1e400": [_header([_ONE]).replace(b'"k": 1', b'"k": 1e400'), *_GOOD[1:]],
    # a header nested past Python's recursion limit: json.loads raises RecursionError
    "deeply nested header": [b"[" * 100_000 + b"]" * 100_000, *_GOOD[1:]],
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_message_raises_wire_error_only(case: str) -> None:
    """The receiver catches WireError only: anything else would kill its receive task."""
    with pytest.raises(WireError):
        decode(MALFORMED[case])


_SCALAR = (
    st.none() | st.booleans() | st.floats() | st.text(max_size=4) | st.integers(-(2**70), 2**70)
)
_SIZE = (
    st.integers(-2, 3) | st.sampled_from([1.0, 1.5, True, float("inf"), float("nan")]) | _SCALAR
)  # mostly small sizes, so that some messages decode
_ENTRY = (
    st.fixed_dictionaries(
        {
            "id": st.text(max_size=4) | _SCALAR,
            "sae": st.text(max_size=4),
            "m": _SIZE,
            "k": _SIZE,
            "w": _SIZE,
        }
    )
    | st.dictionaries(st.sampled_from(["id", "sae", "m", "k", "w"]), _SCALAR, max_size=5)
    | _SCALAR
)


@st.composite
def _messages(draw: st.DrawFn) -> list[bytes]:
    """A header of 0-3 entries and about four frames per entry (sometimes one off)."""
    entries = draw(st.lists(_ENTRY, max_size=3))
    version = draw(st.sampled_from([1, 1, 1, 1.0, 2, "1", None]))
    n = max(4 * len(entries) + draw(st.sampled_from([0, 0, 0, 0, 0, -1, 1])), 0)
    frame = st.binary(max_size=24).map(lambda b: b[: len(b) // 4 * 4])
    frames = [draw(frame) for _ in range(n)]
    return [json.dumps({"v": version, "blocks": entries}).encode(), *frames]  # NaN, Infinity


def _inf_message() -> list[bytes]:
    return [_header([dict(_ONE, m=0, k=float("inf"))]), b"", b"", b"", b""]


@FUZZ
@given(frames=_messages())
@example(frames=_inf_message())
def test_decode_fuzz_raises_wire_error_or_returns_consistent_blocks(frames: list[bytes]) -> None:
    try:
        out = decode(frames)
    except WireError:
        return
    assert len(out) == len(json.loads(frames[0])["blocks"])
    for b in out:
        m = b.positions.shape[0]
        assert b.top_ids.shape == b.top_vals.shape and b.top_ids.shape[0] == m
        assert b.watched.shape[0] == m


def test_socket_address_is_what_a_worker_accepts(tmp_path: Any) -> None:
    for folder in (None, str(tmp_path)):
        address, path = socket_address(folder)
        assert address == f"ipc://{path}" and ADDRESS_RE.fullmatch(address)
        assert ADDRESS_RE.match(address), address
    assert socket_address()[0] != socket_address()[0]  # fresh per process


@pytest.mark.parametrize(
    "address",
    [
        "tcp://127.0.0.1:5555",
        "ipc:///tmp/other.sock",
        "ipc:///tmp/sae-steer-readout-.sock",
        "ipc:///tmp/sae-steer-readout-0123ABCD.sock",  # upper-case hex: not ours
        "ipc:///tmp/sae-steer-readout-0123abcd.sock.evil",
        "ipc:///tmp/sae-steer-readout-0123abcd",
        "ipc:///tmp dir/sae-steer-readout-0123abcd.sock",
        "ipc:///tmp;rm -rf/sae-steer-readout-0123abcd.sock",
        "ipc:///tmp/sae-steer-readout-0123abcd.sock\n",  # `$` also matches before a newline
        "ipc:///tmp/sae-steer-readout-0123abcd.sock\ntcp://10.0.0.1:1",
        "IPC:///tmp/sae-steer-readout-0123abcd.sock",
        "",
    ],
)
def test_address_re_refuses_other_addresses(address: str) -> None:
    assert not ADDRESS_RE.match(address)


@pytest.mark.parametrize("rid", ["", "0" * 31, "0" * 33, "G" * 32, "A" * 32, "0" * 32 + "\n"])
def test_id_re_refuses_other_ids(rid: str) -> None:
    assert ID_RE.match(RID) and not ID_RE.match(rid)


def test_read_target_needs_a_valid_id_and_address() -> None:
    spec = readout_spec()
    address = socket_address()[0]

    def params(extra: Any) -> SimpleNamespace:
        return SimpleNamespace(extra_args=extra)

    t = read_target(params({READOUT_ID_KEY: RID, READOUT_TO_KEY: address}), spec, 7)
    assert t is not None and (t.readout_id, t.address, t.prompt_len) == (RID, address, 7)
    assert read_target(params({READOUT_ID_KEY: RID, READOUT_TO_KEY: address}), None, 7) is None
    for extra in (
        None,
        {},
        {READOUT_TO_KEY: address},
        {READOUT_ID_KEY: RID},
        {READOUT_ID_KEY: "x" * 32, READOUT_TO_KEY: address},
        {READOUT_ID_KEY: 123, READOUT_TO_KEY: address},
        {READOUT_ID_KEY: RID, READOUT_TO_KEY: "tcp://127.0.0.1:1"},
        {READOUT_ID_KEY: RID, READOUT_TO_KEY: ["ipc://x"]},
    ):
        assert read_target(params(extra), spec, 7) is None, extra
    assert read_target(SimpleNamespace(), spec, 7) is None  # no extra_args at all


# --------------------------------------------------------------------------- store
def test_store_bounds_memory_and_close_frees_it() -> None:
    one = block([0], k=2, w=1).nbytes  # 8 + 2*8 + 4 = 28 bytes
    store = ReadoutStore(max_bytes=3 * one)
    pending = store.open(RID, readout_spec())
    for p in range(5):
        store.add(block([p], k=2, w=1))
        assert store.nbytes <= store.max_bytes
    assert store.nbytes == pending.nbytes == 3 * one
    assert (store.dropped_blocks, pending.dropped) == (2, 2)
    assert pending.positions("a") == {0, 1, 2}  # the first ones kept, the rest dropped
    other = store.open("f" * 32, readout_spec())
    store.add(block([0], rid="f" * 32))  # full: dropped for that request too
    assert (other.dropped, store.dropped_blocks) == (1, 3)
    store.close(RID)
    assert store.nbytes == 0 and store.get(RID) is None and len(store) == 1
    store.add(block([9], rid="f" * 32))  # room again
    assert store.nbytes == one and other.positions("a") == {9}
    store.close("f" * 32)
    store.close("f" * 32)  # twice: harmless
    assert store.nbytes == 0 and len(store) == 0


def test_store_counts_unknown_ids_and_unasked_saes_as_stale() -> None:
    store = ReadoutStore(max_bytes=1 << 20)
    pending = store.open(RID, readout_spec())
    store.add(block([0], rid="e" * 32))  # never opened (or already answered)
    store.add(block([0], sae="b"))  # an SAE this request did not ask for
    assert store.stale_blocks == 2 and store.nbytes == 0 and pending.blocks == {}
    store.add(block([0]))
    store.close(RID)
    store.add(block([1]))  # after the response went out
    assert store.stale_blocks == 3 and store.nbytes == 0 and store.dropped_blocks == 0


def test_bytes_per_read_position_formula() -> None:
    """The README's figure: 8 + 8*k + 4*w bytes per read position and SAE."""
    k, w = 8, 3
    store = ReadoutStore(max_bytes=1 << 20)
    spec = ReadoutSpec(saes=[SAEReadout(sae="a", top_k=k, features=[1, 2, 3])])
    store.open(RID, spec)
    store.add(block(list(range(10)), k=k, w=w))
    store.add(block([10], k=k, w=w))
    per_position = store.nbytes / 11
    assert per_position == 8 + 8 * k + 4 * w == 84


def test_first_value_of_a_position_wins_and_positions_come_out_sorted() -> None:
    store = ReadoutStore(max_bytes=1 << 20)
    pending = store.open(RID, readout_spec("all"))
    store.add(block([4, 5, 6], base=100))  # values 100, 101, 102
    store.add(block([0, 1, 2, 3], base=1))  # prompt after generated: arrival order differs
    store.add(block([5, 6, 7], base=900))  # recomputed after preemption: other values
    got = merged(pending, "a")
    assert got[5][1][0] == 101 and got[6][1][0] == 102 and got[7][1][0] == 902
    tokens = ReadoutTokens()
    tokens.prompt, tokens.generated = [11, 12, 13, 14], [21, 22, 23, 24, 25]
    out = build_readout(pending, tokens, TokenTexts(None), {"a": 3})
    res = out["saes"]["a"]
    assert res["positions"] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [row[0][1] for row in res["top_k"]][4:] == [100, 101, 102, 902]
    assert res["token_ids"] == [11, 12, 13, 14, 21, 22, 23, 24]
    assert res["missing_positions"] == [] and res["layer"] == 3
    SAEReadoutResponse.model_validate(out)


# --------------------------------------------------------------------------- assembly
def _pending(spec: ReadoutSpec, *blocks: ReadoutBlock) -> PendingReadout:
    pending = PendingReadout(spec)
    for b in blocks:
        pending.blocks.setdefault(b.sae, []).append(b)
    return pending


def _tokens(prompt: list[int], generated: list[int]) -> ReadoutTokens:
    t = ReadoutTokens()
    t.prompt, t.generated = prompt, generated
    return t


class _Tok:
    def decode(self, ids: list[int]) -> str:
        if ids[0] == 13:
            raise ValueError("no such token")
        return f"<{ids[0]}>"


@pytest.mark.parametrize(
    ("positions", "expected"),
    [("all", [0, 1, 2, 3, 4, 5]), ("prompt", [0, 1, 2]), ("generated", [3, 4, 5])],
)
def test_build_readout_reads_the_expected_positions(positions: str, expected: list[int]) -> None:
    """Prompt 3 tokens, 4 generated: positions 0..5 are read, 6 (the last token) never is;
    blocks for every position 0..8 arrived (7 and 8 are past the response: dropped)."""
    spec = readout_spec(positions)
    pending = _pending(spec, block(list(range(9))))
    out = build_readout(pending, _tokens([11, 12, 13], [21, 22, 23, 24]), TokenTexts(_Tok()), {})
    res = SAEReadoutResponse.model_validate(out).saes["a"]
    assert out["positions"] == positions and out["prompt_tokens"] == 3
    # 6 is a generated token that is never read; had it been read, reporting it is no lie
    assert [p for p in res.positions if p != 6] == expected and res.missing_positions == []
    assert positions != "prompt" or 6 not in res.positions
    ids = [11, 12, 13, 21, 22, 23, 24]
    assert res.token_ids == [ids[p] for p in res.positions]
    assert res.tokens == ["" if ids[p] == 13 else f"<{ids[p]}>" for p in res.positions]


def test_build_readout_lists_missing_positions_and_never_fills_them() -> None:
    spec = readout_spec("all")
    pending = _pending(spec, block([0, 2]), block([4]))
    out = build_readout(pending, _tokens([1, 2, 3], [4, 5, 6, 7]), TokenTexts(None), {})
    res = out["saes"]["a"]
    assert res["positions"] == [0, 2, 4] and res["missing_positions"] == [1, 3, 5]
    assert len(res["top_k"]) == len(res["watched"]) == len(res["tokens"]) == 3
    empty = build_readout(_pending(spec), _tokens([1, 2], [3]), TokenTexts(None), {})["saes"]["a"]
    assert empty["positions"] == [] and empty["missing_positions"] == [0, 1]
    none = {"tokens": 0, "mean": None, "max": None, "active_fraction": None}
    assert empty["summary"]["5"] == none


def test_build_readout_top_k_keeps_active_values_largest_first() -> None:
    spec = readout_spec("all", top_k=4, features=[7, 9])
    b = ReadoutBlock(
        readout_id=RID,
        sae="a",
        positions=np.array([0, 1], np.int64),
        top_ids=np.array([[40, 10, 30, 20], [1, 2, 3, 4]], np.int32),
        top_vals=np.array([[3.5, 1.25, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]], np.float32),
        watched=np.array([[0.0, 2.0], [-1.0, 0.0]], np.float32),
    )
    out = build_readout(_pending(spec, b), _tokens([5, 6], [7]), TokenTexts(None), {})
    res = SAEReadoutResponse.model_validate(out).saes["a"]
    assert res.top_k == [[(40, 3.5), (10, 1.25)], []]
    assert res.features == [7, 9] and res.watched == [[0.0, 2.0], [-1.0, 0.0]]


def test_summary_covers_generated_positions_only() -> None:
    spec = readout_spec("all", features=[5, 6])
    b = ReadoutBlock(
        readout_id=RID,
        sae="a",
        positions=np.arange(5, dtype=np.int64),
        top_ids=np.zeros((5, 2), np.int32),
        top_vals=np.zeros((5, 2), np.float32),
        # prompt rows (0, 1) are huge: a summary that included them would show it
        watched=np.array([[100, 100], [100, 100], [1, 0], [3, 0], [0, 0]], np.float32),
    )
    out = build_readout(_pending(spec, b), _tokens([1, 2], [3, 4, 5, 6]), TokenTexts(None), {})
    summary = SAEReadoutResponse.model_validate(out).saes["a"].summary
    assert summary["5"].model_dump() == {
        "tokens": 3,
        "mean": round(4 / 3, 6),
        "max": 3.0,
        "active_fraction": round(2 / 3, 6),
    }
    assert summary["6"].model_dump() == {"tokens": 3, "mean": 0.0, "max": 0.0, "active_fraction": 0}


def test_build_readout_without_watch_list_has_no_watched_values() -> None:
    spec = readout_spec("generated", features=[])
    out = build_readout(
        _pending(spec, block([2, 3], w=0)), _tokens([1, 2], [3, 4, 5]), TokenTexts(None), {}
    )
    res = SAEReadoutResponse.model_validate(out).saes["a"]
    assert res.watched == [] and res.summary == {} and res.positions == [2, 3]


# --------------------------------------------------------------------------- spec and check
@pytest.mark.parametrize(
    ("readout", "words"),
    [
        ({"saes": [{"sae": "a"}, {"sae": "a", "top_k": 1}]}, "twice"),
        ({"saes": [{"sae": "a", "features": [3, 3]}]}, "twice"),
        ({"saes": [{"sae": "a", "features": [-1]}]}, ">= 0"),
        ({"saes": [{"sae": "a", "top_k": 0}]}, "nothing to read"),
        ({"saes": [{"sae": "a", "top_k": -1}]}, "top_k"),
        ({"saes": [{"sae": f"s{i}"} for i in range(17)]}, "saes"),
        ({"saes": []}, "saes"),
        ({"saes": [{"sae": "a"}], "positions": "middle"}, "positions"),
        ({"saes": [{"sae": "a", "topk": 3}]}, "topk"),
    ],
)
def test_readout_spec_validation(readout: dict[str, Any], words: str) -> None:
    with pytest.raises(SteeringSpecError, match="readout") as e:
        SteeringSpec.from_obj({"readout": readout})
    assert words in str(e.value)


def test_readout_spec_accepts_the_limits() -> None:
    spec = SteeringSpec.from_obj({"readout": {"saes": [{"sae": f"s{i}"} for i in range(16)]}})
    assert spec.readout is not None and len(spec.readout.saes) == 16 and not spec.steers
    assert SteeringSpec.from_obj({"readout": {"saes": [{"sae": "a", "top_k": 0, "features": [0]}]}})


_SAES = {
    "a": SAEEntry(
        name="a",
        layer=3,
        d_in=8,
        d_sae=32,
        architecture="standard",
        modes=["clamp"],
        has_statistics=False,
    ),
    "b": SAEEntry(
        name="b", layer=5, d_in=8, d_sae=16, architecture="topk", modes=[], has_statistics=False
    ),
}
_LIMITS = ReadoutLimits(enabled=True, max_top_k=20, max_watch=3, layers=[3])


@pytest.mark.parametrize(
    ("limits", "sae", "words"),
    [
        (ReadoutLimits(enabled=False), {"sae": "a"}, "without readout support"),
        (_LIMITS, {"sae": "zz"}, "readout.saes.0.sae: unknown SAE 'zz'"),
        (_LIMITS, {"sae": "b"}, "readout.saes.0.sae: SAE 'b' reads layer 5"),
        (
            _LIMITS,
            {"sae": "a", "top_k": 21},
            "readout.saes.0.top_k: 21 exceeds this server's limit of 20",
        ),
        (
            _LIMITS.model_copy(update={"max_top_k": 64}),
            {"sae": "a", "top_k": 33},
            "readout.saes.0.top_k: 33 exceeds SAE 'a'",
        ),
        (_LIMITS, {"sae": "a", "features": [0, 1, 2, 4]}, "readout.saes.0.features: 4 watched"),
        (
            _LIMITS,
            {"sae": "a", "features": [1, 32]},
            "readout.saes.0.features: feature 32 out of range",
        ),
    ],
)
def test_check_readout_against_names_the_field(
    limits: ReadoutLimits, sae: dict[str, Any], words: str
) -> None:
    spec = ReadoutSpec.model_validate({"saes": [sae]})
    with pytest.raises(SteeringSpecError) as e:
        check_readout_against(spec, _SAES, limits)
    assert words in str(e.value)


def test_check_readout_against_accepts_what_fits_and_names_the_failing_sae() -> None:
    ok = ReadoutSpec.model_validate({"saes": [{"sae": "a", "top_k": 20, "features": [0, 31, 7]}]})
    check_readout_against(ok, _SAES, _LIMITS)  # exactly at every limit: accepted
    two = ReadoutSpec.model_validate({"saes": [{"sae": "a"}, {"sae": "a2"}]})
    with pytest.raises(SteeringSpecError, match=r"readout\.saes\.1\.sae: unknown SAE 'a2'"):
        check_readout_against(two, _SAES, _LIMITS)
