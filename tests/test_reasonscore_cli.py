"""`sae-steer score` end to end on a tiny model, the ranked table, and the token-dependence check."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import write_jsonl
from helpers.models import TINY_LAYER, make_tiny_model
from helpers.saes import make_sae

from sae_steer_vllm.cli import main as cli_main
from sae_steer_vllm.constants import TABLE_CSV, TABLE_JSON
from sae_steer_vllm.sae import SAE, SAEConfig, load_max_activation
from sae_training.features.feature_stats import FeatureStats
from sae_training.features.masks import build_patterns
from sae_training.features.token_dependence import inject, injection_phrases
from sae_training.features.vocabulary import load_vocabulary


def _long_traces(n: int) -> list[dict[str, Any]]:
    body = (
        "Okay, let me think about this. The area is 24 and the volume is 432. Hmm, so the "
        "height is 432 / 24. Wait, that gives 18. Maybe I should double check: 18 * 24 = 432. "
        "Alternatively, perhaps divide step by step. Therefore the height is 18. But another "
        "way is to estimate. However, 18 is exact."
    )
    return [
        {
            "problem": f"Cylinder {i}: volume 432, base 24. Height?",
            "reasoning": body,
            "answer": "18",
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny_cli_model"))


def _detector_sae(model_dir: Path) -> SAE:
    """Feature 0 detects the tokens 'Wait' / ' Wait' from the embedding direction: a pure
    token detector. The other features are random."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    ids = [tok.encode(w, add_special_tokens=False)[0] for w in ("Wait", " Wait")]
    emb = model.get_input_embeddings().weight.detach()
    direction = emb[ids].sum(dim=0)
    direction = direction / direction.norm()
    base = make_sae("standard", dead=(7,))
    W_enc = base.W_enc.detach().clone()
    b_enc = base.b_enc.detach().clone()
    W_enc[:, 0] = direction * 10.0
    # fire only where the residual leans strongly towards the embedding direction
    with torch.no_grad():
        texts = ["Wait, the value is 3 and it is fine.", "So the total is 9 apples today."]
        from sae_training.lm import ResidReader

        reader = ResidReader(model, TINY_LAYER)
        proj = []
        for t in texts:
            x = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]])
            proj.append((reader.read_one(x)[0] - base.b_dec) @ W_enc[:, 0])
        p = torch.cat(proj)
    wait_proj = float(p[0])
    others = float(p[1:].max()) if len(p) > 1 else 0.0
    assert wait_proj > others, "the tiny model should keep the token identity at layer 1"
    b_enc[0] = -(wait_proj + others) / 2
    cfg = SAEConfig(d_in=64, d_sae=base.cfg.d_sae, architecture="standard", hook_layer=TINY_LAYER)
    return SAE(cfg, W_enc, b_enc, base.W_dec.detach(), base.b_dec.detach())


def test_score_cli_end_to_end(model_dir: Path, tmp_path: Path) -> None:
    sae_dir = _detector_sae(model_dir).save(tmp_path / "sae")
    corpus = write_jsonl(tmp_path / "traces.jsonl", _long_traces(12))
    rc = cli_main(
        [
            "score",
            "--sae",
            str(sae_dir),
            "--model",
            str(model_dir),
            "--corpus",
            str(corpus),
            "--max-tokens",
            "1500",
            "--ctx",
            "128",
            "--batch-size",
            "2",
            "--top-k",
            "25",
            "--token-check",
            "25",
            "--token-texts",
            "6",
            "--no-progress",
        ]
    )
    assert rc == 0
    st = FeatureStats.load(sae_dir)
    assert int(st["n_tokens"]) > 0 and st.meta["n_tokens_all"] == 1500
    served = load_max_activation(sae_dir)
    assert served is not None and torch.equal(served, st["max_activation"])
    assert float(served[7]) == 0.0 and float(served[0]) > 0.0

    doc = json.loads((sae_dir / TABLE_JSON).read_text())
    rows = doc["features"]
    assert len(rows) == 25 and [r["rank"] for r in rows] == list(range(1, 26))
    scores = [r["reasonscore"] for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["feature"] == int(st.ranking()[0])
    assert doc["meta"]["alpha"] == 0.7 and doc["meta"]["window"] == [1, 2]
    with (sae_dir / TABLE_CSV).open() as f:
        csv_rows = list(csv.DictReader(f))
    assert [int(r["feature"]) for r in csv_rows] == [r["feature"] for r in rows]
    assert "injection_ratio" in csv_rows[0] and "reasonscore" in csv_rows[0]

    assert all(r["injection_ratio"] is not None or r["act_reasoning"] == 0 for r in rows)
    assert all(isinstance(r["likely_token_detector"], bool) for r in rows)
    # the 'Wait' detector's reasoning-word activation sits almost entirely on the 'wait' group
    assert float(st["group_share"][0][st.groups.index("wait")]) > 0.5


def test_token_detector_is_flagged(model_dir: Path, tmp_path: Path) -> None:
    """The check measures what it says: a pure 'Wait' detector keeps its activation when the
    word is injected into GSM8K-style answers, so its injection ratio is near 1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sae_training.features.stats_pass import run_feature_stats
    from sae_training.features.token_dependence import (
        measure_token_dependence,
        reasoning_reference,
    )
    from sae_training.lm import ResidReader
    from sae_training.tokens import CorpusSpec

    sae = _detector_sae(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    corpus = write_jsonl(tmp_path / "traces.jsonl", _long_traces(4))
    vocab = load_vocabulary()
    st = run_feature_stats(
        model, tok, sae, CorpusSpec(corpus, ctx=256), vocab, progress=False
    ).stats
    nonreasoning = write_jsonl(
        tmp_path / "nr.jsonl",
        [
            {
                "q": f"Tom has {i} apples and buys 3 more. How many?",
                "a": f"He has {i} apples. He buys 3 more. So he has {i + 3} apples.\n#### {i + 3}",
            }
            for i in range(6)
        ],
    )
    dep = measure_token_dependence(
        ResidReader(model, TINY_LAYER),
        sae,
        tok,
        build_patterns(tok, vocab),
        [0, 7],
        *reasoning_reference(st.tensors),
        n_texts=6,
        sources=((str(nonreasoning), "q", "a"),),
        progress=False,
    )
    assert dep[0].injected > 0 and dep[0].reasoning > 0
    assert dep[0].injection_ratio is not None and 0.5 <= dep[0].injection_ratio <= 2.0
    assert dep[0].likely_token_detector
    assert dep[0].baseline < dep[0].injected  # plain answers contain no 'Wait'
    assert dep[7].injection_ratio is None and not dep[7].likely_token_detector  # dead feature


def test_inject_puts_vocabulary_at_sentence_starts() -> None:
    from helpers.models import default_tokenizer_dir
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    vp = build_patterns(tok, load_vocabulary())
    phrases = injection_phrases(vp)
    assert phrases[:3] == ["Alternatively", "Hmm", "Maybe"] and "Let me" in phrases
    text = "A is 3. B is 4. C is 5.\nD is 6."
    out, used = inject(text, phrases, start=1, every=2)
    assert out == "Hmm, A is 3. B is 4. Maybe, C is 5.\nD is 6." and used == 2
    out, used = inject(text, phrases, start=9, every=1)
    assert out.count(", ") == 4 and used == 4 and out.startswith(phrases[9] + ", A")


def test_score_cli_user_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["score", "--sae", str(tmp_path / "nope")]) == 2
    assert "not found" in capsys.readouterr().err
    sae_dir = make_sae().save(tmp_path / "sae")
    assert cli_main(["score", "--sae", str(sae_dir), "--corpus", str(tmp_path / "x.jsonl")]) == 2
    assert cli_main(["score", "--sae", str(sae_dir), "--max-tokens", "0"]) == 2
    bad_model = tmp_path / "not_a_model"
    bad_model.mkdir()
    corpus = write_jsonl(tmp_path / "c.jsonl", _long_traces(1))
    rc = cli_main(
        ["score", "--sae", str(sae_dir), "--model", str(bad_model), "--corpus", str(corpus)]
    )
    assert rc == 1
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert cli_main(["dashboard", "--sae", str(tmp_path / "nope")]) == 2
