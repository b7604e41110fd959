"""Every file and folder name sae-steer reads or writes, in one place (as SAELens does).

A newcomer who finds a file on disk looks its name up here, then follows the comment
to the one module that owns the format (reads it, writes it, decides compatibility).
Nothing here imports torch or vLLM.
"""

from __future__ import annotations

# ---------------------------------------------------------------- SAE folders
# owner: sae_steer_vllm.sae (loaders per layout, canonical in-memory SAE)
SAELENS_CFG = "cfg.json"
"""SAELens (v5/v6) config beside its weights."""
SAELENS_WEIGHTS = "sae_weights.safetensors"
"""SAELens weights (W_enc [d_in, d_sae], W_dec [d_sae, d_in], b_enc, b_dec, ...)."""
SPARSIFY_WEIGHTS = "sae.safetensors"
"""EleutherAI sparsify weights (encoder.weight, W_dec, ...), with ``cfg.json`` beside."""
SAELENS_SCALER = "activation_scaler.json"
"""SAELens 6.x checkpoint's dataset scaling factor (read only, to refuse an unfolded checkpoint).
owner: sae_steer_vllm.sae.saelens_format"""
LM_SAES_CFG = "config.json"
"""OpenMOSS lm-saes / Llama Scope config beside ``sae_weights.safetensors``. owner: sae_steer_vllm.sae.llama_scope"""
STATS_FILE = "feature_stats.safetensors"
"""Per-feature statistics (max activation, ReasonScore, ...). owner: sae_steer_vllm.sae.stats_file"""

# ---------------------------------------------------------------- activation caches
# owner: sae_training.activation_cache
ACTIVATION_META = "meta.json"
"""Activation cache manifest: model, layers, context, token counts, shard list."""
SHARD_PREFIX = "shard_"
"""Activation shards: ``shard_00000.safetensors`` ..."""

# ---------------------------------------------------------------- SAE training runs
# owner: sae_training.trainer (checkpoint) and sae_training.train (metrics)
CHECKPOINT_FILE = "checkpoint.pt"
TRAIN_METRICS_FILE = "metrics.json"
ACTIVATIONS_DIR = "activations"
"""Activation cache collected by ``sae-steer train`` inside its output folder."""

# ---------------------------------------------------------------- feature finding
# owner: sae_training.features.ranked_table
TABLE_JSON = "reasonscore_top.json"
TABLE_CSV = "reasonscore_top.csv"
DASHBOARD_DIR = "dashboard"
DASHBOARD_INDEX = "index.html"
DASHBOARD_FEATURE_PAGE = "feature_{feature}.html"
"""One feature's dashboard page (``.format(feature=i)``); ``sae-steer inspect --dashboard``
links to it. owner: sae_training.features.dashboard"""
EXPLANATIONS_FILE = "explanations.json"
"""Explanations of features and their detection / fuzzing scores, beside the SAE.
owner: sae_training.features.explanations"""
VOCAB_FILE = "reasoning_vocab.json"
"""Packaged reasoning vocabulary (sae_training/data/)."""

# ---------------------------------------------------------------- eval runs
# owner: benchmarks.results / benchmarks.report
SAMPLES_FILE = "samples.jsonl"
RUN_CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.md"
EVAL_METRICS_FILE = "metrics.json"
PLOTS_DIR = "plots"

# ---------------------------------------------------------------- interpretation runs
# owner: benchmarks.interpret
EXPLAIN_LOG_FILE = "explain_log.jsonl"
"""Every prompt sent to the explainer / judge LLM and its answer, one JSON line each
(``sae-steer explain`` audits and resumes from it)."""
EXPLAIN_DIR = "explain"
"""``sae-steer explain``'s output folder inside the SAE folder when no ``--out`` is given
(log, summary.md, plot; ``explanations.json`` itself goes beside the SAE)."""
EXPLAIN_SCORES_PLOT = "explanation_scores.png"
"""Histogram of the detection and fuzzing balanced accuracies over features."""
STEERING_EFFECTS_FILE = "steering_effects.json"
"""``sae-steer explain --steering``: each feature's described steering effects and the clusters
(owner: benchmarks.interpret.steering_effects)."""
STEERING_EFFECTS_TABLE = "steering_effects.md"
"""The same as a Markdown table: cluster | features | strengthening does | weakening does."""
STEERING_GENERATIONS_DIR = "steering_generations"
"""The steering mode's sweep folder (its own ``config.json`` and ``samples.jsonl``), inside
the output folder."""

# ---------------------------------------------------------------- distilled model and diffing
# owner: sae_training.distill / sae_training.diffing
DISTILL_STATE_FILE = "distill_state.json"
"""``sae-steer distill``'s progress (loss curve, step) and, once ``complete`` is true, the
marker of a finished output folder (reused unless ``--force``)."""
DISTILL_CHECKPOINT_FILE = "distill_checkpoint.pt"
"""Model + optimizer state every N steps while a distill runs (a rerun continues from it);
deleted when the folder is complete."""
DISTILL_CHECK_FILE = "distill_check.json"
"""Before/after check of a distill: share of greedy generations closing ``</think>``,
reasoning-word rate per 100 tokens, held-out trace loss."""
DISTILL_MODEL_SUFFIX = "-R1-distill"
"""Default output: ``<cache>/models/<base model folder name><suffix>``."""
DIFF_RESULT_FILE = "model_diff.json"
DIFF_REPORT_FILE = "model_diff.md"
DIFF_PLOT_FILE = "model_diff.png"
DIFF_CONDITIONS_DIR = "conditions"
"""``sae-steer diff``'s per-condition folders (``a-chat``, ``a-reasoning``, ``b-chat``,
``b-reasoning``), each with its activation cache and fine-tune results: a rerun reuses them."""
DIFF_CONDITION_FILE = "condition_{digest}.safetensors"
"""One condition's per-feature density, mean activation and decoder/encoder cosines after
the SAE fine-tune (``.format(digest=...)`` of the settings that produced it)."""
DIFF_FINETUNE_DIR = "finetune-{digest}"
"""A condition's fine-tune checkpoint while it runs (deleted once its result is saved)."""

# ---------------------------------------------------------------- demo
# owner: benchmarks.demo
DEMO_STATE_FILE = "steps.json"
SERVER_FILE = "server.json"
SERVER_LOG = "server.log"
INTERPRETATION_REPORT = "interpretation.md"
"""The demo's page of its optional interpretation steps (distill, explain, diff)."""

# ---------------------------------------------------------------- the default model
# owner: sae_steer_vllm.default_model
DEFAULT_MODEL_MARKER = ".sae-steer-complete"
"""Written last into a converted default-model folder: its presence means the conversion finished."""

# ---------------------------------------------------------------- shared data
CHAT_CORPUS = "chat.jsonl"
TRACE_CORPUS = "reasoning_traces.jsonl"
NONREASONING_CORPUS = "math_nonreasoning.jsonl"
