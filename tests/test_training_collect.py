"""Activation collection on a tiny random Llama with the real tokenizer, and its bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.activations import one_thread
from helpers.corpora import write_corpus
from helpers.models import make_tiny_llama

from sae_steer_vllm.sae import SAE
from sae_training import DEFAULT_RECIPE, collect, train, train_default_sae
from sae_training.activation_sources import DiskCache
from sae_training.collection import CollectConfig, collect_to_disk, collect_to_memory
from sae_training.corpus import BadLine, TextMix
from sae_training.errors import ActivationError
from sae_training.lm import ResidReader, load_model
from sae_training.tokens import keep_mask, pack_rows, special_token_ids


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TextMix]:
    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(root / "llama")
    chat, traces = write_corpus(root / "data", bad_lines=True)
    return model, TextMix(chat=str(chat), traces=str(traces), trace_ratio=0.4, holdout_every=10)


def test_capture_equals_hidden_states_and_stops_early(tiny: tuple[Path, TextMix]) -> None:
    path, _ = tiny
    model, tok = load_model(path)
    ids = torch.randint(10, 1000, (2, 16))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    calls: list[int] = []
    hook = model.model.layers[2].register_forward_hook(lambda *a: calls.append(1))
    got = ResidReader(model, [0, 1])(ids)
    hook.remove()
    torch.testing.assert_close(got[0], ref[1])
    torch.testing.assert_close(got[1], ref[2])
    assert calls == []  # layer 2 never ran


def test_rows_are_packed_and_specials_excluded(tiny: tuple[Path, TextMix]) -> None:
    path, mix = tiny
    model, tok = load_model(path)
    rows = list(pack_rows(tok, mix.texts(tok, "train"), 32))
    assert len(rows) > 10 and all(r.shape == (32,) and r[0] == tok.bos_token_id for r in rows)
    ids = torch.stack(rows)
    keep = keep_mask(ids, special_token_ids(tok))
    assert not keep[:, 0].any()
    assert not torch.isin(ids[keep], torch.tensor(sorted(special_token_ids(tok)))).any()
    assert keep.float().mean() > 0.7
    train_docs, eval_docs = list(mix.texts(tok, "train")), list(mix.texts(tok, "eval"))
    assert eval_docs and not set(eval_docs) & set(train_docs)


def test_memory_and_disk_sinks_agree_and_report_bad_lines(
    tiny: tuple[Path, TextMix], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, mix = tiny
    model, tok = load_model(path)
    cfg = CollectConfig(model=str(path), layers=(0, 2), tokens=1500, context_size=32, mix=mix)
    with one_thread():
        mem = collect_to_memory(cfg, tok, model, progress=False)
        folder = collect_to_disk(
            cfg, tok, model, tmp_path / "cache", shard_tokens=400, progress=False
        )
    assert mem[0].shape == (1500, 32) and mem[2].shape == (1500, 32)
    cache = DiskCache(folder, layer=2)
    assert cache.meta.shards == [400, 400, 400, 300] and cache.meta.skipped_records > 0
    torch.testing.assert_close(cache.head(1500), mem[2])
    batches = list(cache.batches(256, epoch=0, seed=0))
    assert len(batches) == 1500 // 256
    assert [b.sum() for b in batches] == [b.sum() for b in cache.batches(256, epoch=0, seed=0)]
    assert "skipped" in capsys.readouterr().err
    skipped: list[BadLine] = []
    list(mix.texts(tok, "train", skipped))
    reasons = {b.reason.split(" (")[0] for b in skipped}
    assert reasons == {"malformed JSON", "record lacks the fields a trace needs"}


def test_short_dataset_is_a_clear_error(tiny: tuple[Path, TextMix]) -> None:
    path, mix = tiny
    model, tok = load_model(path)
    cfg = CollectConfig(model=str(path), layers=(1,), tokens=10**7, context_size=32, mix=mix)
    with (
        one_thread(),
        pytest.raises(ActivationError, match=r"ran out after \d+ of 10000000 requested tokens"),
    ):
        collect_to_memory(cfg, tok, model, progress=False)


def test_collect_cli_errors(
    tiny: tuple[Path, TextMix], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, mix = tiny
    base = [
        "--model",
        str(path),
        "--out",
        str(tmp_path / "c"),
        "--chat",
        mix.chat,
        "--traces",
        mix.traces,
        "--no-progress",
    ]
    assert collect.main([*base, "--layers", "3", "--tokens", "100"]) == 1
    assert "layer 3 out of range: the model has 3 decoder layers (0..2)" in capsys.readouterr().err
    assert collect.main([*base, "--layers", "1", "--tokens", "0"]) == 1
    assert "tokens must be positive" in capsys.readouterr().err
    assert (
        collect.main(
            [*base, "--layers", "1", "--tokens", "100", "--chat", str(tmp_path / "missing.jsonl")]
        )
        == 1
    )
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n{bad\n")
    rc = collect.main(
        [*base, "--layers", "1", "--tokens", "100", "--chat", str(empty), "--traces", str(empty)]
    )
    assert rc == 1
    assert "ran out after 0 of 100" in capsys.readouterr().err
    assert collect.main([*base, "--layers", "1", "--tokens", "600", "--context-size", "32"]) == 0
    assert DiskCache(tmp_path / "c").num_tokens == 600


def test_train_cli_end_to_end_with_lm_eval(
    tiny: tuple[Path, TextMix], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, mix = tiny
    out = tmp_path / "sae"
    args = [
        "--model",
        str(path),
        "--layer",
        "1",
        "--collect-tokens",
        "2048",
        "--context-size",
        "32",
        "--chat",
        mix.chat,
        "--traces",
        mix.traces,
        "--out",
        str(out),
        "--arch",
        "topk",
        "--k",
        "8",
        "--d-sae",
        "128",
        "--batch-size",
        "256",
        "--train-tokens",
        "4096",
        "--lr",
        "3e-3",
        "--eval-rows",
        "4",
        "--no-progress",
    ]
    with one_thread():
        assert train.main(args) == 0
    printed = capsys.readouterr().out
    assert "held-out explained_variance" in printed and "ce_recovered" in printed
    sae = SAE.load(out)
    assert (sae.cfg.architecture, sae.cfg.hook_layer, sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (
        "topk",
        1,
        32,
        128,
        8,
    )
    assert sae.cfg.hook_name == "blocks.1.hook_resid_post" and sae.cfg.model_name == "llama"
    m = json.loads((out / "metrics.json").read_text())
    ev = m["eval"]
    for key in (
        "explained_variance",
        "l0",
        "dead_fraction",
        "ce_clean",
        "ce_sae",
        "ce_zero_ablation",
        "ce_recovered",
        "kl_to_clean",
    ):
        assert isinstance(ev[key], float)
    assert ev["l0"] <= 8 and ev["kl_to_clean"] >= 0
    # same command again without --resume refuses to clobber the run
    with one_thread():
        assert train.main(args) == 1
    assert "--resume" in capsys.readouterr().err
    # --resume on a finished run reuses the cache and the checkpoint: no new training
    with one_thread():
        assert train.main([*args, "--resume"]) == 0
    # and with a changed hyperparameter it is refused
    with one_thread():
        assert train.main([*args, "--resume", "--k", "16"]) == 1
    assert "k: checkpoint=8 now=16" in capsys.readouterr().err


def test_train_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert train.main(["--out", str(tmp_path)]) == 1
    assert "exactly one of --activations" in capsys.readouterr().err
    assert train.main(["--activations", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "not an activation cache" in capsys.readouterr().err
    assert (
        train.main(["--activations", str(tmp_path), "--out", str(tmp_path / "o"), "--lr", "-1"])
        == 1
    )


def test_train_default_sae_tiny_configuration(tiny: tuple[Path, TextMix], tmp_path: Path) -> None:
    """The pipeline's entry point, shrunk: shared corpus, tiny model, a few thousand tokens."""
    path, _ = tiny
    with one_thread():
        out = train_default_sae(
            tmp_path / "sae", model_path=path, layer=1, tokens=2048, d_sae=128, k=8, progress=False
        )
    sae = SAE.load(out)
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.hook_layer) == ("jumprelu", 128, 1)
    m = json.loads((out / "metrics.json").read_text())
    recipe = DEFAULT_RECIPE
    epochs = recipe["train"]["train_tokens"] / recipe["collect_tokens"]
    assert m["config"]["train_tokens"] == int(2048 * epochs)  # the recipe's epochs, fewer tokens
    assert m["eval"]["lm_eval_tokens"] > 0
