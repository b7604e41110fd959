"""The model-diff classification rule and its statistics, on hand-made numbers (exact)."""

from __future__ import annotations

import pytest
import torch
from helpers.r1_tokenizer import r1_chat_template, r1_tokenizer

from sae_steer_vllm.errors import UsageError
from sae_training.diffing.classify import Thresholds, class_counts, classify, pattern_counts
from sae_training.diffing.compare import compare, fisher_exact, random_features, wilson
from sae_training.diffing.conditions import opens_think, pick_reasoning_model

T = Thresholds(min_density=0.01, relative_density=0.1, min_decoder_cos=0.9, min_encoder_cos=0.8)

# rows: a-chat, a-reasoning, b-chat, b-reasoning; one column per feature
FEATURES = {
    # name: (density, decoder cos, encoder cos)
    "shared": ([0.05] * 4, [0.95] * 4, [0.9] * 4),
    "only_b": ([0.0, 0.0, 0.05, 0.05], [1.0] * 4, [1.0] * 4),
    "only_reasoning_data": ([0.001, 0.05, 0.002, 0.04], [1.0] * 4, [1.0] * 4),
    "only_b_reasoning": ([0.0, 0.0, 0.0, 0.05], [1.0] * 4, [1.0] * 4),
    "dead": ([0.005, 0.009, 0.0, 0.0], [1.0] * 4, [1.0] * 4),
    # fires on chat above min_density, but at 1/25 of its reasoning rate: absent from chat
    "relative": ([0.02, 0.5, 0.02, 0.5], [1.0] * 4, [1.0] * 4),
    # fires everywhere, decoder pulled away by model B's activations
    "moves_in_b": ([0.05] * 4, [0.99, 0.99, 0.5, 0.5], [1.0] * 4),
    # encoder just below its threshold in one condition
    "encoder_moves": ([0.05] * 4, [1.0] * 4, [0.9, 0.9, 0.9, 0.79]),
    # exactly on every threshold: present (>=)
    "boundary": ([0.01] * 4, [0.9] * 4, [0.8] * 4),
    # fires everywhere, moves everywhere
    "unstable": ([0.05] * 4, [0.1] * 4, [1.0] * 4),
}
NAMES = list(FEATURES)


def _arrays() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cols = [FEATURES[n] for n in NAMES]
    return tuple(torch.tensor([c[j] for c in cols]).T for j in range(3))  # type: ignore[return-value]


def test_rule_with_b_the_reasoning_model() -> None:
    classes, present = classify(*_arrays(), T, "b")
    assert dict(zip(NAMES, classes, strict=True)) == {
        "shared": "shared",
        "only_b": "reasoning_model",
        "only_reasoning_data": "reasoning_data",
        "only_b_reasoning": "both",
        "dead": "dead",
        "relative": "reasoning_data",
        "moves_in_b": "other",
        "encoder_moves": "other",
        "boundary": "shared",
        "unstable": "other",
    }
    assert present[:, NAMES.index("moves_in_b")].tolist() == [True, True, False, False]
    assert class_counts(classes) == {
        "shared": 2,
        "reasoning_model": 1,
        "reasoning_data": 2,
        "both": 1,
        "dead": 1,
        "other": 3,
    }
    patterns = pattern_counts(present, classes)
    assert patterns["a-chat + a-reasoning + b-chat + b-reasoning"] == 2
    assert patterns["a-reasoning + b-reasoning"] == 2
    assert patterns["a-chat + a-reasoning"] == 1
    assert patterns["a-chat + a-reasoning + b-chat"] == 1
    assert patterns["none"] == 1
    assert sum(patterns.values()) == len(NAMES) - 1  # the dead feature has no pattern


def test_rule_with_a_the_reasoning_model() -> None:
    """The same numbers with the roles swapped: only the model-dependent classes change."""
    got = dict(zip(NAMES, classify(*_arrays(), T, "a")[0], strict=True))
    assert got["moves_in_b"] == "reasoning_model"  # present only in A's two conditions
    assert got["only_b"] == "other" and got["only_b_reasoning"] == "other"
    assert got["only_reasoning_data"] == "reasoning_data" and got["shared"] == "shared"


def test_rule_rejects_bad_shapes_and_roles() -> None:
    d, c, e = _arrays()
    with pytest.raises(ValueError, match="4, d_sae"):
        classify(d[:3], c[:3], e[:3], T, "b")
    with pytest.raises(ValueError, match="'a' or 'b'"):
        classify(d, c, e, T, "auto")  # type: ignore[arg-type]


def test_wilson_and_fisher_known_values() -> None:
    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    # Fisher's tea-tasting table and a lopsided one (values as scipy.stats.fisher_exact)
    assert fisher_exact(3, 1, 1, 3) == pytest.approx(0.4857142857)
    assert fisher_exact(1, 9, 11, 3) == pytest.approx(0.0027594561852)
    assert fisher_exact(4, 4, 4, 4) == pytest.approx(1.0)


def test_compare_counts_and_random_draw() -> None:
    classes = ["shared", "dead", "reasoning_data", "reasoning_data", "other", "shared"]
    rand = random_features(classes, exclude=[2], n=10, seed=0)
    assert rand == [0, 3, 4, 5]  # every non-dead feature outside the top, none twice
    assert random_features(classes, [2], 2, seed=1) == random_features(classes, [2], 2, seed=1)
    per = compare(classes, top=[2, 3], rand=[0, 4])
    assert per["reasoning_data"]["top"] == 2 and per["reasoning_data"]["random"] == 0
    assert per["reasoning_data"]["top_share"] == 1.0
    assert per["reasoning_data"]["all_alive_share"] == pytest.approx(2 / 5)
    assert per["reasoning_data"]["fisher_p"] == pytest.approx(fisher_exact(2, 0, 0, 2))


def test_reasoning_model_is_told_by_the_template() -> None:
    tok = r1_tokenizer(opens_think=True)
    assert opens_think(tok)
    tok.chat_template = r1_chat_template(opens_think=False)  # the January-2025 template
    assert not opens_think(tok)
    tok.chat_template = None
    assert not opens_think(tok)  # no template at all: not a reasoning template
    assert pick_reasoning_model("auto", False, True) == "b"
    assert pick_reasoning_model("auto", True, False) == "a"
    assert pick_reasoning_model("a", False, True) == "a"
    for both in (True, False):
        with pytest.raises(UsageError, match="--reasoning-model a or b"):
            pick_reasoning_model("auto", both, both)


def test_wilson_is_exact_at_the_bounds() -> None:
    """0 of n and n of n give intervals that contain 0 and 1 exactly (a rounding residue
    made the plot's error bars negative on a real run)."""
    from sae_training.diffing.compare import wilson

    for n in (1, 3, 7, 30, 1000):
        assert wilson(0, n)[0] == 0.0 and wilson(n, n)[1] == 1.0
        lo, hi = wilson(0, n)
        assert 0.0 < hi < 1.0
