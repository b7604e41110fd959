"""R1-distill chat templates: traces keep their reasoning through collection and scoring.

The DeepSeek-R1 distills' template keeps only what follows ``</think>`` in an assistant
turn, so rendering a trace as a finished assistant message (what ``corpus.render_trace``
used to do) dropped the reasoning on the paper's model. The stand-in tokenizer
(``helpers/r1_tokenizer.py``) carries both published template revisions byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.activations import one_thread
from helpers.corpora import trace_records, write_jsonl
from helpers.models import default_tokenizer_dir
from helpers.r1_tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    R1_TEMPLATE_JAN_2025,
    R1_TEMPLATE_THINK_PROMPT,
    THINK_CLOSE,
    THINK_OPEN,
    USER,
    make_r1_tokenizer,
    make_tiny_r1_llama,
)
from helpers.saes import make_sae

from sae_steer_vllm.constants import ACTIVATION_META
from sae_training.activation_cache import cache_matches
from sae_training.activation_sources import DiskCache
from sae_training.collection import CollectConfig, collect_to_disk
from sae_training.corpus import (
    TRACE_RENDERING,
    TextMix,
    iter_rendered,
    render_trace,
    trace_format,
)
from sae_training.errors import CorpusError
from sae_training.features.stats_pass import run_feature_stats
from sae_training.features.vocabulary import load_vocabulary
from sae_training.lm import load_model
from sae_training.tokens import CorpusSpec, keep_mask, special_token_ids

REASONING_WORDS = (" Wait", " Alternatively", " Hmm")  # in every trace_records() trace


@pytest.fixture(scope="module")
def r1(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny R1 Llama (January template) and tokenizers of both template revisions."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("r1")
    model_dir = make_tiny_r1_llama(root / "llama", opens_think=False)
    model, jan = load_model(model_dir, device="cpu")
    think = AutoTokenizer.from_pretrained(str(make_r1_tokenizer(root / "tok", opens_think=True)))
    traces = write_jsonl(root / "traces.jsonl", trace_records(8))
    return {"model": model, False: jan, True: think, "traces": traces}


def _old_render(tok: Any, rec: dict[str, str]) -> str:
    """What render_trace did before: the trace as a finished assistant message."""
    content = f"<think>\n{rec['reasoning'].strip()}\n</think>\n\n{rec['answer']}"
    msgs = [{"role": "user", "content": rec["problem"]}, {"role": "assistant", "content": content}]
    return str(tok.apply_chat_template(msgs, tokenize=False))


def _ids(tok: Any, text: str) -> list[int]:
    return [int(i) for i in tok(text, add_special_tokens=False)["input_ids"]]


def _contains(seq: list[int], sub: list[int]) -> bool:
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


@contextmanager
def _fed_ids(model: Any) -> Iterator[list[torch.Tensor]]:
    """Every batch of token ids the model's embedding layer actually processed."""
    seen: list[torch.Tensor] = []
    emb = model.get_input_embeddings()
    handle = emb.register_forward_hook(lambda _m, args, _out: seen.append(args[0].clone()))
    try:
        yield seen
    finally:
        handle.remove()


def test_stand_in_carries_the_published_templates(r1: dict[str, Any]) -> None:
    digest = {
        R1_TEMPLATE_JAN_2025: "b6835114b7303ddd78919a82e4d9f7d8c26ed0d7dfc36beeb12d524f6144eab1",
        R1_TEMPLATE_THINK_PROMPT: "56a1447ad31926fdc21fb07e56e5642bd9c850c4f52d8c8af7bbe5f079a84f5f",
    }
    for text, sha in digest.items():
        assert hashlib.sha256(text.encode()).hexdigest() == sha
    # the revision changes the generation prompt and nothing else
    old_tail = "{{'<｜Assistant｜>'}}{% endif %}"
    new_tail = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"
    assert R1_TEMPLATE_JAN_2025.replace(old_tail, new_tail) == R1_TEMPLATE_THINK_PROMPT
    for opens in (False, True):
        tok = r1[opens]
        assert tok.chat_template == (R1_TEMPLATE_THINK_PROMPT if opens else R1_TEMPLATE_JAN_2025)
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (BOS, EOS, EOS)
        flags = {t.content: t.special for t in tok.added_tokens_decoder.values()}
        assert flags[BOS] and flags[EOS]
        assert not any(flags[t] for t in (USER, ASSISTANT, THINK_OPEN, THINK_CLOSE))
        assert tok("x")["input_ids"][0] == tok.bos_token_id  # BOS on plain text, as Llama 3
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": "q"}], tokenize=False, add_generation_prompt=True
        )
        assert prompt == f"{BOS}{USER}q{ASSISTANT}" + ("<think>\n" if opens else "")
    assert r1["model"].config.vocab_size == len(r1[False])


@pytest.mark.parametrize("opens_think", [False, True])
def test_template_strips_reasoning_from_an_assistant_turn(
    r1: dict[str, Any], opens_think: bool
) -> None:
    """Why the fix is needed: the old rendering loses every reasoning word on R1."""
    tok, rec = r1[opens_think], trace_records(1)[0]
    old = _old_render(tok, rec)
    assert rec["answer"] in old and THINK_CLOSE not in old
    for word in REASONING_WORDS:
        assert word.strip() not in old
    assert not _contains(_ids(tok, old), _ids(tok, " Wait"))


@pytest.mark.parametrize("opens_think", [False, True])
def test_trace_keeps_its_reasoning(r1: dict[str, Any], opens_think: bool) -> None:
    tok, rec = r1[opens_think], trace_records(1)[0]
    fmt = trace_format(tok)
    assert (fmt.opens_think, fmt.end_of_turn) == (opens_think, EOS)
    text = render_trace(tok, rec, fmt)
    assert text is not None
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": rec["problem"]}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith(prompt)
    assert text == (
        f"{BOS}{USER}{rec['problem']}{ASSISTANT}<think>\n{rec['reasoning']}\n</think>\n\n"
        f"{rec['answer']}{EOS}"
    )
    ids = _ids(tok, text)
    for word in REASONING_WORDS:
        assert _contains(ids, _ids(tok, word)), word
    think_open, think_close = tok.convert_tokens_to_ids([THINK_OPEN, THINK_CLOSE])
    assert ids.count(think_open) == 1 and ids.count(think_close) == 1  # no doubled <think>
    assert ids[-1] == tok.eos_token_id and ids.count(tok.bos_token_id) == 1


def test_template_without_reasoning_handling_is_unchanged_but_for_the_turn_gap() -> None:
    """SmolLM2 (ChatML): same text as the old rendering, minus the newline the template puts
    between turns, which the model never generates."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    rec = trace_records(1)[0]
    assert trace_format(tok).end_of_turn == "<|im_end|>"
    text = render_trace(tok, rec)
    assert text is not None and text + "\n" == _old_render(tok, rec)
    assert text.count(THINK_OPEN) == 1 and "Alternatively" in text


def test_no_chat_template_is_a_clear_error(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_tokenizer_dir()))
    tok.chat_template = None
    traces = write_jsonl(tmp_path / "t.jsonl", trace_records(2))
    chats = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    texts = write_jsonl(tmp_path / "x.jsonl", [{"text": "plain text"}])
    for path, kind in ((traces, "trace"), (chats, "chat")):
        with pytest.raises(CorpusError, match="no chat template.*kind 'text'"):
            list(iter_rendered(tok, path, kind))
    assert list(iter_rendered(tok, texts, "text")) == ["plain text"]


def test_collection_sees_the_reasoning_tokens(r1: dict[str, Any], tmp_path: Path) -> None:
    """The rows `sae-steer train` collects from hold the reasoning, at kept positions; a
    cache collected with the old rendering (no ``trace_rendering`` in its mix) is not reused."""
    tok, model = r1[False], r1["model"]
    mix = TextMix(traces=str(r1["traces"]), trace_ratio=1.0, holdout_every=4)
    cfg = CollectConfig(model="tiny-r1", layers=(1,), tokens=300, context_size=32, mix=mix)
    with one_thread(), _fed_ids(model) as seen:
        folder = collect_to_disk(cfg, tok, model, tmp_path / "cache", progress=False)
    assert DiskCache(folder, layer=1).head(300).shape == (300, 64)
    rows = torch.cat(seen)
    keep = keep_mask(rows, special_token_ids(tok))
    kept = rows[keep].tolist()
    for word in REASONING_WORDS:
        assert _contains(kept, _ids(tok, word)), word
    assert tok.convert_tokens_to_ids(THINK_CLOSE) in kept

    assert cache_matches(folder, cfg)
    meta_path = folder / ACTIVATION_META
    meta = json.loads(meta_path.read_text())
    assert meta["mix"].pop("trace_rendering") == TRACE_RENDERING
    meta_path.write_text(json.dumps(meta))
    assert not cache_matches(folder, cfg)


def test_scoring_counts_reasoning_words_and_the_old_text_had_none(r1: dict[str, Any]) -> None:
    """ReasonScore's vocabulary masks fire on the rendered traces; on the old rendering of
    the same records (scored as plain text) they never did."""
    model = r1["model"]
    sae, vocab = make_sae(), load_vocabulary()
    tok = r1[True]  # the revised template, with the model (same vocabulary)
    spec = CorpusSpec(r1["traces"], kind="trace", ctx=64)
    with one_thread(), _fed_ids(model) as seen:
        new = run_feature_stats(model, tok, sae, spec, vocab, progress=False).stats
    fed = torch.cat([s.reshape(-1) for s in seen]).tolist()
    assert _contains(fed, _ids(tok, " Alternatively")) and _contains(fed, _ids(tok, " Wait"))
    counts = dict(zip(new.groups, new["count_group"].tolist(), strict=True))
    assert counts["wait"] > 0 and counts["alternatively"] > 0 and counts["hmm"] > 0

    old_texts = [{"text": _old_render(tok, rec)} for rec in trace_records(8)]
    old_spec = CorpusSpec(
        write_jsonl(r1["traces"].with_name("old.jsonl"), old_texts), kind="text", ctx=64
    )
    with one_thread():
        old = run_feature_stats(model, tok, sae, old_spec, vocab, progress=False).stats
    assert int(old["count_group"].sum()) == 0
    assert int(old["n_tokens"]) < int(new["n_tokens"]) / 2
