"""The classification rule of ``sae-steer diff``: per feature, in which of the four conditions
it is present, and what that pattern says it needs.

The rule, exactly (thresholds are :class:`Thresholds`, the ``sae-steer diff`` options):

1. A feature **fires** in condition c when its density there (fraction of tokens on which the
   SAE, as trained, gives it a positive activation) is ``>= min_density`` and ``>=
   relative_density`` x its largest density over the four conditions. The relative part is
   what makes a feature that fires 30x more often on reasoning traces than on chat count as
   absent from chat, although it fires there now and then.
2. It **keeps its direction** in c when fine-tuning the SAE briefly on c's activations
   leaves both its decoder row and its encoder column within the cosine thresholds
   (``cos(before, after) >= min_decoder_cos`` and ``>= min_encoder_cos``): the data of c
   does not pull it elsewhere, as in stage-wise model diffing.
3. It is **present** in c when it fires and keeps its direction there.
4. Its class follows from the set of conditions it is present in, with the models named by
   role (which of A and B is the reasoning model is given):

   ============================================  ======================
   present in                                     class
   ============================================  ======================
   all four                                       ``shared`` (present in both models)
   exactly the reasoning model's two conditions   ``reasoning_model``
   exactly the two reasoning-data conditions      ``reasoning_data``
   only (reasoning model, reasoning data)         ``both`` (needs both)
   -- (fires in no condition)                     ``dead``
   any other set                                  ``other``
   ============================================  ======================

   ``other`` keeps the cases the four hypotheses do not cover (e.g. present only with the
   base model, only on chat, or firing somewhere but moving everywhere); the report lists
   every pattern's count, so nothing is hidden in it.

Why presence rather than "moved when the model changed": an SAE trained on a base model
cannot hold a feature that exists only in the reasoning model, and the paper's claim
(reasoning features are present only in reasoning models) is a claim about presence. With
the SAE trained on the reasoning model (the paper's setup) that claim predicts its top
ReasonScore features to be ``reasoning_model`` or ``both``; with the SAE trained on the base
model the informative outcome is ``shared`` vs ``reasoning_data`` vs present only with the
base model (``other``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ModelRole = Literal["a", "b"]
DataKind = Literal["chat", "reasoning"]

CONDITIONS: tuple[tuple[ModelRole, DataKind], ...] = (
    ("a", "chat"),
    ("a", "reasoning"),
    ("b", "chat"),
    ("b", "reasoning"),
)
"""The four conditions, in the row order of every ``[4, d_sae]`` array here; (A, chat) first:
the reference, nearest to what the SAE was trained on."""

CLASSES: dict[str, str] = {
    "shared": "present in both models",
    "reasoning_model": "needs the reasoning model",
    "reasoning_data": "needs reasoning data",
    "both": "needs both",
    "dead": "dead (fires in no condition)",
    "other": "other pattern",
}
"""Class keys in report order, with their labels."""


def condition_name(model: ModelRole, data: DataKind) -> str:
    """``a-chat``, ``b-reasoning``, ...: folder and column names."""
    return f"{model}-{data}"


@dataclass(frozen=True)
class Thresholds:
    """The numbers of the rule (see the module docstring)."""

    min_density: float
    relative_density: float
    min_decoder_cos: float
    min_encoder_cos: float


def fires(density: torch.Tensor, t: Thresholds) -> torch.Tensor:
    """``[4, F]`` bool: step 1 of the rule."""
    busiest = density.max(dim=0).values
    return (density >= t.min_density) & (density >= t.relative_density * busiest)


def presence(
    density: torch.Tensor, cos_dec: torch.Tensor, cos_enc: torch.Tensor, t: Thresholds
) -> torch.Tensor:
    """``[4, F]`` bool: steps 1-3 of the rule (rows in :data:`CONDITIONS` order)."""
    if not density.shape == cos_dec.shape == cos_enc.shape or density.shape[0] != 4:
        raise ValueError(
            f"expected three [4, d_sae] arrays, got {tuple(density.shape)}, "
            f"{tuple(cos_dec.shape)}, {tuple(cos_enc.shape)}"
        )
    kept = (cos_dec >= t.min_decoder_cos) & (cos_enc >= t.min_encoder_cos)
    return fires(density, t) & kept


def pattern_label(present: tuple[bool, ...]) -> str:
    """``a-chat + b-reasoning``, or ``none``: a presence pattern in words."""
    names = [condition_name(*c) for c, p in zip(CONDITIONS, present, strict=True) if p]
    return " + ".join(names) if names else "none"


def class_of(present: tuple[bool, ...], any_fires: bool, reasoning_model: ModelRole) -> str:
    """Step 4 of the rule for one feature (``present`` in :data:`CONDITIONS` order)."""
    if not any_fires:
        return "dead"
    cells = {c for c, p in zip(CONDITIONS, present, strict=True) if p}
    base: ModelRole = "a" if reasoning_model == "b" else "b"
    r = reasoning_model
    if len(cells) == 4:
        return "shared"
    if cells == {(r, "chat"), (r, "reasoning")}:
        return "reasoning_model"
    if cells == {(base, "reasoning"), (r, "reasoning")}:
        return "reasoning_data"
    if cells == {(r, "reasoning")}:
        return "both"
    return "other"


def classify(
    density: torch.Tensor,
    cos_dec: torch.Tensor,
    cos_enc: torch.Tensor,
    t: Thresholds,
    reasoning_model: ModelRole,
) -> tuple[list[str], torch.Tensor]:
    """Every feature's class and the ``[4, F]`` presence matrix."""
    if reasoning_model not in ("a", "b"):
        raise ValueError(f"reasoning_model must be 'a' or 'b', got {reasoning_model!r}")
    present = presence(density, cos_dec, cos_enc, t)
    any_fires = fires(density, t).any(dim=0)
    cols = present.T.tolist()
    alive = any_fires.tolist()
    return [
        class_of(tuple(p), a, reasoning_model) for p, a in zip(cols, alive, strict=True)
    ], present


def class_counts(classes: list[str]) -> dict[str, int]:
    """Features per class, every class listed (zeros included), in report order."""
    return {k: sum(1 for c in classes if c == k) for k in CLASSES}


def pattern_counts(present: torch.Tensor, classes: list[str]) -> dict[str, int]:
    """Features per presence pattern among the non-dead ones, most common first."""
    out: dict[str, int] = {}
    for col, cls in zip(present.T.tolist(), classes, strict=True):
        if cls == "dead":
            continue
        key = pattern_label(tuple(col))
        out[key] = out.get(key, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))
