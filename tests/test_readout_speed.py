"""The readout benchmark's pure parts and its client side, against the scripted endpoint
(no vLLM: the benchmark itself is run by hand, see ``benchmarks/readout_speed.py``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeModel, FakeServer, Reply

from benchmarks.plugin_speed import (
    SAE_NAME,
    Harness,
    add_harness_args,
    measure_once,
    ratio_table,
)
from benchmarks.readout_speed import (
    ROWS,
    ResponseBytes,
    bytes_per_token,
    ratios,
    readout_plan,
    readout_spec,
    readout_table,
    response_bytes,
    scenarios,
)
from benchmarks.readout_speed import main as readout_main
from benchmarks.server_process import ServerProcess

READOUT: dict[str, Any] = {
    "object": "sae_readout",
    "positions": "generated",
    "prompt_tokens": 5,
    "saes": {
        "fake-sae": {
            "layer": 3,
            "positions": [5, 6],
            "token_ids": [11, 12],
            "tokens": ["a", "b"],
            "top_k": [[[4, 1.5], [9, 0.5]], [[4, 1.0]]],
        }
    },
}


def _srv(port: int) -> ServerProcess:
    return ServerProcess(proc=None, host="127.0.0.1", port=port, log=Path("x"))  # type: ignore[arg-type]


def test_scenarios_say_which_requests_read_and_steer() -> None:
    for conc in (16, 64):
        sc = scenarios(conc)
        assert set(sc) == {key for _, key, _ in ROWS}
        assert all(len(v) == conc for v in sc.values())
        assert sc["readout/none"] == [None] * conc
        for key in ("readout/read", "readout/read+steer"):
            for s in sc[key]:
                assert s is not None and s.readout is not None
                assert s.readout.positions == "generated"
                assert [(r.sae, r.top_k, r.features) for r in s.readout.saes] == [(SAE_NAME, 8, [])]
        assert not any(s and s.steers for s in sc["readout/read"])
        for s in sc["readout/read+steer"]:  # plugin_speed's steering: 4 clamps, one SAE
            assert s is not None and len(s.interventions) == 4
            assert {(i.sae, i.mode) for i in s.interventions} == {(SAE_NAME, "clamp")}  # type: ignore[union-attr]
        half = sc["readout/half"]
        assert [s is not None for s in half] == [i % 2 == 0 for i in range(conc)]
        assert all(s is None or (s.readout and not s.steers) for s in half)
    stock, server = _srv(1), _srv(2)
    plan = readout_plan(stock, server)
    assert [c.key for c in plan] == [
        f"{k}/{conc}" for conc in (16, 64) for k in ["stock/none", *scenarios(conc)]
    ]
    assert all((c.server is stock) == c.key.startswith("stock/") for c in plan)


def test_bytes_per_token() -> None:
    assert bytes_per_token([100, 200], [1100, 1300], [10, 30]) == pytest.approx(2100 / 40)
    assert bytes_per_token([500], [400], [10]) == -10.0  # reported as measured
    for bad in (([], [], []), ([1], [2, 3], [4, 5]), ([1], [2], [0])):
        with pytest.raises(ValueError):
            bytes_per_token(*bad)


def test_tables() -> None:
    cells = {"stock/none/16": 80.0, "stock/none/64": 160.0}
    cells |= {f"{k}/16": 80.0 * (1 - 0.05 * i) for i, (_, k, _) in enumerate(ROWS)}
    cells |= {f"{k}/64": 160.0 * (1 - 0.1 * i) for i, (_, k, _) in enumerate(ROWS)}
    r = ratios(cells)
    assert r["readout/none/16"] == 1.0 and r["readout/read+steer/64"] == pytest.approx(0.8)
    # plugin_speed's table (the README's) is unchanged: no goal column
    plain = ratio_table([("half steered", None, "readout/half/64")], cells)
    assert plain == [
        "| setting | 16 concurrent tok/s | ratio | 64 concurrent tok/s | ratio |",
        "|---|---|---|---|---|",
        "| stock vLLM | 80.0 | 1.00 | 160.0 | 1.00 |",
        "| half steered | – | – | 112.0 | 0.700 |",
    ]
    sizes = ResponseBytes(
        requests=8,
        max_tokens=32,
        plain_bytes=8000,
        readout_bytes=29000,
        generated_tokens=256,
        read_positions=248,
        same_text=8,
        bytes_per_token=21000 / 256,
    )
    text = readout_table(cells, "Memory (PSS) ...", sizes).splitlines()
    assert text[0].endswith("| ratio | goal |") and text[1] == "|---|---|---|---|---|---|"
    assert text[2] == "| stock vLLM | 80.0 | 1.00 | 160.0 | 1.00 | – |"
    assert text[4] == (
        "| (a) readout on every request (1 SAE, top-8, generated) | 76.0 | 0.950 "
        "| 144.0 | 0.900 | ≥ 0.90 |"
    )
    assert text[6].startswith("| (c) half") and text[6].endswith("| – |")
    assert text[8] == "Memory (PSS) ..."
    assert "adds 82 bytes per generated token" in text[10]
    assert "8,000 bytes without, 29,000 with; 248 positions read; 8/8 pairs" in text[10]


def test_servers_differ_only_in_the_plugin_flags(tmp_path: Path) -> None:
    ap = argparse.ArgumentParser()
    add_harness_args(ap, out=tmp_path / "r.json", tokens=32, reps=3)
    args = ap.parse_args(["--model", "/m/SmolLM2", "--sae", "/s/sae", "--extra=--enforce-eager"])
    h = Harness.from_args(args)
    stock, served = h.command(None, 1234), h.command(["--readout"], 1234)
    assert stock[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert served[1:4] == ["-m", "sae_steer_vllm.cli", "serve"]
    assert served[4:] == [*stock[3:], "--sae", f"{SAE_NAME}=/s/sae", "--readout"]
    assert "--enforce-eager" in stock and stock[stock.index("--dtype") + 1] == "float32"
    assert stock[stock.index("--served-model-name") + 1] == "SmolLM2"


def _no_readout(body: dict[str, Any]) -> Reply:
    """A server that accepts the spec but never reads (what the benchmark must catch)."""
    status, payload = FakeModel(readout=READOUT).respond(body)
    payload.pop("sae_readout", None)
    return status, payload


def test_measure_once_refuses_a_cell_without_its_readouts() -> None:
    read = readout_spec("fake-sae")
    with FakeServer(FakeModel(readout=READOUT)) as srv:
        assert measure_once(srv.base_url, "fake-model", [read, None, read], 4) > 0
    with FakeServer(respond=_no_readout) as srv:
        assert measure_once(srv.base_url, "fake-model", [None, None], 4) > 0
        with pytest.raises(RuntimeError, match="2 of 2 readout requests got no sae_readout"):
            measure_once(srv.base_url, "fake-model", [read, None, read], 4)
    with FakeServer() as srv, pytest.raises(RuntimeError, match="requests failed"):
        measure_once(srv.base_url, "fake-model", [read], 4)  # started without readout


def test_response_bytes_measures_the_raw_bodies() -> None:
    read = readout_spec("fake-sae")
    prompts = ["P1: what is 1 + 2?", "P2: what is 2 + 3?"]
    with FakeServer(FakeModel(readout=READOUT)) as srv:
        b = asyncio.run(
            response_bytes(srv.base_url, "fake-model", read, prompts=prompts, max_tokens=8)
        )
        bodies = srv.requests
    assert [("vllm_xargs" in x, x.get("stream", False)) for x in bodies] == [
        (False, False),
        (False, False),
        (True, False),
        (True, False),
    ]
    assert all(x["ignore_eos"] and x["max_tokens"] == 8 for x in bodies)
    # the fake writes json.dumps(payload): the readout adds exactly its key, value and ", "
    added = len(f'"sae_readout": {json.dumps(READOUT)}, ')
    assert b.requests == 2 and b.same_text == 2 and b.read_positions == 4
    assert b.readout_bytes - b.plain_bytes == 2 * added
    assert b.bytes_per_token == pytest.approx(2 * added / b.generated_tokens)
    with FakeServer(respond=_no_readout) as srv, pytest.raises(RuntimeError, match="has no"):
        asyncio.run(response_bytes(srv.base_url, "fake-model", read, prompts=prompts, max_tokens=8))
    with FakeServer() as srv, pytest.raises(RuntimeError, match="HTTP 400"):
        asyncio.run(response_bytes(srv.base_url, "fake-model", read, prompts=prompts, max_tokens=8))


class _Endpoint:
    """What the harness needs of a started server, backed by a scripted endpoint."""

    def __init__(self, fake: FakeServer) -> None:
        self.base_url, self.pid = fake.base_url, os.getpid()


def test_main_writes_the_result_and_the_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    stock = FakeServer(FakeModel(sae=SAE_NAME))
    served = FakeServer(FakeModel(sae=SAE_NAME, readout=READOUT))

    @contextlib.contextmanager
    def serving(self: Harness, servers: dict[str, list[str] | None]) -> Iterator[dict[str, Any]]:
        assert servers == {"stock": None, "readout": ["--readout"]}
        with stock, served:
            yield {"stock": _Endpoint(stock), "readout": _Endpoint(served)}

    monkeypatch.setattr(Harness, "serving", serving)
    out = tmp_path / "r.json"
    argv = ["--model", "/m/fake-model", "--sae", "/s/sae", "--tokens", "3", "--reps", "1"]
    assert readout_main([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    keys = {f"{k}/{c}" for c in (16, 64) for k in ["stock/none", *scenarios(c)]}
    assert set(res["cells"]) == keys and all(len(v) == 1 for v in res["samples"].values())
    assert set(res["ratios"]) == keys - {"stock/none/16", "stock/none/64"}
    assert res["response_bytes"]["requests"] == 8 and res["response_bytes"]["bytes_per_token"] > 0
    assert res["pss_mb"]["after_runs"]["readout"] > 0
    assert res["table_md"] in capsys.readouterr().out
    assert res["table_md"].splitlines()[0].endswith("| goal |")
    # every request of a readout cell asked for it (plus 16 warming the readout path up),
    # the stock cells never did
    sent = [b for b in served.requests if b.get("stream")]
    assert sum("vllm_xargs" in b for b in sent) == (16 + 16 + 8 + 64 + 64 + 32) + 16
    assert not any("vllm_xargs" in b for b in stock.requests)


def test_plugin_speed_main_on_the_shared_harness(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.plugin_speed import main as plugin_main
    from sae_steer_vllm.sae import random_sae

    random_sae(tmp_path / "sae", d_in=8, d_sae=64, layer=1, with_stats=False)
    stock, served = FakeServer(FakeModel(sae=SAE_NAME)), FakeServer(FakeModel(sae=SAE_NAME))

    @contextlib.contextmanager
    def serving(self: Harness, servers: dict[str, list[str] | None]) -> Iterator[dict[str, Any]]:
        assert servers == {"stock": None, "plugin": []}
        with stock, served:
            yield {"stock": _Endpoint(stock), "plugin": _Endpoint(served)}

    monkeypatch.setattr(Harness, "serving", serving)
    out = tmp_path / "p.json"
    argv = ["--model", "/m/fake-model", "--sae", str(tmp_path / "sae"), "--tokens", "2"]
    assert plugin_main([*argv, "--reps", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert len(res["cells"]) == 9 and res["plugin_rss_mb_after"] > 0
    assert res["table_md"].splitlines()[-3] == "| 64 distinct specs | – | – | " + (
        f"{res['cells']['plugin/distinct64/64']:.1f} | "
        f"{res['cells']['plugin/distinct64/64'] / res['cells']['stock/none/64']:.3f} |"
    )
    assert res["table_md"] in capsys.readouterr().out
