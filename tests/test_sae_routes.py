"""``/v1/saes`` over HTTP without an engine: the two sae-steer middlewares in a bare
Starlette app (in the order ``sae-steer serve`` installs them), whose "engine" hands the
collective RPCs to real per-worker steering states, two as two tensor-parallel ranks
would be. The same routes on the real server: tests/test_sae_registry.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from helpers.registry import D, FakeEngine, fake_vllm_config, registry_config, worker_state

from sae_steer_vllm.plugin_config import PluginConfig
from sae_steer_vllm.sae import random_sae
from sae_steer_vllm.sae_api import SAEList


def _client(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    api_key: str | None = None,
    rank2: PluginConfig | None = None,
    extension: str | None = None,
    **over: Any,
) -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from sae_steer_vllm import worker_steering
    from sae_steer_vllm.middleware import SteeringMiddleware
    from sae_steer_vllm.sae_routes import SAERoutes

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    config = registry_config(tmp_path, **over)
    vc = fake_vllm_config(config, extension)
    ranks = [worker_state(vc), worker_state(fake_vllm_config(rank2) if rank2 else vc)]

    async def echo(request: Request) -> JSONResponse:
        body = await request.json()
        while body.get("wait") and not RELEASE.is_set():  # a request that keeps running
            await asyncio.sleep(0.01)
        return JSONResponse(body)

    app = Starlette(routes=[Route("/v1/chat/completions", echo, methods=["POST"])])
    app.state.vllm_config = vc
    app.state.args = Namespace(api_key=[api_key] if api_key else None)
    app.state.engine_client = FakeEngine(
        ranks, lambda ws: monkeypatch.setattr(worker_steering, "_WORKER", ws)
    )
    app.add_middleware(SteeringMiddleware)  # the order `sae-steer serve` installs them in
    app.add_middleware(SAERoutes)
    client = TestClient(app)
    client.__enter__()  # one event loop for every request, as in a server
    monkeypatch.setattr(client, "ranks", ranks, raising=False)
    CLIENTS.append(client)
    return client


RELEASE = threading.Event()
CLIENTS: list[Any] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    yield
    while CLIENTS:
        CLIENTS.pop().__exit__(None, None, None)
    RELEASE.clear()


def _chat(client: Any, sae: str, wait: bool = False) -> Any:
    spec = {"interventions": [{"sae": sae, "feature": 3, "value": 2.0}]}
    body = {"model": "m", "messages": [], "vllm_xargs": {"steering": json.dumps(spec)}}
    return client.post("/v1/chat/completions", json=body | ({"wait": True} if wait else {}))


def test_register_steer_and_delete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(tmp_path, monkeypatch)
    random_sae(tmp_path / "root" / "saes" / "new", d_in=D, d_sae=16, layer=6, with_stats=False)
    assert _chat(client, "new").status_code == 400  # unknown before registration

    r = client.post("/v1/saes", json={"name": "new", "path": "saes/new"})
    assert r.status_code == 200, r.text
    assert r.json()["layer"] == 6 and r.json()["runtime"] and not r.json()["has_statistics"]
    listed = SAEList.model_validate(client.get("/v1/saes").json())
    assert "new" in listed.by_name()
    assert client.get("/v1/saes/new").json()["d_sae"] == 16
    for ws in client.ranks:  # every rank has it, with its rows opened
        assert "new" in ws.catalog.saes

    r = _chat(client, "new")
    assert r.status_code == 200 and r.json()["cache_salt"].startswith("steer-")  # admitted
    plans = [ws.plan_for(SimpleNamespace(extra_args=r.json()["vllm_xargs"])) for ws in client.ranks]
    assert all(p is not None and len(p.layers[6].entries) == 1 for p in plans)

    assert client.post("/v1/saes", json={"name": "new", "path": "saes/new"}).status_code == 409
    r = client.delete("/v1/saes/new")
    assert r.status_code == 200 and r.json()["deleted"]
    assert all("new" not in ws.catalog.saes for ws in client.ranks)
    assert _chat(client, "new").status_code == 400
    assert client.delete("/v1/saes/new").status_code == 404


def test_delete_refused_while_a_request_uses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Admission leases the spec's SAEs until the response is sent: DELETE waits for it."""
    from sae_steer_vllm.server_saes import server_saes

    client = _client(tmp_path, monkeypatch)
    running = threading.Thread(target=_chat, args=(client, "std", True))
    running.start()
    saes = server_saes({"app": client.app})
    deadline = time.monotonic() + 30
    while not saes.in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    r = client.delete("/v1/saes/std")
    assert r.status_code == 409 and "in use by 1 running request" in r.json()["error"]["message"]
    assert "std" in saes.catalog.saes
    RELEASE.set()
    running.join(30)
    assert not saes.in_use
    assert client.delete("/v1/saes/std").status_code == 200
    assert _chat(client, "std").status_code == 400


def test_refusals_are_json_4xx(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(tmp_path, monkeypatch)
    root = tmp_path / "root"
    random_sae(root / "l4", d_in=D, d_sae=16, layer=4)
    random_sae(tmp_path / "outside", d_in=D, d_sae=16, layer=6)
    (root / "broken").mkdir()
    cases = [
        ({"name": "x", "path": "l4"}, 400, "layers [2, 5, 6]"),
        ({"name": "x", "path": "../outside"}, 400, "outside the server's --sae-root"),
        ({"name": "x", "path": str(tmp_path / "outside")}, 400, "relative"),
        ({"name": "x", "path": "missing"}, 400, "<sae-root>/missing"),
        ({"name": "x", "path": "broken"}, 400, "cfg.json"),
        ({"name": "std", "path": "l4"}, 409, "already registered"),
        ({"name": "x"}, 400, "exactly one"),
        ({"name": "x", "hf": "not a repo"}, 400, "owner/repo"),
    ]
    for body, status, needle in cases:
        r = client.post("/v1/saes", json=body)
        assert r.status_code == status, (body, r.text)
        assert needle in r.json()["error"]["message"], (body, r.text)
        assert str(tmp_path) not in r.text  # no server paths in answers
    for raw in (b"{not json", b"[" * 60_000, b"\xff\xfe", b""):
        r = client.post("/v1/saes", content=raw)
        assert r.status_code == 400, raw[:10]
    assert client.post("/v1/saes", content=b"x" * (70 * 1024)).status_code == 413
    assert client.put("/v1/saes").status_code == 405
    assert client.get("/v1/saes/none").status_code == 404
    assert client.get("/v1/saes").status_code == 200  # still serving


def test_a_failing_rank_rolls_the_others_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 2 has no tables on layer 6 (a mismatched launch): nothing stays registered."""
    rank2 = registry_config(tmp_path, steerable_layers="5")
    client = _client(tmp_path, monkeypatch, rank2=rank2)
    random_sae(tmp_path / "root" / "l6", d_in=D, d_sae=16, layer=6)
    r = client.post("/v1/saes", json={"name": "l6", "path": "l6"})
    assert r.status_code == 400 and "no steering tables" in r.json()["error"]["message"]
    assert all("l6" not in ws.catalog.saes for ws in client.ranks)
    assert "l6" not in client.get("/v1/saes").json()["data"]


def test_updates_are_off_by_default_and_need_the_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _client(tmp_path, monkeypatch, allow_runtime_sae_updates=False)
    assert client.get("/v1/saes").json()["runtime_updates"]["enabled"] is False
    r = client.post("/v1/saes", json={"name": "x", "path": "y"})
    assert r.status_code == 403 and "--allow-runtime-sae-updates" in r.text
    assert client.delete("/v1/saes/std").status_code == 403
    client = _client(tmp_path, monkeypatch, extension="")
    r = client.post("/v1/saes", json={"name": "x", "path": "y"})
    assert r.status_code == 403 and "--worker-extension-cls" in r.text


def test_api_key_guards_the_routes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _client(tmp_path, monkeypatch, api_key="sekrit")
    random_sae(tmp_path / "root" / "l5", d_in=D, d_sae=16, layer=5)
    body = {"name": "l5", "path": "l5"}
    assert client.get("/v1/saes").status_code == 401
    assert client.post("/v1/saes", json=body).status_code == 401
    assert client.delete("/v1/saes/std").status_code == 401
    bad = {"Authorization": "Bearer wrong"}
    assert client.post("/v1/saes", json=body, headers=bad).status_code == 401
    assert "l5" not in client.ranks[0].catalog.saes
    ok = {"Authorization": "Bearer sekrit"}
    assert client.get("/v1/saes", headers=ok).status_code == 200
    assert client.post("/v1/saes", json=body, headers=ok).status_code == 200
    assert client.delete("/v1/saes/l5", headers=ok).status_code == 200


def test_hf_source_reads_the_hub_cache_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``"hf": "owner/repo/sub"`` resolves through huggingface_hub's cache; offline, a repo
    that is not cached is a 400 naming it."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--someone--saes"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    random_sae(repo / "snapshots" / commit / "layer5", d_in=D, d_sae=16, layer=5)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    client = _client(tmp_path, monkeypatch)
    r = client.post("/v1/saes", json={"name": "hub", "hf": "someone/saes/layer5"})
    assert r.status_code == 200, r.text
    assert r.json()["layer"] == 5
    random_sae(
        cache / "models--someone--saes" / "snapshots" / commit / "wide",
        d_in=D + 1,
        d_sae=4,
        layer=5,
    )
    r = client.post("/v1/saes", json={"name": "wide", "hf": "someone/saes/wide"})
    assert r.status_code == 400 and "<hf-cache>" in r.text and str(tmp_path) not in r.text
    r = client.post("/v1/saes", json={"name": "hub2", "hf": "someone/not-cached"})
    assert r.status_code == 400 and "someone/not-cached" in r.json()["error"]["message"]
