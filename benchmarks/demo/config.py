"""What ``sae-steer demo`` does, as one validated model, and the ``--config`` file that fills it.

:class:`DemoConfig` is the single definition of every option: the command-line parser
is derived from it (:mod:`benchmarks.demo.cli`), ``--config FILE`` (untrusted JSON) is
validated by it, and ``configs/demo_default.json`` spells out its defaults (a test keeps
the two equal).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError

from benchmarks.options import CommaList, ShellWords
from sae_steer_vllm.command import CommandConfig
from sae_steer_vllm.errors import EXIT_USAGE, SaeSteerError


class PipelineError(SaeSteerError, RuntimeError):
    """A user-facing failure of one demo step; the message says what to do."""


class DemoConfigError(PipelineError):
    """The demo's configuration (``--config`` file or options) is unusable: nothing ran."""

    exit_code = EXIT_USAGE


class DemoConfig(CommandConfig):
    """Everything ``sae-steer demo`` does, validated (``--config FILE`` is untrusted JSON)."""

    out: Path = Path("runs/demo")
    """output root for every artefact"""
    model: str | None = None
    """HF model folder (default: the embedded SmolLM2-135M-Instruct)"""
    # --- SAE (the default training recipe, with optional shrinking)
    collect_tokens: int | None = Field(default=None, ge=512)
    """activation tokens to collect (default: the recipe's)"""
    train_tokens: int | None = Field(default=None, ge=512)
    """SAE training tokens (default: the recipe's)"""
    d_sae: int | None = Field(default=None, ge=16)
    """SAE width (default: the recipe's, 16x)"""
    reuse_sae_from: CommaList[Path] = [Path("runs/default-sae")]
    """comma list; finished SAE runs to adopt when their configuration equals ours"""
    reuse_activations_from: CommaList[Path] = [Path("runs")]
    """comma list; folders searched (one level deep) for a matching activation cache"""
    # --- ReasonScore
    score_tokens: int = Field(default=40_000, ge=256)
    """tokens of R1 reasoning traces for feature statistics"""
    score_ctx: int = Field(default=1024, ge=16)
    """tokens per window in the scoring pass"""
    token_check: int = Field(default=10, ge=0)
    """top features checked for token dependence (0: skip)"""
    token_texts: int = Field(default=8, ge=1)
    """non-reasoning texts for that check"""
    dashboard_top: int = Field(default=20, ge=1)
    """features with an HTML dashboard page"""
    # --- study
    dataset: str = "gsm8k"
    """problem set: gsm8k, math500, aime24 or a JSONL path"""
    n_prompts: int = Field(default=60, ge=1)
    """problems (a seeded random subset)"""
    n_features: int = Field(default=2, ge=1)
    """top ReasonScore features, and as many random controls"""
    strengths: CommaList[float] = Field(default=[1.0, 2.0, 4.0], min_length=1)
    """comma list; steering strengths (x max activation)"""
    mode: Literal["auto", "clamp", "add"] = "auto"
    """intervention: clamp (the paper's) or add; auto = clamp, except add for a TopK SAE,
    where the server refuses clamp (a TopK feature depends on all the others)"""
    max_tokens: int = Field(default=256, ge=1)
    """completion budget per request"""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 = greedy (paired, reproducible)"""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """nucleus sampling"""
    seed: int = 0
    """problem subset and random control features"""
    concurrency: int = Field(default=64, ge=1)
    """requests in flight (the server runs 64 at once)"""
    watch_top: int = Field(default=5, ge=0, le=64)
    """top ReasonScore features every study request reads during generation (the demo's
    server runs with --readout); the report shows how each arm moved them. 0: no readout"""
    scope_arms: bool = True
    """where-to-steer arms: the top feature at --scope-strength steered at every position,
    only while thinking and only in the answer (--no-scope-arms: none); needs a server with
    think markers (skipped, with a note, on one without)"""
    scope_strength: float = Field(default=2.0, gt=0)
    """strength of the scope arms (x max activation); the top-1 arm at this strength, when
    the study has one, is their `all` arm"""
    think_start_marker: str = ""
    """the demo server's --think-start-marker: "" = the reasoning starts with the first
    generated token (SmolLM2 has no <think> token)"""
    think_end_marker: str = " answer"
    """the demo server's --think-end-marker, one token of the model: SmolLM2 has no </think>,
    so the demo ends the "thinking" at its first ` answer` token (as in "So, the answer is
    5."; it never writes the \\boxed the prompt asks for; docs/demo.md, "Where to steer")"""
    # --- interpretation (off in the default demo; configs/paper_at_cpu_scale.json turns them on)
    distill: bool = False
    """study a reasoning model: `sae-steer distill` (the model fine-tuned on the R1 traces,
    <think>/</think> as single tokens, R1 chat template; cached) replaces --model for the SAE,
    ReasonScore, the server and the study"""
    diff: bool = False
    """model diffing (`sae-steer diff`): the SAE's features across the study's model and the
    base model, on chat and on reasoning data (needs --distill)"""
    diff_tokens: int | None = Field(default=None, gt=0)
    """tokens per model x data condition of the diff (default: its own)"""
    explain_top: int = Field(default=0, ge=0)
    """explain the top K ReasonScore features and as many random ones with the served model
    (`sae-steer explain`: detection and fuzzing scores); 0: none"""
    explain_steering: int = Field(default=0, ge=0)
    """describe and cluster what steering the top K features does (`sae-steer explain
    --steering`, at -/+ --scope-strength); 0: none"""
    explain_max_tokens: int = Field(default=768, gt=0)
    """answer budget of each explainer / judge request (the served model reasons first)"""
    # --- server
    base_url: str | None = None
    """use this running server (.../v1) instead of starting one; it must serve the SAE
    under --sae-name"""
    sae_name: str = Field(default="demo", min_length=1)
    """name the SAE is registered under"""
    host: str = "127.0.0.1"
    """server host"""
    port: int = Field(default=8001, ge=1, le=65535)
    """server port (a free one if taken); not 8000, which the README's own `sae-steer serve`
    command and `sae-steer eval`'s default URL use, so the demo's server never blocks them"""
    vllm_args: ShellWords = [
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--max-num-seqs",
        "64",
        "--seed",
        "0",
    ]
    """one quoted string; extra vLLM flags for the server"""
    server_timeout: float = Field(default=900.0, gt=0)
    """seconds to wait for /health"""


def _bad_config(err: ValidationError) -> DemoConfigError:
    """One line per bad key, named as in the config file (the flag is the same with dashes)."""
    msgs = "; ".join(
        f"{'.'.join(str(x) for x in e['loc']) or 'config'}: {e['msg']}" for e in err.errors()
    )
    return DemoConfigError(f"bad configuration: {msgs}")


def load_config(path: Path | None, overrides: dict[str, Any]) -> DemoConfig:
    """``--config`` JSON (validated) with command-line values on top."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            raw = json.loads(path.read_text())
        except OSError as e:
            raise DemoConfigError(f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise DemoConfigError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(raw, dict):
            raise DemoConfigError(f"{path}: expected a JSON object of options")
        raw.pop("$comment", None)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return DemoConfig.model_validate(raw)
    except ValidationError as e:
        raise _bad_config(e) from None
