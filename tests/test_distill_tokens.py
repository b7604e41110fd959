"""The pieces of ``sae-steer distill`` that make its result a faithful R1-distill stand-in:
the tokenizer surface (template byte for byte, single think tokens, warm-started embedding
rows, tied or untied), the trace encoding and split, the schedule and data order that make
resuming exact, and the one reasoning-word counter."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.corpora import trace_records, write_jsonl
from helpers.models import default_tokenizer_dir, make_tiny_llama, make_tiny_qwen2
from helpers.r1_tokenizer import r1_tokenizer

from benchmarks.metrics import count_reasoning_words as eval_counter
from sae_training.corpus import THINK_CLOSE, THINK_OPEN, render_trace
from sae_training.distill.check import reasoning_word_rate
from sae_training.distill.data import encode_trace, epoch_order, load_traces
from sae_training.distill.finetune import Schedule, micro_batches
from sae_training.distill.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    USER,
    grow_vocabulary,
    r1_style_tokenizer,
)
from sae_training.distill.tokenizer import (
    R1_TEMPLATE_THINK_PROMPT as PACKAGE_TEMPLATE,
)
from sae_training.errors import CorpusError
from sae_training.features.vocabulary import count_reasoning_words


def _tokenizers() -> tuple[Any, Any]:
    from transformers import AutoTokenizer

    base = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    return base, r1_style_tokenizer(AutoTokenizer.from_pretrained(str(default_tokenizer_dir())))


def test_template_and_tokens_match_the_r1_stand_in_byte_for_byte() -> None:
    """The package's template is the published R1-distill revision the tests' stand-in pins by
    sha256, and conversations render and tokenize identically with both tokenizers."""
    digest = hashlib.sha256(PACKAGE_TEMPLATE.encode()).hexdigest()
    assert digest == "56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f"
    _, tok = _tokenizers()
    ref = r1_tokenizer(opens_think=True)
    conv = [
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nsum\n</think>\n\n4"},
        {"role": "user", "content": "And 3+3?"},
    ]
    for gen in (True, False):
        a = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert a == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert (
            tok(a, add_special_tokens=False)["input_ids"]
            == ref(a, add_special_tokens=False)["input_ids"]
        )
    for t in (BOS, EOS, USER, ASSISTANT, THINK_OPEN, THINK_CLOSE):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    assert tok("hi")["input_ids"][0] == tok.bos_token_id  # plain text gets BOS, as on R1
    assert tok.eos_token == tok.pad_token == EOS


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_new_rows_are_warm_started_and_ties_kept(arch: str, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    folder = make_tiny_llama(tmp_path / "m") if arch == "llama" else make_tiny_qwen2(tmp_path / "m")
    model: Any = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    base, tok = _tokenizers()
    old_emb = model.get_input_embeddings().weight.detach().clone()
    old_head = model.get_output_embeddings().weight.detach().clone()
    added = grow_vocabulary(model, base, tok)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    assert emb.shape[0] == head.shape[0] == len(tok) == old_emb.shape[0] + 6
    assert len(added) == 6
    tied = model.config.tie_word_embeddings
    assert tied == (arch == "llama")
    assert (emb.data_ptr() == head.data_ptr()) == tied
    torch.testing.assert_close(emb[: old_emb.shape[0]], old_emb)  # old rows untouched
    eos_src = base(base.eos_token, add_special_tokens=False)["input_ids"]
    think_src = base(THINK_CLOSE, add_special_tokens=False)["input_ids"]
    eos, close = tok.convert_tokens_to_ids(EOS), tok.convert_tokens_to_ids(THINK_CLOSE)
    torch.testing.assert_close(emb[eos], old_emb[eos_src].mean(0))
    torch.testing.assert_close(emb[close], old_emb[think_src].mean(0))
    if not tied:
        torch.testing.assert_close(head[close], old_head[think_src].mean(0))
    for cfg in (model.config, model.generation_config):
        assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
            tok.bos_token_id,
            eos,
            eos,
        )


def test_traces_encode_as_generated_and_split(tmp_path: Path) -> None:
    _, tok = _tokenizers()
    rec = trace_records(1)[0]
    ex = encode_trace(tok, rec)
    assert ex is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": rec["problem"]}], tokenize=False, add_generation_prompt=True
    )
    assert ex.ids[: ex.n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"]
    assert tok.decode(ex.ids) == render_trace(tok, rec)  # the corpus module's rendering
    completion = ex.ids[ex.n_prompt :]
    assert completion.count(tok.convert_tokens_to_ids(THINK_CLOSE)) == 1
    assert THINK_OPEN not in tok.decode(completion)  # opened by the prompt, not twice
    assert completion[-1] == tok.convert_tokens_to_ids(EOS)

    recs = trace_records(7) + [{"problem": "no reasoning"}]
    recs[2]["reasoning"] = " ".join(["long"] * 400)
    path = write_jsonl(tmp_path / "t.jsonl", recs)
    split = load_traces(tok, path, max_len=200, holdout_every=3)
    s = split.summary()
    assert (s["records"], s["too_long"], s["skipped"]) == (8, 1, 1)
    # usable traces 1..7 (the 8th has no reasoning); every 3rd is held out, counted before
    # the length filter (so the held-out problems do not depend on --max-len): #3 is too
    # long, #6 is held out, five train
    assert (s["train"], s["held_out"]) == (5, 1)
    capped = load_traces(tok, path, max_len=200, holdout_every=3, max_examples=2, seed=1)
    assert len(capped.train) == 2 and {e.ids[0] for e in capped.train} <= {
        e.ids[0] for e in split.train
    }
    with pytest.raises(CorpusError, match="holdout_every"):
        load_traces(tok, path, max_len=200, holdout_every=1)


def test_schedule_and_data_order_are_functions_of_the_step() -> None:
    s = Schedule(lr=1.0, steps=10, warmup=2)
    assert [s.lr_at(i) for i in (0, 1, 2, 9)] == pytest.approx([0.5, 1.0, 1.0, 1 - 0.9 * 7 / 8])
    assert s.lr_at(50) == pytest.approx(0.1)
    groups = micro_batches(5, 2, 2, seed=3)
    assert groups == micro_batches(5, 2, 2, seed=3)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2]
    flat = [i for g in groups for i in g]
    assert sorted(flat[:5]) == sorted(flat[5:]) == list(range(5))
    assert epoch_order(20, 0, 3) == epoch_order(20, 0, 3)
    assert epoch_order(20, 0, 3) != epoch_order(20, 1, 3)  # reshuffled each epoch


def test_one_reasoning_word_counter() -> None:
    texts = [
        "Wait, maybe not. Hmm... Alternatively, let me check. waiting maybes",
        "The answer is 4.",
        "",
    ]
    for t in texts:
        assert count_reasoning_words(t) == eval_counter(t)
    assert count_reasoning_words(texts[0]) >= 4
    n = sum(count_reasoning_words(t) for t in texts)
    assert reasoning_word_rate(texts, 50) == pytest.approx(100.0 * n / 50)
    assert reasoning_word_rate(texts, 0) == 0.0
