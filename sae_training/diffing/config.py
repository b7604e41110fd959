"""What a model diff is given (:class:`DiffConfig`, also the ``sae-steer diff`` options) and
what it returns (:class:`DiffResult`).

Imports nothing heavy: ``sae-steer diff --help`` builds its parser from these fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from sae_steer_vllm.command import CommandConfig
from sae_steer_vllm.constants import CHAT_CORPUS, TRACE_CORPUS


class DiffConfig(CommandConfig):
    """Model diffing as in stage-wise diffing: take an SAE trained on model A; for each of
    (A, chat), (A, reasoning), (B, chat), (B, reasoning) collect the residual stream at the
    SAE's layer, measure every feature's density with the SAE as it is, and fine-tune a copy
    of the SAE briefly on those activations to see whether each feature's decoder and encoder
    directions survive (cosine before/after). A feature is present in a condition when it
    fires there (absolutely and relative to its busiest condition) and keeps both directions;
    the conditions it is present in decide its class: present in both models, needs the
    reasoning model, needs reasoning data, needs both, dead, or other. Reports how
    ReasonScore's top features distribute over the classes next to random features.
    Writes model_diff.json, model_diff.md and model_diff.png into --out.
    """

    sae: Path = Path("runs") / "default-sae"
    """SAE folder trained on model A (any layout sae-steer loads)"""
    model_a: str | None = None
    """HF folder of model A, the SAE's model (default: the default model)"""
    model_b: str | None = None
    """HF folder of model B, same d_model (default: `sae-steer distill`'s output for model A)"""
    reasoning_model: Literal["auto", "a", "b"] = "auto"
    """which model is the reasoning one; auto: the one whose chat template opens <think> in
    its generation prompt (as R1 distills and `sae-steer distill`'s output do)"""
    chat: str = CHAT_CORPUS
    """chat corpus (JSONL of 'messages'); a bare name is looked up in the shared data folder"""
    reasoning: str = TRACE_CORPUS
    """reasoning corpus (JSONL of problem/reasoning/answer traces)"""
    tokens: int = Field(10_000, gt=0)
    """activations collected per condition (non-special tokens)"""
    steps: int = Field(30, gt=0)
    """fine-tune steps per condition"""
    batch_size: int = Field(1024, gt=0)
    """tokens per fine-tune step (at most --tokens)"""
    lr: float | None = Field(None, gt=0)
    """fine-tune learning rate, constant (default: the SAE's own training lr from its
    metrics.json, else 1e-4)"""
    l1_coeff: float | None = Field(None, ge=0)
    """L1 coefficient when fine-tuning a standard SAE (default: its metrics.json, else 5)"""
    context_size: int | None = Field(None, gt=0)
    """tokens per packed row (default: the SAE's context_size, else 256)"""
    min_density: float = Field(2e-4, ge=0, le=1)
    """a feature fires in a condition when its density there is at least this ..."""
    relative_density: float = Field(0.1, ge=0, le=1)
    """... and at least this fraction of its density in its busiest condition"""
    min_decoder_cos: float = Field(0.9, ge=-1, le=1)
    """a feature keeps its decoder direction when cos(before, after fine-tune) >= this"""
    min_encoder_cos: float = Field(0.9, ge=-1, le=1)
    """a feature keeps its encoder direction when cos(before, after fine-tune) >= this"""
    top_k: int = Field(30, gt=0)
    """ReasonScore's top features compared with random ones (needs feature_stats.safetensors)"""
    n_random: int | None = Field(None, gt=0)
    """random comparison features, drawn from the non-dead features outside the top-k
    (default: --top-k)"""
    stats: Path | None = None
    """feature statistics file (default: the SAE folder's feature_stats.safetensors)"""
    seed: int = 0
    """seed of the fine-tune batch order and of the random features"""
    out: Path = Path("runs") / "model-diff"
    """output folder (per-condition caches go to its conditions/; a rerun reuses them)"""
    device: str | None = None
    """torch device for the models (default: the first GPU, else CPU); the fine-tune runs
    where the trainer puts it"""
    progress: bool = True
    """show progress bars"""

    @property
    def random_count(self) -> int:
        return self.n_random if self.n_random is not None else self.top_k


@dataclass
class DiffResult:
    """What :func:`~sae_training.diffing.diff_models` wrote and found."""

    out_dir: Path
    json_path: Path
    report_path: Path
    plot_path: Path | None
    counts: dict[str, int]
    """features per class (:data:`~sae_training.diffing.classify.CLASSES`)"""
    classes: list[str]
    """each feature's class, by feature index"""
    reasonscore: dict[str, Any] | None = None
    """top-k vs random features per class (None without a statistics file)"""
    seconds: dict[str, float] = field(default_factory=dict)
