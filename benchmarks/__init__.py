"""Evaluation and speed harnesses that talk to an OpenAI-compatible endpoint.

The data path: a sweep (:func:`run_sweep` over :func:`load_problems`' problems and a map of
named steering specs) -> one chat request per sample (:mod:`benchmarks.client`) ->
grading (:class:`Grader`) -> the per-sample log -> tables and plots (:func:`write_report`).
:func:`measure_throughput` measures serving speed; :func:`run_demo` is the whole study on
the default model (train, score, serve, steer, report).

Names are imported on first use, so ``import benchmarks`` stays light (no torch, no vLLM).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_steer_vllm.lazy import lazy_exports

if TYPE_CHECKING:
    from benchmarks.bench_serving import feature_specs, measure_throughput, request_mix
    from benchmarks.client import EndpointError
    from benchmarks.demo import DemoConfig, run_demo
    from benchmarks.grading import Grader, check_extracted, extract_answer
    from benchmarks.problems import Problem, load_problems
    from benchmarks.report import write_report
    from benchmarks.runner import SweepConfigError, run_sweep, run_sweep_async
    from benchmarks.sampling import SamplingConfig
    from benchmarks.sweep import BASELINE, SpecFileError, grid_specs, load_specs_file

_EXPORTS = {
    "run_sweep": "benchmarks.runner",
    "run_sweep_async": "benchmarks.runner",
    "SamplingConfig": "benchmarks.sampling",
    "SweepConfigError": "benchmarks.runner",
    "load_problems": "benchmarks.problems",
    "Problem": "benchmarks.problems",
    "grid_specs": "benchmarks.sweep",
    "load_specs_file": "benchmarks.sweep",
    "BASELINE": "benchmarks.sweep",
    "SpecFileError": "benchmarks.sweep",
    "Grader": "benchmarks.grading",
    "extract_answer": "benchmarks.grading",
    "check_extracted": "benchmarks.grading",
    "write_report": "benchmarks.report",
    "EndpointError": "benchmarks.client",
    "measure_throughput": "benchmarks.bench_serving",
    "request_mix": "benchmarks.bench_serving",
    "feature_specs": "benchmarks.bench_serving",
    "run_demo": "benchmarks.demo",
    "DemoConfig": "benchmarks.demo",
}

__all__ = [
    "BASELINE",
    "DemoConfig",
    "EndpointError",
    "Grader",
    "Problem",
    "SamplingConfig",
    "SpecFileError",
    "SweepConfigError",
    "check_extracted",
    "extract_answer",
    "feature_specs",
    "grid_specs",
    "load_problems",
    "load_specs_file",
    "measure_throughput",
    "request_mix",
    "run_demo",
    "run_sweep",
    "run_sweep_async",
    "write_report",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
