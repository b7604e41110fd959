"""``hf:owner/repo[/subfolder][@revision]`` SAE addresses, resolved from a local Hub cache.

No network: every test points huggingface_hub at a cache written here by hand in its own
layout (``models--owner--name/refs/<branch>`` + ``snapshots/<commit>/...``) with
``HF_HUB_OFFLINE`` on, then resolves, loads, and checks the errors.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sae_steer_vllm.errors import EXIT_USAGE, UsageError
from sae_steer_vllm.plugin_config import PluginConfig, PluginConfigError
from sae_steer_vllm.sae import load_sae, random_sae
from sae_steer_vllm.sae.hub import (
    HubAddress,
    HubFetchError,
    parse_hub_address,
    resolve_sae_location,
)

REPO = "andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts"
SUB = "blocks.19.hook_resid_post"
MAIN = "0123456789abcdef0123456789abcdef01234567"
OLD = "89abcdef0123456789abcdef0123456789abcdef"


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An offline Hub cache holding the authors' repo layout (scaled down): two commits,
    ``main`` at the newer one, a tag ``v1`` at the older; an lm-saes folder too."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / ("models--" + REPO.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(MAIN)
    (repo / "refs" / "v1").write_text(OLD)
    random_sae(repo / "snapshots" / MAIN / SUB, d_in=8, d_sae=32, layer=19, seed=1)
    random_sae(repo / "snapshots" / OLD / SUB, d_in=8, d_sae=16, layer=19, seed=2)
    lm = repo / "snapshots" / MAIN / "L3R"  # lm-saes: config.json, not cfg.json
    lm.mkdir(parents=True)
    hook = "blocks.3.hook_resid_post"
    (lm / "config.json").write_text(
        json.dumps(
            {"d_model": 8, "expansion_factor": 2, "act_fn": "jumprelu", "hook_point_in": hook}
        )
    )
    save_file(
        {
            "encoder.weight": torch.randn(16, 8),
            "encoder.bias": torch.zeros(16),
            "decoder.weight": torch.randn(8, 16),
            "decoder.bias": torch.zeros(8),
            "log_jumprelu_threshold": torch.zeros(16),
            f"dataset_average_activation_norm.{hook}": torch.tensor(4.0),
        },
        str(lm / "sae_weights.safetensors"),
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("hf:o/r", HubAddress("o/r")),
        (f"hf:{REPO}/{SUB}", HubAddress(REPO, SUB)),
        ("hf:o/r/a/b.c@v1.2", HubAddress("o/r", "a/b.c", "v1.2")),
        ("hf:o/r@refs/pr/3", HubAddress("o/r", "", "refs/pr/3")),
    ],
)
def test_parse(text: str, address: HubAddress) -> None:
    assert parse_hub_address(text) == address
    assert str(address) == text


@pytest.mark.parametrize(
    "text",
    ["hf:", "hf:onlyowner", "hf:o/r/../x", "hf:o//r", "hf:o/r@", "hf:o/r@a b", "hf:o r/x", "o/r"],
)
def test_bad_syntax_is_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="hf:owner/repo") as e:
        parse_hub_address(text)
    assert e.value.exit_code == EXIT_USAGE


def test_fetches_only_sae_files_of_the_subfolder() -> None:
    pats = HubAddress(REPO, SUB).patterns()
    assert pats == sorted(
        f"{SUB}/{n}"
        for n in (
            "cfg.json",
            "config.json",
            "sae_weights.safetensors",
            "sae.safetensors",
            "feature_stats.safetensors",
        )
    )


def test_resolves_offline_from_cache_and_loads(hub_cache: Path) -> None:
    folder = resolve_sae_location(f"hf:{REPO}/{SUB}")
    assert folder == hub_cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / MAIN / SUB
    sae = load_sae(folder)
    assert (sae.cfg.hook_layer, sae.cfg.d_sae) == (19, 32)
    assert load_sae(resolve_sae_location(f"hf:{REPO}/{SUB}@v1")).cfg.d_sae == 16
    assert load_sae(resolve_sae_location(f"hf:{REPO}/{SUB}@{OLD}")).cfg.d_sae == 16
    lm = load_sae(resolve_sae_location(f"hf:{REPO}/L3R"))
    assert (lm.cfg.architecture, lm.cfg.hook_layer) == ("jumprelu", 3)


def test_local_paths_pass_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_sae_location("rel/sae") == tmp_path / "rel" / "sae"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("hf:someone/not-cached", "not in the local Hugging Face cache"),
        (f"hf:{REPO}/{SUB}@no-such-tag", "not in the local Hugging Face cache"),
        (f"hf:{REPO}/blocks.7.hook_resid_post", "no SAE files in 'blocks.7.hook_resid_post'"),
    ],
)
def test_offline_misses_name_the_address(hub_cache: Path, text: str, needle: str) -> None:
    with pytest.raises(HubFetchError) as e:
        resolve_sae_location(text)
    assert needle in str(e.value) and text.removesuffix("@no-such-tag") in str(e.value)
    assert e.value.exit_code == 1


def test_plugin_config_resolves_hub_addresses_once(hub_cache: Path, tmp_path: Path) -> None:
    """``--sae r1=hf:...`` and ``additional_config`` go through the same resolver; what
    reaches the workers (``model_dump``) is the local folder."""
    random_sae(tmp_path / "local", d_in=8, d_sae=16, layer=2)
    cfg = PluginConfig(saes={"r1": f"hf:{REPO}/{SUB}", "mine": str(tmp_path / "local")})
    assert Path(cfg.saes["r1"]).name == SUB and Path(cfg.saes["r1"]).is_dir()
    assert cfg.saes["mine"] == str(tmp_path / "local")
    again = PluginConfig.from_additional_config({"sae_steer": cfg.model_dump()})
    assert again.saes == cfg.saes
    with pytest.raises(PluginConfigError, match="hf:owner/repo"):
        PluginConfig.from_additional_config({"sae_steer": {"saes": {"x": "hf:bad"}}})


def test_score_and_dashboard_take_hub_addresses(
    hub_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLIs that take ``--sae`` resolve through the same function; results never go into
    the Hub cache, so an ``hf:`` SAE needs ``--out``."""
    from sae_training.features import dashboard_cli, score_cli

    assert score_cli.main(["--sae", f"hf:{REPO}/{SUB}"]) == EXIT_USAGE
    assert "pass --out" in capsys.readouterr().err
    argv = ["--sae", "hf:someone/not-cached", "--out", str(tmp_path / "pages")]
    assert dashboard_cli.main(argv) == 1
    assert "not in the local Hugging Face cache" in capsys.readouterr().err
    argv = ["--sae", f"hf:{REPO}/{SUB}", "--stats", str(tmp_path / "none.safetensors")]
    assert dashboard_cli.main([*argv, "--out", str(tmp_path / "pages")]) == EXIT_USAGE
    assert "none.safetensors not found" in capsys.readouterr().err


def test_serve_print_command_takes_a_hub_sae(
    default_model: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``sae-steer serve --sae r1=hf:...``: vLLM is handed the cache folder, resolved once."""
    from huggingface_hub import constants

    from sae_steer_vllm import serve

    cache = tmp_path / "hub"
    snap = cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / MAIN
    (snap.parent.parent / "refs").mkdir(parents=True)
    (snap.parent.parent / "refs" / "main").write_text(MAIN)
    random_sae(snap / "blocks.18.hook_resid_post", d_in=576, d_sae=64, layer=18)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    sae = f"r1=hf:{REPO}/blocks.18.hook_resid_post"
    assert serve.main(["--print-command", "--sae", sae, "--model", str(default_model)]) == 0
    printed = capsys.readouterr().out
    assert str(snap / "blocks.18.hook_resid_post") in printed and "hf:" not in printed
    assert serve.main(["--print-command", "--sae", "r1=hf:bad", "--model", str(default_model)]) == 2
    assert "hf:owner/repo" in capsys.readouterr().err
