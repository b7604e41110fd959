"""The KV-cache size ``sae-steer serve`` gives vLLM's CPU backend, chosen before vLLM starts.

Why this exists: vLLM 0.32's CPU worker (``vllm/v1/worker/cpu_worker.py``) without an
explicit KV size reserves ``--gpu-memory-utilization`` (default 0.92) of the NUMA node's
memory and refuses to start unless that much is *available at start-up*. Any other
process (a test run, a second server, a training job) breaks that check, with a 150-line
traceback ("Available memory on node 0 (11.95/13.46 GiB) on startup is less than desired
CPU memory utilization"). ``VLLM_CPU_KVCACHE_SPACE=N`` (an integer number of GiB;
``vllm/platforms/cpu.py`` turns it into ``cache_config.kv_cache_memory_bytes``, per
worker) skips that check; the one left (``determine_available_memory``) only asks that
N GiB be available when the cache is allocated, after the model has loaded.

So the auto rule reads memory exactly as vLLM does (:func:`node_memory` mirrors
``vllm.utils.cpu_resource_utils.get_memory_node_info``: the node's free + file-backed +
reclaimable-slab memory, clamped by a cgroup limit) and keeps what vLLM's processes and the
weights will take, plus half of the rest for everything else on the machine:

    kv per worker = (available - weights - 0.75 GiB x (2 + workers)) / 2 / workers,

rounded down to whole GiB and clamped to [1, 32]. A user's ``VLLM_CPU_KVCACHE_SPACE``,
``--kv-cache-memory-bytes`` or ``--gpu-memory-utilization`` is their choice and is left alone
(:func:`user_sized`). Nothing here imports vLLM or torch: the rule is unit-tested on fake
``/sys`` trees, and a test checks :func:`node_memory` against vLLM's own function.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SaeSteerError

GiB = 1 << 30
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
"""vLLM's CPU KV-cache size in GiB (an integer, per worker)."""
KV_MIN_GIB = 1
"""The smallest size the env var can say (0 would mean "no cache")."""
KV_MAX_GIB = 32
"""Beyond this the cache only costs start-up time and memory others could use."""
PROCESS_BYTES = int(0.75 * GiB)
"""Resident size of torch + vLLM in one process before weights or cache (measured on the
default model: API server 0.86 GB, engine core 0.70 GB, worker 0.65 GB + weights)."""
KV_SHARE = 0.5
"""Of what is left after vLLM's processes and weights, the share given to the KV cache;
the rest stays with the page cache, activations and other processes."""
USER_KV_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
"""vLLM flags by which a user sizes the cache themselves."""

_CGROUP_V2_MAX = "sys/fs/cgroup/memory.max"
_CGROUP_V2_CURRENT = "sys/fs/cgroup/memory.current"
_CGROUP_V1_LIMIT = "sys/fs/cgroup/memory/memory.limit_in_bytes"
_CGROUP_V1_USAGE = "sys/fs/cgroup/memory/memory.usage_in_bytes"
_WORD_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}
_DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}


class KVCacheError(SaeSteerError, RuntimeError):
    """Not even the smallest KV cache fits next to the model: the message says what to free."""


@dataclass(frozen=True)
class NodeMemory:
    """One NUMA node's memory as vLLM's CPU worker counts it (bytes)."""

    node: int
    total: int
    available: int


@dataclass(frozen=True)
class KVChoice:
    """The KV-cache size for each worker, and the one line that says why."""

    gib: int
    reason: str


def _gib(n: float) -> str:
    return f"{n / GiB:.1f}"


def _read_int(path: Path) -> int | None:
    """vLLM's ``_read_int_file``: an integer file, ``max`` or unreadable -> None."""
    try:
        text = path.read_text().strip()
        return None if not text or text == "max" else int(text)
    except (OSError, ValueError):
        return None


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` or a node's ``meminfo`` (``Node 0 MemFree: 5 kB``) -> bytes by key."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        words = rest.split()
        if not words or not words[0].isdigit():
            continue
        scale = 1024 if words[1:2] == ["kB"] else 1
        out[key.split()[-1]] = int(words[0]) * scale
    return out


def _id_list(text: str) -> list[int]:
    """``0-2,4`` -> [0, 1, 2, 4]."""
    out: set[int] = set()
    for part in text.strip().split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.update(range(int(lo), int(hi) + 1))
        elif part:
            out.add(int(part))
    return sorted(out)


def worker_node(root: Path = Path("/"), cpus: set[int] | None = None) -> int:
    """The NUMA node vLLM's CPU worker measures: that of the lowest CPU it may run on,
    or the first node it may allocate from when that one is not allowed (as vLLM does)."""
    cpus = cpus if cpus is not None else set(os.sched_getaffinity(0))
    node = 0
    if cpus:
        links = sorted((root / f"sys/devices/system/cpu/cpu{min(cpus)}").glob("node[0-9]*"))
        node = int(links[0].name[4:]) if links else 0
    try:
        status = (root / "proc/self/status").read_text()
    except OSError:
        return node
    for line in status.splitlines():
        if line.startswith("Mems_allowed_list:"):
            allowed = _id_list(line.split(":", 1)[1])
            return node if not allowed or node in allowed else allowed[0]
    return node


def node_memory(node: int = 0, root: Path = Path("/")) -> NodeMemory:
    """vLLM's ``get_memory_node_info`` (0.32), reading under ``root`` (tests pass a fake tree).

    Available = free + Active(file) + Inactive(file) + SReclaimable of the node (the page
    cache counts as available); without per-node files, the system's MemAvailable. A cgroup
    limit below the total replaces it, and available becomes at most limit - usage, where
    usage *includes* the cgroup's page cache: in a container a warm cache does count.
    """
    node_file = root / f"sys/devices/system/node/node{node}/meminfo"
    if node_file.is_file():
        m = parse_meminfo(node_file.read_text())
        total = m["MemTotal"]
        avail = m["MemFree"] + m["Active(file)"] + m["Inactive(file)"] + m["SReclaimable"]
    elif (root / "proc/meminfo").is_file():
        m = parse_meminfo((root / "proc/meminfo").read_text())
        total = m["MemTotal"]
        avail = m.get("MemAvailable", m.get("MemFree", 0))
    else:  # not Linux: vLLM asks psutil too
        import psutil

        vm = psutil.virtual_memory()
        total, avail = int(vm.total), int(vm.available)
    limit = _read_int(root / _CGROUP_V2_MAX)
    usage = _read_int(root / _CGROUP_V2_CURRENT) if limit is not None else None
    if limit is None:
        v1 = _read_int(root / _CGROUP_V1_LIMIT)
        if v1 is not None and v1 < (1 << 62):
            limit, usage = v1, _read_int(root / _CGROUP_V1_USAGE)
    if limit is not None and limit < total:
        total = limit
        avail = max(0, min(avail, limit - (usage or 0)))
    return NodeMemory(node=node, total=total, available=avail)


def _safetensors_params(path: Path) -> int:
    """Parameter count from a safetensors header (no tensor is read)."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    total = 0
    for name, t in header.items():
        if name != "__metadata__":
            count = 1
            for d in t["shape"]:
                count *= int(d)
            total += count
    return total


def _config_params(config: dict[str, Any]) -> int:
    """An upper estimate of a decoder's parameters from its ``config.json`` (no weights local)."""
    text = config.get("text_config")
    c: dict[str, Any] = text if isinstance(text, dict) else config

    def num(key: str, default: int = 0) -> int:
        value = c.get(key)
        return int(value) if isinstance(value, int) and value > 0 else default

    h = num("hidden_size")
    return num("num_hidden_layers") * (4 * h * h + 3 * h * num("intermediate_size", 4 * h)) + (
        2 * num("vocab_size") * h
    )


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot folder of a Hugging Face model id, when it is in the cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - not a repo id, no hub library: nothing cached
        return None
    return Path(hit).parent if isinstance(hit, str) else None


def weight_bytes(model: str, dtype: str | None) -> int:
    """Bytes the weights take once loaded: parameters x the serving dtype's size.

    ``dtype`` is vLLM's ``--dtype`` (None or ``auto``: the files' own size, which is never
    smaller than what vLLM loads). A model that is not a local folder is estimated from its
    Hugging Face cache when it is there, else counted as 0 (the margin still applies).
    """
    folder = Path(model)
    if not folder.is_dir():
        folder = _hub_snapshot(model) or folder
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files and folder.is_dir():
        files = sorted(folder.glob("*.bin"))
    size = _DTYPE_BYTES.get(dtype or "auto")
    if files and all(f.suffix == ".safetensors" for f in files):
        params = sum(_safetensors_params(f) for f in files)
        if size is None:
            return sum(f.stat().st_size for f in files)
        return params * size
    if files:
        on_disk = sum(f.stat().st_size for f in files)
        return on_disk if size is None else on_disk * max(1, size // 2)  # files may be 16-bit
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return 0
    return _config_params(config) * (size or 4) if isinstance(config, dict) else 0


def auto_kv_cache_gib(mem: NodeMemory, weights: int, workers: int = 1) -> KVChoice:
    """The rule in the module docstring; :class:`KVCacheError` when not even 1 GiB fits."""
    workers = max(1, workers)
    reserved = weights + PROCESS_BYTES * (2 + workers)
    spare = mem.available - reserved
    per_worker = int(spare * KV_SHARE / workers) // GiB
    gib = max(KV_MIN_GIB, min(KV_MAX_GIB, per_worker))
    if spare < gib * workers * GiB:
        raise KVCacheError(
            f"not enough memory for vLLM on NUMA node {mem.node}: {_gib(mem.available)} of "
            f"{_gib(mem.total)} GiB available, the weights and vLLM's processes need about "
            f"{_gib(reserved)} GiB and the KV cache at least {KV_MIN_GIB * workers} GiB; "
            "stop other processes, or force a size with --cpu-kv-cache-gib N"
        )
    scope = f" per worker ({workers} workers)" if workers > 1 else ""
    return KVChoice(
        gib=gib,
        reason=(
            f"{gib} GiB{scope} (auto: {_gib(mem.available)} of {_gib(mem.total)} GiB available "
            f"on NUMA node {mem.node}, about {_gib(reserved)} GiB kept for weights and vLLM's "
            f"processes, half the rest, clamped to {KV_MIN_GIB}-{KV_MAX_GIB})"
        ),
    )


def user_sized(env: dict[str, str], vllm_args: list[str]) -> str | None:
    """How the user already sized the cache (their env var or vLLM flag), or None."""
    if env.get(KV_ENV, "") != "":
        return f"{KV_ENV}={env[KV_ENV]} from the environment"
    for a in vllm_args:
        flag = a.split("=", 1)[0]
        if flag in USER_KV_FLAGS:
            return f"{flag} given"
    return None


def flag_value(args: list[str], *names: str) -> str | None:
    """The value of the last ``--name VALUE`` / ``--name=VALUE`` among ``args``."""
    value = None
    for i, a in enumerate(args):
        flag, eq, rest = a.partition("=")
        if flag in names:
            value = rest if eq else (args[i + 1] if i + 1 < len(args) else None)
    return value


def workers_of(vllm_args: list[str]) -> int:
    """Worker processes vLLM starts (tensor x pipeline x data parallel): each gets the KV size."""
    n = 1
    for names in (
        ("--tensor-parallel-size", "-tp"),
        ("--pipeline-parallel-size", "-pp"),
        ("--data-parallel-size", "-dp"),
    ):
        value = flag_value(vllm_args, *names)
        n *= int(value) if value and value.isdigit() and int(value) > 0 else 1
    return n


def parse_setting(text: str) -> int | None:
    """``--cpu-kv-cache-gib``: ``auto`` -> None, else a whole number of GiB >= 1."""
    if text.strip().lower() == "auto":
        return None
    if not text.strip().isdigit() or int(text) < KV_MIN_GIB:
        raise ValueError(f"expected 'auto' or a whole number of GiB >= {KV_MIN_GIB}, got {text!r}")
    return int(text)


def kv_cache_env(
    env: dict[str, str], vllm_args: list[str], setting: str, model: str, root: Path = Path("/")
) -> tuple[dict[str, str], str]:
    """``env`` for vLLM's CPU backend with its KV-cache size decided, and the one line that
    ``sae-steer serve`` prints about it.

    ``setting`` is ``--cpu-kv-cache-gib``: a number is used as given (it wins over the env
    var, and conflicts with vLLM's own sizing flags); ``auto`` keeps a size the user chose
    by env var or vLLM flag, else applies :func:`auto_kv_cache_gib` to this machine now.
    """
    fixed = parse_setting(setting)
    user = user_sized(env, vllm_args)
    if fixed is not None:
        flags = [a for a in vllm_args if a.split("=", 1)[0] in USER_KV_FLAGS]
        if flags:
            raise KVCacheError(
                f"--cpu-kv-cache-gib {fixed} and {flags[0].split('=', 1)[0]} both size the KV "
                "cache: give one of them"
            )
        return {**env, KV_ENV: str(fixed)}, f"KV cache: {fixed} GiB per worker (--cpu-kv-cache-gib)"
    if user is not None:
        return dict(env), f"KV cache: sized by you ({user})"
    mem = node_memory(worker_node(root), root)
    weights = weight_bytes(model, flag_value(vllm_args, "--dtype"))
    choice = auto_kv_cache_gib(mem, weights, workers_of(vllm_args))
    return {**env, KV_ENV: str(choice.gib)}, f"KV cache: {choice.reason}"
