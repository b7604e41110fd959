"""The authors' SAE configuration can be trained: no b_dec on the input, rows without BOS,
SAELens 5.5's decoder init, and the ``paper-r1`` recipe that names them all."""

from __future__ import annotations

import ast
import json
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers.activations import one_thread, synthetic_acts
from helpers.corpora import write_corpus
from helpers.models import make_tiny_llama

from sae_steer_vllm.constants import ACTIVATION_META, CHECKPOINT_FILE, SAELENS_CFG
from sae_steer_vllm.sae import SAE
from sae_training import MemoryActivations, TrainJob, run_training, train
from sae_training.activation_cache import CacheWriter, cache_matches, read_cache_meta
from sae_training.architectures import build
from sae_training.collection import CollectConfig, collect_to_disk
from sae_training.corpus import TextMix
from sae_training.errors import TrainingError
from sae_training.lm import load_model
from sae_training.recipe import PAPER_R1_RECIPE, RECIPES
from sae_training.tokens import keep_mask, pack_rows, special_token_ids
from sae_training.trainer import RunOptions, TrainConfig, Trainer, load_checkpoint, save_checkpoint

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
QUIET = RunOptions(log_every=4, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TextMix]:
    root = tmp_path_factory.mktemp("paper")
    model = make_tiny_llama(root / "llama")
    chat, traces = write_corpus(root / "data")
    return model, TextMix(chat=str(chat), traces=str(traces), trace_ratio=0.4, holdout_every=10)


def _cache(folder: Path, acts: torch.Tensor, *, prepend_bos: bool) -> Path:
    writer = CacheWriter(folder, [3])
    writer.add({3: acts})
    writer.close(model="synthetic", context_size=64, mix={}, prepend_bos=prepend_bos)
    return folder


# ---------------------------------------------------------------- apply_b_dec_to_input
@pytest.mark.parametrize("arch", ["standard", "topk"])
def test_no_b_dec_on_input_trains_saves_and_encodes_x_itself(arch: str, tmp_path: Path) -> None:
    acts = synthetic_acts(n=4096)  # offset +0.3: the trained b_dec is far from zero
    hp = {"l1_coeff": 2.0, "lr": 1e-2} if arch == "standard" else {"k": 6, "lr": 3e-3}
    cfg = TrainConfig(
        architecture=arch,
        d_sae=64,
        batch_size=256,
        train_tokens=4 * 4096,
        norm_tokens=4096,
        apply_b_dec_to_input=False,
        **hp,
    )
    job = TrainJob(
        out_dir=tmp_path / "sae",
        train=cfg,
        layer=3,
        activations=_cache(tmp_path / "acts", acts, prepend_bos=False),
        options=QUIET,
    )
    with one_thread():
        metrics = run_training(job)
    assert metrics["history"][-1]["explained_variance"] > 0.6
    saved = json.loads((tmp_path / "sae" / SAELENS_CFG).read_text())
    assert saved["apply_b_dec_to_input"] is False
    assert saved["metadata"]["prepend_bos"] is False  # the cache's rows, recorded
    sae = SAE.load(tmp_path / "sae")
    assert sae.cfg.apply_b_dec_to_input is False and sae.cfg.prepend_bos is False
    x = acts[:512]
    with torch.no_grad():
        got = sae.encode(x)
        plain = x @ sae.W_enc + sae.b_enc
        if arch == "standard":
            want = torch.relu(plain)
        else:
            vals, idx = plain.topk(6, dim=-1)
            want = torch.zeros_like(plain).scatter_(-1, idx, torch.relu(vals))
        subtracted = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    assert float(sae.b_dec.detach().norm()) > 0.1
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(torch.relu(plain), subtracted, atol=1e-3)  # the test can fail


def test_standard_forward_ignores_b_dec_only_in_the_encoder() -> None:
    sae = build("standard", 8, 16, apply_b_dec_to_input=False)
    with torch.no_grad():
        sae.b_dec.fill_(3.0)
    x = torch.randn(5, 8)
    torch.testing.assert_close(sae.pre_acts(x), x @ sae.W_enc + sae.b_enc)
    out = sae.training_forward(x, progress=1.0)
    f = torch.relu(x @ sae.W_enc + sae.b_enc)
    torch.testing.assert_close(out.recon, f @ sae.W_dec + sae.b_dec)


# ---------------------------------------------------------------- rows without BOS
def test_rows_without_bos_are_the_plain_token_stream(tiny: tuple[Path, TextMix]) -> None:
    path, mix = tiny
    _, tok = load_model(path)
    specials = special_token_ids(tok)
    plain = [f"Document {i}: wait, maybe the answer is {i * 7}." for i in range(40)]
    rows = torch.stack(list(pack_rows(tok, plain, 16, prepend_bos=False)))
    assert not torch.isin(rows, torch.tensor([tok.bos_token_id, tok.eos_token_id])).any()
    keep = keep_mask(rows, specials, prepend_bos=False)
    assert keep.all()  # no specials, and position 0 is trained on, as SAELens does
    with_bos = torch.stack(list(pack_rows(tok, plain, 16)))
    assert (with_bos[:, 0] == tok.bos_token_id).all()
    assert not keep_mask(with_bos, specials)[:, 0].any()
    # chat-rendered documents: rows are exactly the token stream, nothing inserted; the
    # tokens a rendered document carries itself (here BOS = <|im_start|>) stay, and are
    # excluded as special
    texts = list(mix.texts(tok, "train"))
    stream = [t for s in texts for t in tok(s, add_special_tokens=False)["input_ids"]]
    rows = torch.stack(list(pack_rows(tok, texts, 32, prepend_bos=False)))
    assert rows.shape[0] == len(stream) // 32
    assert rows.reshape(-1).tolist() == stream[: rows.numel()]
    assert not keep_mask(rows, specials, prepend_bos=False)[rows == tok.bos_token_id].any()


def test_cache_records_row_start_and_is_never_mixed(
    tiny: tuple[Path, TextMix], tmp_path: Path
) -> None:
    path, mix = tiny
    model, tok = load_model(path)
    cfg = CollectConfig(
        model=str(path), layers=(1,), tokens=600, context_size=32, mix=mix, prepend_bos=False
    )
    with one_thread():
        folder = collect_to_disk(cfg, tok, model, tmp_path / "acts", progress=False)
    assert read_cache_meta(folder).prepend_bos is False
    assert cache_matches(folder, cfg)
    assert not cache_matches(folder, replace(cfg, prepend_bos=True))
    # a cache written before the field existed was collected with BOS rows
    meta = json.loads((folder / ACTIVATION_META).read_text())
    del meta["prepend_bos"]
    (folder / ACTIVATION_META).write_text(json.dumps(meta))
    assert read_cache_meta(folder).prepend_bos is True
    assert cache_matches(folder, replace(cfg, prepend_bos=True))
    assert not cache_matches(folder, cfg)


# ---------------------------------------------------------------- decoder init
def test_saelens_heuristic_decoder_init_follows_the_saelens_rule() -> None:
    d_in, d_sae, seed = 12, 40, 7
    sae = build("standard", d_in, d_sae, decoder_init="saelens-heuristic", seed=seed)
    # SAELens 5.5.2 training_sae.py, decoder_heuristic_init: W_dec = torch.rand(d_sae,
    # d_in); rows to unit norm, times 0.1; init_encoder_as_decoder_transpose: W_enc = W_dec.T
    w = torch.rand(d_sae, d_in, generator=torch.Generator().manual_seed(seed))
    w = w / w.norm(dim=1, keepdim=True) * 0.1
    torch.testing.assert_close(sae.W_dec.data, w)
    torch.testing.assert_close(sae.W_enc.data, w.T)
    assert (sae.W_dec.data >= 0).all()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((d_sae,), 0.1))
    # stored feature-major (a [d_sae, d_in] buffer seen as [d_in, d_sae]; base.py says why)
    assert sae.W_enc.T.is_contiguous()
    gaussian = build("standard", d_in, d_sae, seed=seed)
    assert (gaussian.W_dec.data < 0).any()  # the other rule really is another rule
    unit = build("topk", d_in, d_sae, k=4, decoder_init="saelens-heuristic", seed=seed)
    torch.testing.assert_close(unit.W_dec.norm(dim=1), torch.ones(d_sae))


def test_checkpoint_from_before_the_new_fields_still_resumes(tmp_path: Path) -> None:
    cfg = TrainConfig(d_sae=32, batch_size=256, train_tokens=1024, norm_tokens=1024)
    src = MemoryActivations(synthetic_acts(n=1024))
    with one_thread():
        Trainer(cfg, src, tmp_path, QUIET).train()
    state = load_checkpoint(tmp_path / CHECKPOINT_FILE)
    for name in ("decoder_init", "apply_b_dec_to_input"):
        del state["config"][name]
    save_checkpoint(tmp_path / CHECKPOINT_FILE, state)
    assert Trainer(cfg, src, tmp_path, QUIET).resume()
    changed = cfg.model_copy(update={"apply_b_dec_to_input": False})
    with pytest.raises(TrainingError, match="apply_b_dec_to_input: checkpoint=True now=False"):
        Trainer(changed, src, tmp_path, QUIET).resume()


# ---------------------------------------------------------------- the recipe
def _documented() -> dict[str, object]:
    """The ``| `option` | value | source |`` rows of docs/training.md's paper-r1 table."""
    table = DOCS.read_text().split("<!-- paper-r1 table -->")[1].split("\n\n")[0]
    out: dict[str, object] = {}
    for m in re.finditer(r"^\| `([a-z0-9_]+)` \| ([^|]+) \|", table, re.M):
        raw = m.group(2).strip().replace(",", "").replace("`", "")
        out[m.group(1)] = ast.literal_eval({"true": "True", "false": "False"}.get(raw, raw))
    return out


def test_paper_recipe_resolves_to_the_documented_values() -> None:
    doc = _documented()
    recipe = RECIPES["paper-r1"]
    cfg = recipe.train_config()
    resolved = {**cfg.model_dump(), **recipe.model_dump(exclude={"train"})}
    assert len(doc) >= 18, doc
    for name, value in doc.items():
        assert resolved[name] == value, (name, resolved[name], value)
    assert (cfg.total_steps, cfg.clip_norm) == (200_000, 1.0)
    assert cfg.lr_at(0) == cfg.lr_at(159_999) == 5e-5  # constant, then ...
    assert cfg.lr_at(199_999) == pytest.approx(5e-5 / 40_000)  # ... linear decay to 0
    sae = build("standard", 4096, 1024, l1_coeff=cfg.l1_coeff, l1_warmup=cfg.l1_warmup)
    assert sae.current_l1(10_000 / 200_000) == 5.0  # type: ignore[attr-defined]
    assert sae.current_l1(5_000 / 200_000) == 2.5  # type: ignore[attr-defined]


def test_paper_recipe_cli_end_to_end_on_a_tiny_model(
    tiny: tuple[Path, TextMix], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, mix = tiny
    out = tmp_path / "sae"
    base = ["--recipe", "paper-r1", "--out", str(out), "--no-progress"]
    assert train.main(base) == 1
    assert "needs --out and --model" in capsys.readouterr().err
    args = [
        *base,
        *("--model", str(path), "--layer", "1", "--collect-tokens", "1024"),
        *("--context-size", "32", "--d-sae", "64", "--batch-size", "256", "--lr", "1e-3"),
        *("--chat", mix.chat, "--traces", mix.traces, "--eval-rows", "2"),
    ]
    with one_thread():
        assert train.main(args) == 0
    saved = json.loads((out / SAELENS_CFG).read_text())
    assert saved["apply_b_dec_to_input"] is False and saved["architecture"] == "standard"
    assert saved["metadata"]["prepend_bos"] is False
    assert read_cache_meta(out / "activations").prepend_bos is False
    m = json.loads((out / "metrics.json").read_text())
    assert m["prepend_bos"] is False and m["eval"]["lm_eval_tokens"] > 0
    want = {**PAPER_R1_RECIPE.train, "d_sae": 64, "batch_size": 256, "lr": 1e-3}
    want["train_tokens"] = 1024  # one pass over the collected tokens, as the recipe
    assert {k: m["config"][k] for k in want} == want
    # a cache whose rows start with BOS is refused by the recipe, not silently used
    bos_cache = _cache(tmp_path / "bos", synthetic_acts(n=512), prepend_bos=True)
    meta = json.loads((bos_cache / ACTIVATION_META).read_text())
    (bos_cache / ACTIVATION_META).write_text(json.dumps({**meta, "context_size": 1024}))
    refused = [
        "--recipe",
        "paper-r1",
        "--activations",
        str(bos_cache),
        "--out",
        str(tmp_path / "o"),
    ]
    assert train.main(refused) == 1
    assert "prepend_bos=True" in capsys.readouterr().err
