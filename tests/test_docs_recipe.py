"""docs/paper_recipe.md stays followable: what it names exists, and what it says to type parses.

The recipe is meant for a GPU machine this project does not have, so every way it could fail
that this machine can see must fail here instead: a cited test that was renamed, a config file
that moved, a flag a command no longer takes, a vLLM flag vLLM 0.32 does not define, a
``--sae`` that is not ``NAME=PATH``, an eval ``--config`` with an unknown option, names that
do not tie the steps together, Python that does not compile. Each ``sae-steer`` command of
the recipe goes through that command's own ``main`` and parser, stopped right after parsing
(nothing is loaded or started).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "paper_recipe.md"
TEXT = DOC.read_text(encoding="utf-8")


class _Parsed(Exception):
    """Raised by the patched argparse once a command's options parsed."""

    def __init__(self, namespace: argparse.Namespace, extras: list[str]) -> None:
        super().__init__("parsed")
        self.namespace, self.extras = namespace, extras


def _code_blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", TEXT, flags=re.S | re.M)


def _commands() -> list[list[str]]:
    """Every ``sae-steer ...`` / ``torchrun ... -m sae_training.train ...`` of the recipe:
    lines of bash blocks (continuations joined) and inline code spans that carry options."""
    lines: list[str] = []
    for block in _code_blocks("bash"):
        lines += block.replace("\\\n", " ").splitlines()
    lines += [m for m in re.findall(r"`(sae-steer [^`]+)`", TEXT) if " -" in m]
    out = []
    for line in lines:
        argv = shlex.split(line, comments=True)
        if argv and argv[0] in ("sae-steer", "torchrun"):
            out.append(argv)
    return out


COMMANDS = _commands()
_PARSE_ARGS = argparse.ArgumentParser.parse_args
_PARSE_KNOWN_ARGS = argparse.ArgumentParser.parse_known_args


def _run_parse_only(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> _Parsed:
    """Run the command's ``main`` until its parser returns; fail with argparse's message."""
    strict = {"on": False}  # parse_args refuses extras; parse_known_args (serve) keeps them

    def parse_args(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        strict["on"] = True
        return _PARSE_ARGS(self, *a, **k)

    def parse_known_args(self: argparse.ArgumentParser, *a: Any, **k: Any) -> Any:
        ns, extras = _PARSE_KNOWN_ARGS(self, *a, **k)
        if strict["on"] and extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        raise _Parsed(ns, extras)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    if argv[0] == "torchrun":
        from sae_training import train

        main, rest = train.main, argv[argv.index("sae_training.train") + 1 :]
    else:
        from sae_steer_vllm import cli

        main, rest = cli.main, argv[1:]
    try:
        main(rest)
    except _Parsed as p:
        return p
    except SystemExit as e:
        pytest.fail(f"{shlex.join(argv)}\nwas refused by its parser (exit {e.code})")
    pytest.fail(f"{shlex.join(argv)}\nnever reached its parser")


def _vllm_fields() -> set[str]:
    """Option names vLLM 0.32 defines (dataclass fields of its engine and frontend args),
    read from its source so that vLLM is not imported."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    base = Path(next(iter(spec.submodule_search_locations)))
    names: set[str] = set()
    for rel in ("engine/arg_utils.py", "entrypoints/launchers/cli_args.py"):
        names |= set(re.findall(r"^    (\w+): ", (base / rel).read_text(), flags=re.M))
    return names


def test_every_cited_test_exists() -> None:
    refs = set(re.findall(r"(tests/[\w/]+\.py)::(\w+)", TEXT))
    assert len(refs) >= 20, "the recipe should name the test of each step"
    missing = []
    for path, name in sorted(refs):
        file = ROOT / path
        defined = file.is_file() and {
            n.name
            for n in ast.walk(ast.parse(file.read_text()))
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        }
        if not defined or name not in defined:
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/paper_recipe.md cites tests that do not exist: {missing}"
    files = set(re.findall(r"`(tests/[\w/]+\.py)`", TEXT))
    assert not [f for f in files if not (ROOT / f).is_file()]


def test_every_config_file_exists_and_parses() -> None:
    paths = set(re.findall(r"configs/[\w.-]+\.json", TEXT))
    assert len(paths) >= 6
    for p in sorted(paths):
        assert (ROOT / p).is_file(), f"docs/paper_recipe.md names {p}, which does not exist"
        json.loads((ROOT / p).read_text())


def test_python_blocks_compile() -> None:
    blocks = _code_blocks("python")
    assert blocks
    for block in blocks:
        compile(block, str(DOC), "exec")


def test_commands_are_accepted_by_their_parsers(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks.eval import OPTION_MODELS, load_config_file
    from sae_steer_vllm.command import model_from_args
    from sae_steer_vllm.plugin_config import PluginConfig
    from sae_steer_vllm.serve import ServeOptions

    seen = {argv[1] if argv[0] == "sae-steer" else "torchrun" for argv in COMMANDS}
    assert {"serve", "score", "eval", "bench", "collect", "torchrun"} <= seen
    vllm = _vllm_fields()
    for argv in COMMANDS:
        parsed = _run_parse_only(argv, monkeypatch)
        ns, extras = parsed.namespace, parsed.extras
        if argv[1] == "serve":
            model_from_args(ServeOptions, ns)  # --sae NAME=PATH
            model_from_args(PluginConfig, ns)
            flags = [a.split("=")[0][2:].replace("-", "_") for a in extras if a.startswith("--")]
            unknown = [f for f in flags if f not in vllm]
            assert not unknown, f"{shlex.join(argv)}\nvLLM defines no {unknown}"
        if argv[1] == "eval" and getattr(ns, "config", None) is not None:
            given = {k: v for k, v in vars(ns).items() if k != "config"}
            merged = argparse.Namespace(**{**load_config_file(ROOT / ns.config), **given})
            for model in OPTION_MODELS:
                model_from_args(model, merged)


def _option(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == flag]


def test_names_tie_the_steps_together() -> None:
    """Every serve command serves the eval configs' model name and registers the spec files'
    SAE names, so each step's output is what the next step asks for."""
    models: set[str] = set()
    saes: set[str] = set()
    for p in set(re.findall(r"configs/[\w.-]+\.json", TEXT)):
        doc = json.loads((ROOT / p).read_text())
        if isinstance(doc, dict) and "model" in doc:
            models.add(doc["model"])
        if isinstance(doc, list):
            saes |= {iv["sae"] for e in doc if e["spec"] for iv in e["spec"]["interventions"]}
    serves = [a for a in COMMANDS if a[:2] == ["sae-steer", "serve"]]
    assert serves and models and saes
    for argv in serves:
        served = set(_option(argv, "--served-model-name"))
        registered = {s.split("=", 1)[0] for s in _option(argv, "--sae")}
        assert models <= served, f"{shlex.join(argv)}\ndoes not serve {models - served}"
        assert saes <= registered, f"{shlex.join(argv)}\ndoes not register {saes - registered}"


R1_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
"""DeepSeek-R1-Distill-Llama-8B's shape (what serving reads from its config.json)."""

RELEASE_CFG = {
    "architecture": "standard",
    "d_in": 4096,
    "d_sae": 65536,
    "hook_name": "blocks.19.hook_resid_post",
    "hook_layer": 19,
    "apply_b_dec_to_input": False,
    "normalize_activations": "expected_average_only_in",
    "prepend_bos": False,
    "activation_fn": "relu",
    "model_name": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    "sae_lens_version": "5.5.2",
}
"""The authors' release field set (as in tests/test_sae_format.py), at full size."""


def _sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float32 safetensors file of these shapes whose data is a hole (zeros, no disk)."""
    header: dict[str, Any] = {}
    offset = 0
    for name, shape in shapes.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + offset)


def test_step3_serve_command_takes_the_authors_sae_at_full_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Step 3's command as written, up to vLLM's own start (``--print-command``): the 8B's
    config.json (no weights) and a full-size stand-in of the authors' SAE (its field set,
    65,536 x 4,096 matrices as a sparse file) in an offline Hub cache under the real repository
    id and subfolder. Catches a wrong address, d_in against the hidden size, layer 19 of 32."""
    from huggingface_hub import constants

    from sae_steer_vllm import serve

    repo = "andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts"
    commit = "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text(commit)
    sae = cache / "snapshots" / commit / "blocks.19.hook_resid_post"
    d_in, d_sae = RELEASE_CFG["d_in"], RELEASE_CFG["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,)}
    _sparse_safetensors(sae / "sae_weights.safetensors", shapes)
    (sae / "cfg.json").write_text(json.dumps(RELEASE_CFG))
    model = tmp_path / "models" / "r1-llama8b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(R1_CONFIG))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    serves = [a for a in COMMANDS if a[:2] == ["sae-steer", "serve"] and "--sae" in a]
    argv = next(a for a in serves if any("=hf:" in s for s in _option(a, "--sae")))
    argv = [str(model) if a == "models/r1-llama8b" else a for a in argv[2:]]
    assert serve.main([*argv, "--print-command"]) == 0, capsys.readouterr().err
    printed = shlex.split(capsys.readouterr().out.strip())
    assert str(sae) in json.dumps(printed)  # vLLM gets the cache folder, resolved once
    assert _option(printed, "--served-model-name") == ["r1-llama8b"]
    assert _option(printed, "--max-model-len") == ["34816"]
    assert "SteeredLlamaForCausalLM" in json.dumps(printed)
