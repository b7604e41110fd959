"""Interpreting features with an LLM: ``sae-steer explain``.

Modules: :mod:`~benchmarks.interpret.llm` (the LLM client: concurrency, retries, a hard
request budget), :mod:`~benchmarks.interpret.explain_log` (every prompt and answer, the
resume state), :mod:`~benchmarks.interpret.explain_prompts` (what the explainer and judge
see, how answers are read), :mod:`~benchmarks.interpret.scoring` (detection and fuzzing,
balanced accuracy with its interval), :mod:`~benchmarks.interpret.explainer` (the run),
:mod:`~benchmarks.interpret.explain_report` (summary.md, histogram) and
:mod:`~benchmarks.interpret.explain_cli`. ``--steering`` (what steering each feature does,
clustered) lives in ``steering_effects`` and ``clusters``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_steer_vllm.lazy import lazy_exports

if TYPE_CHECKING:
    from benchmarks.interpret.explain_cli import ExplainConfig, main
    from benchmarks.interpret.explain_log import ExplainLog
    from benchmarks.interpret.explainer import ExplainRun, ExplainSettings, explain_features
    from benchmarks.interpret.llm import LLM, LLMBudgetExhausted, LLMConfig, LLMRequestError

_EXPORTS = {
    "ExplainConfig": "benchmarks.interpret.explain_cli",
    "main": "benchmarks.interpret.explain_cli",
    "ExplainLog": "benchmarks.interpret.explain_log",
    "ExplainRun": "benchmarks.interpret.explainer",
    "ExplainSettings": "benchmarks.interpret.explainer",
    "explain_features": "benchmarks.interpret.explainer",
    "LLM": "benchmarks.interpret.llm",
    "LLMBudgetExhausted": "benchmarks.interpret.llm",
    "LLMConfig": "benchmarks.interpret.llm",
    "LLMRequestError": "benchmarks.interpret.llm",
}

__all__ = [
    "LLM",
    "ExplainConfig",
    "ExplainLog",
    "ExplainRun",
    "ExplainSettings",
    "LLMBudgetExhausted",
    "LLMConfig",
    "LLMRequestError",
    "explain_features",
    "main",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
