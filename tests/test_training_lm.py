"""The one text -> tokens -> residual stack: special-token rule, layer finder, cache rule.

Collection and scoring used to have their own copies, which had drifted: collection
ignored only ``all_special_ids`` (so control tokens flagged special, such as SmolLM2's
``<file_sep>``, were kept in the training data), and each layer finder knew model
families the other did not (GPT-NeoX only in one, OPT only in the other).
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.activations import synthetic_acts, write_cache

from sae_steer_vllm.default_model import default_model_dir
from sae_training import CollectConfig, TextMix, cache_matches, find_matching_cache
from sae_training.lm import ResidReader, decoder_layers
from sae_training.tokens import keep_mask, pack_rows, special_token_ids


def test_special_tokens_include_added_tokens_flagged_special() -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir()))
    file_sep = tok.convert_tokens_to_ids("<file_sep>")
    assert file_sep not in tok.all_special_ids  # the rule collection used to apply
    specials = special_token_ids(tok)
    assert file_sep in specials and set(tok.all_special_ids) <= specials
    text = "Some code follows <file_sep> and then more words to fill the row up."
    rows = torch.stack(list(pack_rows(tok, [text] * 4, 16)))
    keep = keep_mask(rows, specials)
    assert (rows == file_sep).any()
    assert not keep[rows == file_sep].any()  # never stored as a training activation
    assert keep[(rows != file_sep) & (rows != tok.bos_token_id)].all()


# Three decoder layers of width 16 in each family's own config vocabulary.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {"intermediate_size": 32, "num_key_value_heads": 1}),
    "gpt_neox": ("GPTNeoXConfig", {"intermediate_size": 32}),
    "opt": ("OPTConfig", {"ffn_dim": 32, "word_embed_proj_dim": 16}),
}


def _tiny(family: str) -> torch.nn.Module:
    import transformers as tf

    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=3, n_head=2)
    else:
        name, extra = FAMILIES[family]
        cfg = getattr(tf, name)(
            vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, **extra
        )
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "opt"])
def test_reader_reads_resid_post_of_every_family_and_stops_early(family: str) -> None:
    model = _tiny(family)
    ids = torch.randint(4, 64, (2, 8))
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    calls: list[int] = []
    hook = decoder_layers(model)[2].register_forward_hook(lambda *a: calls.append(1))
    got = ResidReader(model, [0, 1])(ids)
    hook.remove()
    torch.testing.assert_close(got[0], ref[1])
    torch.testing.assert_close(got[1], ref[2])
    assert calls == [] and got[0].dtype == torch.float32


def test_one_cache_rule(tmp_path: Path) -> None:
    mix = TextMix(chat="c.jsonl", traces="t.jsonl")
    acts = synthetic_acts(n=600, d=8)
    folder = tmp_path / "run" / "activations"
    want = CollectConfig(model="m", layers=(5,), tokens=600, context_size=0, mix=mix)
    write_cache(folder, {3: acts, 5: acts}, model="m")
    assert not cache_matches(folder, want)  # collected from another document mix
    write_cache(folder, {3: acts, 5: acts}, model="m", mix=asdict(mix))
    assert cache_matches(folder, want)  # a cache with more layers serves too
    assert not cache_matches(folder, replace(want, tokens=601))
    assert not cache_matches(folder, replace(want, layers=(4,)))
    assert not cache_matches(folder, replace(want, dtype="bfloat16"))
    assert not cache_matches(tmp_path / "nothing", want)
    assert find_matching_cache([tmp_path / "elsewhere", tmp_path], want) == folder
    assert find_matching_cache([tmp_path], replace(want, split="eval")) is None
