"""``sae-steer serve`` starts on the machine it documents, or says in one line why not.

* the CPU KV-cache size: vLLM's own memory reading (checked against vLLM's function), the
  auto rule on fake ``/sys`` trees, a user's ``VLLM_CPU_KVCACHE_SPACE`` or vLLM flag kept;
* the one-line diagnoses, from start-up failures captured from vLLM 0.32
  (``tests/data/vllm_startup``) and from fake vLLM processes under the real supervisor
  (exit codes, signal forwarding);
* the README's 30-second command names what ``make demo`` writes, on a port it leaves free;
* for real (slow): ``sae-steer serve`` comes up healthy with no ``VLLM_CPU_KVCACHE_SPACE``
  after the page cache has been warmed, and a taken port is one line and a quick exit.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sae_steer_vllm import cpu_memory, serve
from sae_steer_vllm.cpu_memory import (
    KV_ENV,
    GiB,
    KVCacheError,
    NodeMemory,
    auto_kv_cache_gib,
    kv_cache_env,
    node_memory,
    weight_bytes,
    worker_node,
)
from sae_steer_vllm.serve_launch import (
    SUPERVISOR,
    Failure,
    ServeStartError,
    diagnose,
    root_exception,
    supervise,
)

REPO = Path(__file__).resolve().parent.parent
CAPTURED = Path(__file__).parent / "data" / "vllm_startup"


# ------------------------------------------------------------------ memory as vLLM reads it
def _meminfo(kb: dict[str, int], node: int | None = None) -> str:
    pre = f"Node {node} " if node is not None else ""
    return "".join(f"{pre}{k}: {v:>12} kB\n" for k, v in kb.items())


def fake_root(
    tmp: Path,
    *,
    node: dict[str, int] | None = None,
    system: dict[str, int] | None = None,
    cgroup_v2: tuple[str, int] | None = None,
    cgroup_v1: tuple[int, int] | None = None,
    cpu0_node: int = 0,
    mems_allowed: str = "0",
) -> Path:
    """A ``/`` with only the files vLLM's memory reading looks at (values in kB)."""
    if node is not None:
        f = tmp / f"sys/devices/system/node/node{cpu0_node}/meminfo"
        f.parent.mkdir(parents=True)
        f.write_text(_meminfo(node, cpu0_node))
    (tmp / f"sys/devices/system/cpu/cpu0/node{cpu0_node}").mkdir(parents=True)
    (tmp / "proc").mkdir(exist_ok=True)
    (tmp / "proc/meminfo").write_text(_meminfo(system or {"MemTotal": 1, "MemFree": 1}))
    (tmp / "proc/self").mkdir()
    (tmp / "proc/self/status").write_text(f"Name:\tpython\nMems_allowed_list:\t{mems_allowed}\n")
    if cgroup_v2 is not None:
        (tmp / "sys/fs/cgroup").mkdir(parents=True, exist_ok=True)
        (tmp / "sys/fs/cgroup/memory.max").write_text(cgroup_v2[0] + "\n")
        (tmp / "sys/fs/cgroup/memory.current").write_text(f"{cgroup_v2[1]}\n")
    if cgroup_v1 is not None:
        (tmp / "sys/fs/cgroup/memory").mkdir(parents=True, exist_ok=True)
        (tmp / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text(f"{cgroup_v1[0]}\n")
        (tmp / "sys/fs/cgroup/memory/memory.usage_in_bytes").write_text(f"{cgroup_v1[1]}\n")
    return tmp


NODE = {  # the node of the report, in kB: 14 GiB total, a warm page cache
    "MemTotal": 14 * 1024 * 1024,
    "MemFree": 2 * 1024 * 1024,
    "MemUsed": 12 * 1024 * 1024,
    "Active(file)": 3 * 1024 * 1024,
    "Inactive(file)": 5 * 1024 * 1024,
    "SReclaimable": 1024 * 1024,
}


def test_node_memory_counts_the_page_cache_as_vllm_does(tmp_path: Path) -> None:
    mem = node_memory(0, fake_root(tmp_path, node=NODE))
    assert mem == NodeMemory(node=0, total=14 * GiB, available=(2 + 3 + 5 + 1) * GiB)


def test_cgroup_limit_and_its_page_cache_count(tmp_path: Path) -> None:
    """In a container vLLM clamps to the cgroup: usage there includes the page cache."""
    root = fake_root(tmp_path, node=NODE, cgroup_v2=(str(8 * GiB), 7 * GiB))
    assert node_memory(0, root) == NodeMemory(node=0, total=8 * GiB, available=GiB)


def test_cgroup_v1_and_unlimited_cgroups(tmp_path: Path) -> None:
    v1 = fake_root(tmp_path / "v1", node=NODE, cgroup_v1=(4 * GiB, GiB))
    assert node_memory(0, v1) == NodeMemory(node=0, total=4 * GiB, available=3 * GiB)
    unlimited = fake_root(tmp_path / "v2max", node=NODE, cgroup_v2=("max", 13 * GiB))
    assert node_memory(0, unlimited).available == 11 * GiB
    huge_v1 = fake_root(tmp_path / "v1huge", node=NODE, cgroup_v1=(1 << 63, 13 * GiB))
    assert node_memory(0, huge_v1).available == 11 * GiB


def test_no_numa_files_falls_back_to_memavailable(tmp_path: Path) -> None:
    root = fake_root(tmp_path, system={"MemTotal": 8 * 1024 * 1024, "MemAvailable": 3 * 1024**2})
    assert node_memory(0, root) == NodeMemory(node=0, total=8 * GiB, available=3 * GiB)


def test_worker_node_follows_the_first_cpu_and_the_allowed_nodes(tmp_path: Path) -> None:
    assert worker_node(fake_root(tmp_path / "a", cpu0_node=1, mems_allowed="0-1"), {0, 1}) == 1
    assert worker_node(fake_root(tmp_path / "b", cpu0_node=1, mems_allowed="0"), {0}) == 0


def test_node_memory_is_vllms_own_reading_here() -> None:
    """The mirror must not drift from vLLM's ``get_memory_node_info`` (memory moves between
    the two reads, hence the tolerance)."""
    from vllm.utils.cpu_resource_utils import get_allowed_cpu_list, get_memory_node_info

    node = worker_node()
    assert node == get_allowed_cpu_list()[0].numa_node
    ours, theirs = node_memory(node), get_memory_node_info(node)
    assert ours.total == theirs.total_memory
    assert abs(ours.available - theirs.available_memory) < 256 * 1024**2


# ------------------------------------------------------------------ the auto rule
def test_auto_size_keeps_weights_processes_and_half_the_rest() -> None:
    mem = NodeMemory(node=0, total=14 * GiB, available=12 * GiB)
    choice = auto_kv_cache_gib(mem, weights=GiB // 2)
    # 12 - 0.5 - 0.75 x 3 = 9.25 GiB spare, half of it: 4 GiB (whole GiB, rounded down)
    assert choice.gib == 4
    assert "4 GiB (auto: 12.0 of 14.0 GiB available on NUMA node 0" in choice.reason
    assert "\n" not in choice.reason


def test_auto_size_is_clamped_and_split_per_worker() -> None:
    big = NodeMemory(node=0, total=1024 * GiB, available=1000 * GiB)
    assert auto_kv_cache_gib(big, weights=16 * GiB).gib == cpu_memory.KV_MAX_GIB
    tp = auto_kv_cache_gib(NodeMemory(node=0, total=64 * GiB, available=40 * GiB), GiB, workers=4)
    # 40 - 1 - 0.75 x 6 = 34.5 spare, half = 17.25 over 4 workers: 4 GiB each
    assert tp.gib == 4 and "per worker (4 workers)" in tp.reason
    tight = NodeMemory(node=0, total=8 * GiB, available=4 * GiB)
    assert auto_kv_cache_gib(tight, weights=GiB // 2).gib == cpu_memory.KV_MIN_GIB


def test_too_little_memory_is_one_line_before_vllm_starts() -> None:
    mem = NodeMemory(node=0, total=14 * GiB, available=3 * GiB)
    with pytest.raises(KVCacheError) as e:
        auto_kv_cache_gib(mem, weights=GiB // 2)
    msg = str(e.value)
    assert "\n" not in msg and "3.0 of 14.0 GiB available" in msg and "--cpu-kv-cache-gib" in msg


def _safetensors(path: Path, shapes: dict[str, list[int]], dtype: str = "F32") -> None:
    word = {"F32": 4, "BF16": 2}[dtype]
    header: dict[str, object] = {}
    offset = 0
    for name, shape in shapes.items():
        n = word
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_weight_bytes_from_safetensors_headers_and_dtype(tmp_path: Path) -> None:
    _safetensors(tmp_path / "model.safetensors", {"a": [100, 10], "b": [24]}, dtype="BF16")
    assert weight_bytes(str(tmp_path), "float32") == 1024 * 4
    assert weight_bytes(str(tmp_path), "bfloat16") == 1024 * 2
    assert weight_bytes(str(tmp_path), None) == (tmp_path / "model.safetensors").stat().st_size
    config = {"hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 16, "vocab_size": 10}
    (tmp_path / "cfg-only").mkdir()
    (tmp_path / "cfg-only" / "config.json").write_text(json.dumps(config))
    assert (
        weight_bytes(str(tmp_path / "cfg-only"), "bfloat16")
        == (2 * (4 * 64 + 3 * 8 * 16) + 2 * 10 * 8) * 2
    )


# ------------------------------------------------------------------ whose size wins
def test_a_users_kvcache_space_or_vllm_flag_is_kept(tmp_path: Path) -> None:
    root = fake_root(tmp_path, node=NODE)
    env, line = kv_cache_env({KV_ENV: "7"}, ["--model", "m"], "auto", "m", root)
    assert env[KV_ENV] == "7" and "sized by you" in line and f"{KV_ENV}=7" in line
    for flag in (["--gpu-memory-utilization", "0.5"], ["--kv-cache-memory-bytes=1000000000"]):
        env, line = kv_cache_env({}, ["--model", "m", *flag], "auto", "m", root)
        assert KV_ENV not in env and flag[0].split("=")[0] in line


def test_auto_sets_the_env_and_an_explicit_size_wins(tmp_path: Path) -> None:
    root = fake_root(tmp_path, node=NODE)  # 11 GiB available of 14
    env, line = kv_cache_env({}, ["--model", "m"], "auto", "m", root)
    assert env[KV_ENV] == "4" and line.startswith("KV cache: 4 GiB (auto:")
    env, line = kv_cache_env({KV_ENV: "7"}, ["--model", "m"], "3", "m", root)
    assert env[KV_ENV] == "3" and "--cpu-kv-cache-gib" in line
    with pytest.raises(KVCacheError, match="give one of them"):
        kv_cache_env({}, ["--gpu-memory-utilization", "0.5"], "3", "m", root)
    with pytest.raises(ValueError, match="whole number"):
        cpu_memory.parse_setting("1.5")


def test_launch_plan_sets_the_kv_size_for_vllm_only(
    default_model: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ``sae-steer serve`` path up to the exec: the KV line on stderr, the env var
    for vLLM (which resolves to its CPU backend here), the lean supervisor's argv."""
    monkeypatch.setattr(
        cpu_memory, "node_memory", lambda node, root=None: NodeMemory(node, 14 * GiB, 11 * GiB)
    )
    port = _free_port()
    full = serve.build_vllm_args(["--model", str(default_model), "--port", str(port)], {})
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *full]
    environ = {k: v for k, v in os.environ.items() if k != KV_ENV}
    argv, env = serve.launch_plan(cmd, full, "auto", environ)
    assert argv[1:5] == ["-m", SUPERVISOR, "--port", str(port)] and argv[6:] == cmd
    assert env[KV_ENV] == "4"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sae-steer serve: KV cache: 4 GiB (auto:")
    _, env = serve.launch_plan(cmd, full, "auto", {**environ, KV_ENV: "2"})
    assert env[KV_ENV] == "2"


# ------------------------------------------------------------------ one-line diagnoses
@pytest.mark.parametrize(
    ("captured", "expect"),
    [
        ("startup_memory", "wants 0.99 of NUMA node 0's memory (13.95 GiB) free at start-up"),
        ("kv_cache_too_big", "the KV cache (60.0 GiB) does not fit: only 9.64 of 14.96 GiB"),
        ("port_in_use", "port 18431 is already in use: stop what listens there or pass --port"),
        ("bad_flag", "vLLM rejected a flag: unrecognized arguments: --no-such-flag"),
        ("max_model_len", "--max-model-len 100000 is longer than the model allows (8192)"),
    ],
)
def test_captured_vllm_failures_become_one_line(captured: str, expect: str) -> None:
    output = (CAPTURED / f"{captured}.txt").read_text()
    assert len(output.splitlines()) > 30, "the capture is vLLM's whole output"
    line = diagnose(Failure(output, 1, port=18431))
    assert expect in line and "\n" not in line and len(line) < 400


def test_root_cause_skips_vllms_wrapper_exceptions() -> None:
    output = (CAPTURED / "startup_memory.txt").read_text()
    assert "Engine core initialization failed" in output
    cause = root_exception(output)
    assert cause is not None and cause.startswith("ValueError: Available memory on node 0")
    unknown = "(EngineCore pid=3) ERROR 12-01 05:38:22 [core.py:1] KeyError: 'rope_scaling'\n"
    assert diagnose(Failure(unknown, 1)) == (
        "vLLM failed to start (code 1): KeyError: 'rope_scaling' (its output is above)"
    )
    assert "out-of-memory" in diagnose(Failure("loading weights\n", -signal.SIGKILL))
    assert (
        diagnose(Failure("", 3)) == "vLLM exited with code 3 while starting (its output is above)"
    )


def _fake_vllm(body: str) -> list[str]:
    return [sys.executable, "-c", "import os, signal, sys, time\n" + body]


def test_supervisor_tees_output_and_summarises_a_failed_start() -> None:
    failing = (CAPTURED / "port_in_use.txt").read_text()
    out, err = io.BytesIO(), io.BytesIO()
    child = _fake_vllm(
        f"sys.stdout.write({failing[:400]!r}); sys.stderr.write({failing!r}); sys.exit(1)"
    )
    with pytest.raises(ServeStartError, match=r"^port 8123 is already in use"):
        supervise(child, dict(os.environ), port=8123, stdout=out, stderr=err)
    assert out.getvalue().decode() == failing[:400] and err.getvalue().decode() == failing


def test_supervisor_passes_exit_codes_after_start() -> None:
    served = _fake_vllm("print('INFO:     Application startup complete.'); sys.exit(3)")
    assert supervise(served, dict(os.environ), stdout=io.BytesIO(), stderr=io.BytesIO()) == 3
    killed = _fake_vllm(
        "print('INFO:     Application startup complete.', flush=True); "
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert supervise(killed, dict(os.environ), stdout=io.BytesIO(), stderr=io.BytesIO()) == 137
    assert supervise(_fake_vllm("pass"), dict(os.environ)) == 0


def test_supervisor_forwards_a_signal_sent_to_its_pid_only() -> None:
    """``kill PID`` (not the group) reaches vLLM through the supervisor, whose exit code is
    then vLLM's; a signal that stops vLLM during start-up is not a start-up failure."""
    child = (
        "signal.signal(signal.SIGTERM, lambda s, f: (print('child got', s, flush=True), "
        "sys.exit(7)))\n"
        "print('INFO:     Application startup complete.', flush=True)\n"
        "time.sleep(60)\n"
    )
    for ready in (True, False):
        body = child if ready else child.replace("Application startup complete", "loading")
        proc = subprocess.Popen(
            [sys.executable, "-m", SUPERVISOR, "--", *_fake_vllm(body)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its group is not pytest's
            cwd=REPO,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert ("startup complete" if ready else "loading") in first
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert "child got 15" in out
        assert proc.returncode == 7, err
        assert "error" not in err


# ------------------------------------------------------------------ the README's command
def test_readme_30_second_command_serves_what_make_demo_writes() -> None:
    """After ``make demo`` (which leaves its server running) the README's command must work
    as written: its SAE folder is the demo's, its port is not the demo server's."""
    from benchmarks.demo.config import DemoConfig, load_config

    readme = (REPO / "README.md").read_text()
    section = readme.split("## Steer a served model in 30 seconds", 1)[1].split("\n## ", 1)[0]
    cmd = re.search(r"```bash\n(.*?sae-steer serve .*?)\n```", section, re.S)
    assert cmd, "the 30-second section lost its serve command"
    words = shlex.split(cmd.group(1), comments=True)
    name, path = words[words.index("--sae") + 1].split("=", 1)
    port = int(words[words.index("--port") + 1])
    demo = DemoConfig()
    assert load_config(REPO / "configs" / "demo_default.json", {}) == demo
    assert Path(path) == demo.out / "sae", "the README serves an SAE `make demo` does not write"
    assert port != demo.port, "the demo's own server would already hold the README's port"
    snippet = re.search(r"<!-- snippet:client -->\s*```python\n(.*?)```", readme, re.S)
    assert snippet and f'"sae": "{name}"' in snippet.group(1)
    assert f"127.0.0.1:{port}/v1" in snippet.group(1)
    for other in re.findall(r"sae-steer serve --sae \w+=(\S+)", readme):
        assert other == path, f"README serves {other}; after `make demo` only {path} exists"


# ------------------------------------------------------------------ for real
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(*args: str) -> list[str]:
    return [sys.executable, "-m", "sae_steer_vllm.cli", "serve", *args]


def test_a_taken_port_is_one_line_and_a_quick_exit(default_model: Path) -> None:
    with socket.socket() as s:
        s.bind(("", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run(
            _serve("--model", str(default_model), "--port", str(port)),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO,
        )
    assert r.returncode != 0 and time.monotonic() - t0 < 60
    assert r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        f"sae-steer serve: error: port {port} is already in use: stop what listens there or "
        "pass --port N"
    ]


@pytest.mark.parametrize("bad", ["missing-model", "not-a-model", "unknown-sae"])
def test_a_missing_model_or_sae_folder_is_one_line(tmp_path: Path, bad: str) -> None:
    (tmp_path / "empty").mkdir()
    model = {"missing-model": tmp_path / "nope", "not-a-model": tmp_path / "empty"}.get(bad)
    args = ["--model", str(model)] if model else ["--sae", f"x={tmp_path / 'no-sae'}"]
    r = subprocess.run(
        _serve(*args, "--print-command"), capture_output=True, text=True, timeout=300, cwd=REPO
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("sae-steer serve: error:")
    assert {"missing-model": "does not exist", "not-a-model": "no config.json"}.get(
        bad, "not a directory"
    ) in lines[0]


def _warm_page_cache(min_bytes: int = 3 * GiB) -> int:
    """Read files (the environment's libraries, the model) until ``min_bytes`` are cached."""
    done = 0
    for folder in (Path(sys.prefix), Path.home() / ".cache"):
        for f in sorted(folder.rglob("*")):
            if done >= min_bytes:
                return done
            if f.is_file() and not f.is_symlink():
                try:
                    with f.open("rb") as fh:
                        while chunk := fh.read(1 << 22):
                            done += len(chunk)
                except OSError:
                    continue
    return done


@pytest.mark.slow
def test_documented_serve_starts_without_kvcache_space_on_a_warm_cache(
    default_model: Path, tmp_path: Path
) -> None:
    """The README's command as a user runs it: no ``VLLM_CPU_KVCACHE_SPACE``, a page cache
    full of other files. vLLM alone would want 92% of the node free at start-up."""
    from benchmarks import server_process

    warmed = _warm_page_cache()
    mem = node_memory(worker_node())
    print(
        f"warmed {warmed / GiB:.1f} GiB; node {mem.node}: {mem.available / GiB:.1f} of "
        f"{mem.total / GiB:.1f} GiB available (vLLM's default wants {0.92 * mem.total / GiB:.1f})"
    )
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != KV_ENV}
    log = tmp_path / "serve.log"
    cmd = _serve(
        "--model",
        str(default_model),
        "--served-model-name",
        default_model.name,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--enforce-eager",
    )
    srv = server_process.launch(cmd, log, port=port, env=env, healthy_within=600)
    try:
        text = log.read_text()
        sized = re.search(r"sae-steer serve: KV cache: (\d+) GiB \(auto:", text)
        assert sized, text[-3000:]
        assert f"Explicitly set ({sized.group(1)}.0/" in text, "vLLM did not get the size"
        rss_kb = int(Path(f"/proc/{srv.pid}/status").read_text().split("VmRSS:")[1].split()[0])
        assert rss_kb < 150 * 1024, "the supervisor kept torch loaded"
    finally:
        srv.stop()
