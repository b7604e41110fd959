"""``sae-steer inspect``: rendering a readout, and the command against a scripted endpoint.

The readout is hand-built (no model): what is checked is what a person sees (tokens,
features, colours on and off, escaping of hostile tokens, links to existing dashboard pages
only), what the command sends (the readout spec in ``vllm_xargs``) and its exit codes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from helpers.chromium import chromium_or_skip, dump_dom, orange_pixels, screenshot_pixels
from helpers.fake_endpoint import FakeModel, FakeServer, chat_response

from benchmarks.inspect_cli import InspectConfig, build_spec, inspect_once, main
from benchmarks.readout_view import ANSI_RAMP, dashboard_links, render_html, render_terminal
from benchmarks.server_process import free_port
from sae_steer_vllm.cli import main as cli_main
from sae_steer_vllm.errors import EXIT_FAILED, EXIT_UNREACHABLE, EXIT_USAGE, UsageError
from sae_steer_vllm.readout_api import SAEReadoutResponse
from sae_steer_vllm.spec import FeatureIntervention, ReadoutSpec, SAEReadout, SteeringSpec

SAE = "fake-sae"
HOSTILE = "<script>alert(1)</script>"
TOKENS = ["<|user|>", "What", " is", " 17*3", "?\n", "<|assistant|>", "Wait", HOSTILE, "\x1b[31m"]
TOP = [
    [(5, 0.4)],
    [(412, 1.1), (77, 0.3)],
    [],
    [(77, 2.0), (5, 0.5)],
    [(3, 0.2)],
    [(5, 0.9)],
    [(412, 4.0), (77, 1.5), (3, 0.1)],
    [(77, 1.2)],
    [(3, 0.7)],
]
WATCH = [412, 3]
WATCHED = [[0.0, 0.0], [1.1, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.2], [0.0, 0.0]]
WATCHED += [[4.0, 0.1], [0.0, 0.0], [0.0, 0.7]]
PROMPT_TOKENS = 6


def sample_readout() -> SAEReadoutResponse:
    n = len(TOKENS)
    return SAEReadoutResponse.model_validate(
        {
            "positions": "all",
            "prompt_tokens": PROMPT_TOKENS,
            "saes": {
                SAE: {
                    "layer": 3,
                    "positions": list(range(n)),
                    "token_ids": list(range(100, 100 + n)),
                    "tokens": TOKENS,
                    "top_k": TOP,
                    "features": WATCH,
                    "watched": WATCHED,
                    "summary": {
                        "412": {"tokens": 3, "mean": 4 / 3, "max": 4.0, "active_fraction": 1 / 3},
                        "3": {"tokens": 3, "mean": 0.8 / 3, "max": 0.7, "active_fraction": 2 / 3},
                    },
                }
            },
        }
    )


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self.hrefs.append(str(dict(attrs).get("href")))
        if tag == "script":
            self.scripts += 1


def _dashboard(root: Path, features: list[int]) -> Path:
    dash = root / "dash"
    dash.mkdir()
    (dash / "index.html").write_text("<html></html>")
    for f in features:
        (dash / f"feature_{f}.html").write_text(f"<html>{f}</html>")
    return dash


# ----------------------------------------------------------------- rendering
def test_terminal_view_shows_tokens_features_and_summary() -> None:
    plain = render_terminal(sample_readout(), color=False, completion_tokens=4)
    assert "\x1b" not in plain  # no colour codes, and the hostile ESC token is escaped
    assert "\\x1b[31m" in plain
    assert "What is 17*3?↵" in plain and "Wait" + HOSTILE in plain
    assert "SAE fake-sae (layer 3), positions all: 6 prompt + 3 generated tokens read" in plain
    assert "1 generated token not read: the model never reads its last token" in plain
    assert "strongest: 4.000 (f412 at position 6)" in plain
    # the per-token table: position, g for generated, token repr, watched values, top features
    row = next(line for line in plain.splitlines() if line.strip().startswith("6  g "))
    assert "'Wait'" in row and "f412:4.00 f77:1.50 f3:0.10" in row
    assert re.search(r"4\.000\s+0\.100", row)
    # the summary of the watched features
    assert re.search(r"f412\s+1\.333\s+4\.000\s+33\.3%", plain)
    assert re.search(r"f3\s+0\.267\s+0\.700\s+66\.7%", plain)

    coloured = render_terminal(sample_readout(), color=True)
    black_on = "\x1b[38;5;16m"
    assert f"\x1b[48;5;{ANSI_RAMP[-1]}m{black_on}Wait\x1b[0m" in coloured  # the strongest
    assert "\x1b[0m is\x1b[48;5;" in coloured  # nothing active at " is": left plain
    assert "\x1b[31m" not in coloured  # the model's ESC never reaches the terminal raw

    # top_k 0 (watch list only): the watched values colour the tokens
    watch_only = sample_readout().model_dump()
    watch_only["saes"][SAE]["top_k"] = [[] for _ in TOKENS]
    text = render_terminal(SAEReadoutResponse.model_validate(watch_only), color=False)
    assert "strongest: 4.000 (a watched feature at position 6)" in text


def test_html_escapes_tokens_and_links_only_existing_pages(tmp_path: Path) -> None:
    readout = sample_readout()
    dash = _dashboard(tmp_path, [412, 9999])
    out_dir = tmp_path / "views"
    links = dashboard_links(dash, out_dir, [412, 77, 3, 5])
    assert links == {412: "../dash/feature_412.html"}
    page = render_html(readout, links={SAE: links}, completion_tokens=4)
    assert HOSTILE not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\x1b" not in page and "\\x1b[31m" in page  # control characters shown escaped
    parsed = _Links()
    parsed.feed(page)
    assert parsed.scripts == 1  # only our own script; the token is text
    assert set(parsed.hrefs) == {"../dash/feature_412.html"}
    assert '<span class="feature">f77</span>' in page
    assert page.count('class="tok"') == len(TOKENS)
    assert page.count('class="summary-row"') == len(WATCH)
    assert "src=" not in page and "<link" not in page  # standalone: no external asset
    # no dashboard: no links at all
    assert "<a " not in render_html(readout)


def test_dashboard_folder_is_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="no such folder"):
        dashboard_links(tmp_path / "absent", tmp_path, [1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UsageError, match="not a folder written by sae-steer dashboard"):
        dashboard_links(tmp_path / "empty", tmp_path, [1])


def test_html_renders_in_headless_chromium(tmp_path: Path) -> None:
    chromium = chromium_or_skip()
    page = tmp_path / "view.html"
    dash = _dashboard(tmp_path, [412])
    links = {SAE: dashboard_links(dash, tmp_path, [412, 77])}
    page.write_text(render_html(sample_readout(), links=links))
    dom = dump_dom(chromium, page, tmp_path / "profile")
    # the script ran: the panel shows the strongest token's details, with the dashboard link
    panel = dom.split('class="panel">', 1)[1].split('<div class="details">', 1)[0]
    assert "position 6" in panel and "'Wait'" in panel
    assert 'href="dash/feature_412.html"' in panel
    assert 'class="tok sel"' in dom
    assert "<script>alert" not in dom.split("<body>", 1)[1].split("<script>", 1)[0]
    # "#f3": coloured by the watched feature 3 instead (max 0.7 at position 8)
    styles = dict(
        re.findall(
            r'data-pos="(\d+)"[^>]*style="background: ([^;"]*)',
            dump_dom(chromium, page, tmp_path / "profile", "#f3"),
        )
    )
    assert styles["8"] == "rgb(255, 140, 0)" and styles["6"] == "rgba(255, 140, 0, 0.14)"
    assert styles["1"] == "transparent"  # f412 fires there, f3 does not
    px = screenshot_pixels(chromium, page, tmp_path / "profile")
    assert float(px.std()) > 10.0, "screenshot is blank"
    assert orange_pixels(px) > 50  # the token shading is really drawn


# ----------------------------------------------------------------- the command
@pytest.fixture
def server() -> Iterator[FakeServer]:
    with FakeServer(FakeModel(sae=SAE, readout=sample_readout().model_dump())) as s:
        yield s


def _sent_spec(server: FakeServer) -> SteeringSpec:
    return SteeringSpec.from_json(server.requests[-1]["vllm_xargs"]["steering"])


def test_cli_end_to_end(
    server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dash = _dashboard(tmp_path, [77])
    html_out = tmp_path / "out" / "view.html"
    argv = ["--base-url", server.base_url, "--sae", SAE, "--top-k", "5", "--watch", "412,3"]
    argv += ["--positions", "generated", "--max-tokens", "7"]
    argv += ["--html", str(html_out), "--dashboard", str(dash), "What is 17*3?"]
    assert main(argv) == 0
    body = server.requests[-1]
    assert body["messages"] == [{"role": "user", "content": "What is 17*3?"}]
    assert body["max_tokens"] == 7 and body["model"] == server.model_name
    assert _sent_spec(server) == SteeringSpec(
        readout=ReadoutSpec(
            saes=[SAEReadout(sae=SAE, top_k=5, features=[412, 3])], positions="generated"
        )
    )
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # captured stdout is not a terminal: no colour
    assert "f412:4.00" in out and "Wait" in out and f"wrote {html_out}" in out
    page = html_out.read_text()
    assert 'href="../dash/feature_77.html"' in page and "feature_412.html" not in page


def test_cli_chat_file_and_steering(server: FakeServer, tmp_path: Path) -> None:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    steer = SteeringSpec(interventions=[FeatureIntervention(sae=SAE, feature=412, strength=2)])
    (tmp_path / "steer.json").write_text(steer.to_json())
    argv = ["--base-url", server.base_url, "--model", server.model_name, "--sae", SAE]
    argv += ["--chat", str(tmp_path / "chat.json"), "--steer", str(tmp_path / "steer.json")]
    assert main([*argv, "--no-color"]) == 0
    assert server.requests[-1]["messages"] == chat
    sent = _sent_spec(server)
    assert sent.interventions == steer.interventions
    assert sent.readout == ReadoutSpec(saes=[SAEReadout(sae=SAE)])


def test_inspect_once_returns_the_readout(server: FakeServer) -> None:
    got = inspect_once(server.base_url, None, InspectConfig(sae=SAE, prompt="hi", watch=[3]))
    assert got == sample_readout()


def test_refused_requests_exit_2_with_the_servers_message(
    server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--base-url", server.base_url, "--sae", "nope", "hi"]) == EXIT_USAGE
    assert "HTTP 400: steering: readout.saes.0: unknown SAE 'nope'" in capsys.readouterr().err
    with FakeServer(FakeModel(sae=SAE, readout=None)) as plain:
        assert main(["--base-url", plain.base_url, "--sae", SAE, "hi"]) == EXIT_USAGE
    assert "started without readout support" in capsys.readouterr().err


def test_unreachable_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    assert main(["--base-url", url, "--model", "m", "--sae", SAE, "hi"]) == EXIT_UNREACHABLE
    assert "cannot reach the server" in capsys.readouterr().err
    assert main(["--base-url", url, "--sae", SAE, "hi"]) == EXIT_UNREACHABLE


def test_response_without_readout_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with FakeServer(respond=lambda body: (200, chat_response(body["model"], "hello"))) as s:
        assert main(["--base-url", s.base_url, "--sae", SAE, "hi"]) == EXIT_FAILED
    assert "carries no 'sae_readout'" in capsys.readouterr().err
    # a readout whose lists do not line up, or that misses the SAE asked for
    bad = sample_readout().model_dump()
    bad["saes"][SAE]["tokens"] = TOKENS[:-1]
    with FakeServer(FakeModel(sae=SAE, readout=bad)) as s:
        assert main(["--base-url", s.base_url, "--sae", SAE, "hi"]) == EXIT_FAILED
    assert "has 9 positions but 8 tokens" in capsys.readouterr().err
    other = sample_readout().model_dump()
    other["saes"] = {"other": other["saes"][SAE]}
    with FakeServer(FakeModel(sae=SAE, readout=other)) as s:
        assert main(["--base-url", s.base_url, "--sae", SAE, "hi"]) == EXIT_FAILED
    assert "no entry for SAE 'fake-sae'" in capsys.readouterr().err


def test_registered_as_a_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli_main(["inspect", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sae-steer inspect" in out and "--watch A,B,..." in out
    assert "--no-color" in out and "registered SAE to read" in out  # docstrings are the help


def test_bad_input_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # never contacted: refused before the request
    base = ["--base-url", url, "--sae", SAE]
    assert main(base) == EXIT_USAGE
    assert "give a PROMPT or --chat FILE" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('[{"role": "user"}]')
    assert main([*base, "--chat", str(tmp_path / "bad.json")]) == EXIT_USAGE
    assert "expected a JSON list of {role, content} messages" in capsys.readouterr().err
    assert main([*base, "--watch", "3,3", "hi"]) == EXIT_USAGE
    assert "features lists a feature twice" in capsys.readouterr().err
    with_readout = SteeringSpec(readout=ReadoutSpec(saes=[SAEReadout(sae=SAE)]))
    (tmp_path / "steer.json").write_text(with_readout.to_json())
    assert main([*base, "--steer", str(tmp_path / "steer.json"), "hi"]) == EXIT_USAGE
    assert main([*base, "--dashboard", str(tmp_path), "hi"]) == EXIT_USAGE
    assert "give --html too" in capsys.readouterr().err
    html_opts = ["--html", str(tmp_path / "v.html"), "--dashboard", str(tmp_path), "hi"]
    assert main([*base, *html_opts]) == EXIT_USAGE  # no index.html: not a dashboard
    assert "not a folder written by sae-steer dashboard" in capsys.readouterr().err
    assert build_spec(InspectConfig(sae=SAE, prompt="x")).readout is not None


@pytest.mark.server
def test_inspect_against_the_real_server(
    steer_server: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``sae-steer inspect`` against the suite's server (started with --readout): the terminal
    table lists every read position, the HTML page is written, and the readout it parsed is
    the server's own (a steered request whose clamp shows at the clamped layer's SAE)."""
    html = tmp_path / "view.html"
    argv = ["--base-url", steer_server.base_url, "--sae", steer_server.sae_name]
    argv += ["--watch", "3,5", "--max-tokens", "6", "--html", str(html), "--no-color"]
    assert main([*argv, "The sea is"]) == 0
    out = capsys.readouterr().out
    ro = inspect_once(
        steer_server.base_url,
        None,
        InspectConfig(sae=steer_server.sae_name, prompt="The sea is", watch=[3, 5], max_tokens=6),
    )
    res = ro.saes[steer_server.sae_name]
    assert res.positions == list(range(len(res.positions))) and not res.missing_positions
    assert len(res.positions) == ro.prompt_tokens + 5  # 6 generated, the last never read
    for p, tok in zip(res.positions, res.tokens, strict=True):
        assert re.search(rf"^\s*{p}\s+[pg]\s+{re.escape(repr(tok))}", out, re.M), (p, tok)
    assert "f3" in out and "f5" in out
    page = html.read_text()
    assert "<html" in page.lower() and html.stat().st_size > 1000
