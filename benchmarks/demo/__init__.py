"""``sae-steer demo``: the whole study on the default model, end to end and resumable.

A demo is neither training nor feature finding: it is a study run against the endpoint,
so it lives with the other harnesses that query it. Each step calls the library function
the matching command calls (``train``, ``score``, ``serve``, ``eval``'s sweep).

Modules, in the order a run goes through them: :mod:`~benchmarks.demo.config` (options),
:mod:`~benchmarks.demo.state` (``steps.json``), :mod:`~benchmarks.demo.steps` (model,
SAE, ReasonScore), :mod:`~benchmarks.demo.server` (the background server),
:mod:`~benchmarks.demo.study` (design and analysis), :mod:`~benchmarks.demo.scope` and
:mod:`~benchmarks.demo.scope_report` (where to steer: all vs thinking vs answer),
:mod:`~benchmarks.demo.study_report` (plots and report), :mod:`~benchmarks.demo.report` (terminal output),
:mod:`~benchmarks.demo.run` (the six steps) and :mod:`~benchmarks.demo.cli`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_steer_vllm.lazy import lazy_exports

if TYPE_CHECKING:
    from benchmarks.demo.cli import main
    from benchmarks.demo.config import DemoConfig, DemoConfigError, PipelineError, load_config
    from benchmarks.demo.run import run_demo
    from benchmarks.demo.study import analyse, choose_random_features, make_design
    from benchmarks.demo.study_report import ReportContext, plot_study, write_study_report

_EXPORTS = {
    "main": "benchmarks.demo.cli",
    "DemoConfig": "benchmarks.demo.config",
    "DemoConfigError": "benchmarks.demo.config",
    "PipelineError": "benchmarks.demo.config",
    "load_config": "benchmarks.demo.config",
    "run_demo": "benchmarks.demo.run",
    "analyse": "benchmarks.demo.study",
    "choose_random_features": "benchmarks.demo.study",
    "make_design": "benchmarks.demo.study",
    "ReportContext": "benchmarks.demo.study_report",
    "plot_study": "benchmarks.demo.study_report",
    "write_study_report": "benchmarks.demo.study_report",
}

__all__ = [
    "DemoConfig",
    "DemoConfigError",
    "PipelineError",
    "ReportContext",
    "analyse",
    "choose_random_features",
    "load_config",
    "main",
    "make_design",
    "plot_study",
    "run_demo",
    "write_study_report",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
