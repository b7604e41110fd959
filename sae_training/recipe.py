"""The default recipe: the one place the default model's training settings are written.

``sae-steer train --recipe default``, :func:`default_job`, :func:`train_default_sae`
and the demo all start from :data:`DEFAULT_RECIPE`; :class:`~sae_training.trainer.
TrainConfig` supplies every hyperparameter the recipe leaves alone (its defaults are the
paper's). Smaller runs (tests, the demo's ``--small``) scale the recipe down with
:meth:`Recipe.job`, keeping its number of epochs over the collected data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

from sae_training.lm import model_or_default
from sae_training.train_job import TrainJob, run_training
from sae_training.trainer import RunOptions, TrainConfig


class Recipe(BaseModel):
    """Which layer, how much data, how to train: a complete recipe for one model."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    layer: int
    """decoder layer whose resid_post is trained on"""
    collect_tokens: int
    """activations collected (non-special tokens)"""
    context_size: int
    """tokens per packed row when collecting"""
    prepend_bos: bool = True
    """whether every packed row starts with BOS (SAELens ``prepend_bos``)"""
    model: str | None = None
    """the model the recipe is written for (None: the default model)"""
    train: dict[str, Any]
    """:class:`TrainConfig` fields that differ from its defaults"""
    eval_rows: int = TrainJob.eval_rows
    """held-out rows for the final evaluation"""
    tiny_below: int = 50_000
    """a run collecting fewer tokens than this is test-sized ..."""
    tiny_eval_rows: int = 2
    """... and gets this many evaluation rows (3 full forwards per row)"""

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        TrainConfig(**self.train)  # a recipe that cannot train is refused when written
        return self

    def __getitem__(self, key: str) -> Any:
        """Dict-style access (``DEFAULT_RECIPE["train"]["lr"]``), as the recipe once was."""
        return getattr(self, key)

    @property
    def epochs(self) -> float:
        """Passes over the collected data (training tokens / collected tokens)."""
        return float(self.train["train_tokens"]) / self.collect_tokens

    def train_config(self, collect_tokens: int | None = None, **overrides: Any) -> TrainConfig:
        """The recipe's :class:`TrainConfig` for ``collect_tokens`` collected activations
        (default: the recipe's), with ``overrides`` (``None`` values ignored)."""
        tcfg = dict(self.train)
        collect = self.collect_tokens if collect_tokens is None else collect_tokens
        if collect_tokens is not None:
            tcfg["train_tokens"] = int(collect * self.epochs)
        tcfg.update({k: v for k, v in overrides.items() if v is not None})
        batch = tcfg.get("batch_size", TrainConfig.model_fields["batch_size"].default)
        norm = tcfg.get("norm_tokens", TrainConfig.model_fields["norm_tokens"].default)
        tcfg["batch_size"] = min(batch, collect)
        tcfg["train_tokens"] = max(tcfg["train_tokens"], tcfg["batch_size"])
        tcfg["norm_tokens"] = min(norm, collect)
        return TrainConfig(**tcfg)

    def job(
        self,
        out_dir: str | Path,
        model_path: str | Path,
        *,
        tokens: int | None = None,
        layer: int | None = None,
        context_size: int | None = None,
        eval_rows: int | None = None,
        resume: bool = False,
        progress: bool = True,
        **train_overrides: Any,
    ) -> TrainJob:
        """The recipe as a :class:`TrainJob`; ``tokens`` shrinks collection (and training)."""
        collect = self.collect_tokens if tokens is None else tokens
        if eval_rows is None:
            eval_rows = self.eval_rows if collect >= self.tiny_below else self.tiny_eval_rows
        return TrainJob(
            out_dir=Path(out_dir),
            train=self.train_config(tokens, **train_overrides),
            layer=self.layer if layer is None else layer,
            eval_rows=eval_rows,
            model=str(model_path),
            collect_tokens=collect,
            context_size=self.context_size if context_size is None else context_size,
            prepend_bos=self.prepend_bos,
            resume=resume,
            options=RunOptions(progress=progress),
        )


#: The default recipe for SmolLM2-135M-Instruct on a 2-core CPU (see docs/training.md).
DEFAULT_RECIPE = Recipe(
    layer=18,
    collect_tokens=240_000,
    context_size=256,
    train={
        # BatchTopK rather than the paper's standard ReLU+L1: on this budget (well under
        # 1M tokens) the standard SAE stays below EV 0.6 at L0 <= 100 (docs/training.md),
        # and the k-sparse kernels train ~2x faster per token. BatchTopK rather than TopK
        # because it is saved as JumpReLU, whose features the server can clamp exactly
        # (the paper's intervention); a TopK feature's value depends on all the others.
        "architecture": "batchtopk",
        "k": 64,
        "d_sae": 9216,
        "lr": 1e-3,
        "lr_decay": 0.2,
        "batch_size": 1024,
        # 3 epochs over the 240k collected tokens: the sparse kernels train them in about the
        # time 1.5 epochs took before (166 s vs 246 s here), and the same data gave held-out
        # EV 0.756 instead of 0.630 at L0 ~62 (docs/training.md)
        "train_tokens": 720_000,
    },
)
#: The paper's released SAE (andreuka18/deepseek-r1-distill-llama-8b-lmsys-openthoughts),
#: as the authors trained it with SAELens 5.5.2: AIRI-Institute/SAE-Reasoning,
#: training/configs/r1-distill-llama-8b.yaml (every number below is from that file;
#: docs/training.md maps each one). Their data was LMSYS-Chat-1M + OpenThoughts-114k
#: rendered for the model; ours is the TextMix of the job.
PAPER_R1_RECIPE = Recipe(
    model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
    layer=19,  # hook_name blocks.19.hook_resid_post
    collect_tokens=819_200_000,  # training_tokens, one pass (streaming, no repeats)
    context_size=1024,  # context_size
    prepend_bos=False,  # prepend_bos: false
    train={
        "architecture": "standard",  # architecture: standard (ReLU, L1 x decoder norm)
        "d_sae": 65_536,  # expansion_factor 16 x d_in 4096
        "l1_coeff": 5.0,  # l1_coefficient
        "l1_warmup": 0.05,  # l1_warm_up_steps 10,000 of 200,000
        "lr": 5e-5,  # lr
        "lr_warmup": 0.0,  # lr_warm_up_steps 0
        "lr_decay": 0.2,  # lr_decay_steps 40,000 of 200,000, to 0 (constant scheduler)
        "beta1": 0.9,  # adam_beta1
        "beta2": 0.999,  # adam_beta2
        "grad_clip": 1.0,  # SAELens 5.5 always clips at 1.0
        "batch_size": 4096,  # train_batch_size_tokens
        "train_tokens": 819_200_000,  # training_tokens (200,000 steps)
        "decoder_init": "saelens-heuristic",  # decoder_heuristic_init + encoder transpose
        "init_dec_norm": 0.1,  # SAELens's heuristic row norm
        "apply_b_dec_to_input": False,  # apply_b_dec_to_input: false
        "seed": 42,  # seed (our RNG, so not the same draws)
    },
)
#: The named recipes of ``sae-steer train --recipe``.
RECIPES: dict[str, Recipe] = {"default": DEFAULT_RECIPE, "paper-r1": PAPER_R1_RECIPE}
DEFAULT_LAYER = DEFAULT_RECIPE.layer
DEFAULT_EXPANSION = 16
"""Features per residual dimension when a run outside the recipe gives no ``d_sae``."""
DEFAULT_OUT = Path("runs") / "default-sae"


def default_job(
    out_dir: str | Path = DEFAULT_OUT, *, model_path: str | Path | None = None, **kwargs: Any
) -> TrainJob:
    """:data:`DEFAULT_RECIPE` for ``model_path`` (default: the default model) as a job.

    Takes :meth:`Recipe.job`'s keywords: ``tokens`` shrinks collection and training alike;
    the rest are :class:`TrainConfig` fields (``d_sae=256``; ``None`` = the recipe's).
    """
    return DEFAULT_RECIPE.job(out_dir, model_or_default(model_path), **kwargs)


def train_default_sae(out_dir: str | Path = DEFAULT_OUT, **kwargs: Any) -> Path:
    """Train the default-recipe SAE into ``out_dir`` and return that folder.

    Takes :func:`default_job`'s keywords: ``tokens`` (collected activations; training
    tokens scale with it) and ``d_sae`` make a tiny run for tests, e.g. ``tokens=4096,
    d_sae=256`` takes well under a minute. The folder loads with ``SAE.load`` and
    ``sae-steer serve --sae``.
    """
    run_training(default_job(out_dir, **kwargs))
    return Path(out_dir)
