"""lm-evaluation-harness ``local-chat-completions`` carries a steering spec via ``--gen_kwargs``.

lm-eval is not a project dependency (it pulls in datasets, evaluate, ...): it lives in its
own environment, ``.venv-lmeval``, which ``make test`` creates first
(``scripts/setup_lmeval_env.sh``), so these tests run in ``make test``. The executable is
``$SAE_STEER_LM_EVAL`` if set, else ``.venv-lmeval/bin/lm_eval``, else ``lm_eval`` on PATH;
without any of them (a bare ``pytest`` before ``make setup-lmeval``) they are skipped.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers.fake_endpoint import FakeServer, make_problems

from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec

REPO = Path(__file__).resolve().parents[1]
LMEVAL_ENV_EXE = REPO / ".venv-lmeval" / "bin" / "lm_eval"


def find_lm_eval() -> str | None:
    """``$SAE_STEER_LM_EVAL``, else the project's ``.venv-lmeval``, else PATH."""
    if os.environ.get("SAE_STEER_LM_EVAL"):
        return os.environ["SAE_STEER_LM_EVAL"]
    if LMEVAL_ENV_EXE.is_file() and os.access(LMEVAL_ENV_EXE, os.X_OK):
        return str(LMEVAL_ENV_EXE)
    return shutil.which("lm_eval")


LM_EVAL = find_lm_eval()
needs_lm_eval = pytest.mark.skipif(
    not LM_EVAL, reason="lm_eval not installed (make setup-lmeval creates .venv-lmeval)"
)

TASK_YAML = """\
task: steer_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{problem}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>"]
  max_gen_toks: {max_tokens}
metric_list:
  - metric: exact_match
"""


def run_lm_eval(
    tmp_path: Path, base_url: str, model: str, spec: SteeringSpec, max_tokens: int = 64
) -> list[dict[str, Any]]:
    """Run a 3-problem local task through lm-eval; return its logged samples."""
    data = tmp_path / "toy.jsonl"
    data.write_text(
        "".join(
            json.dumps({"problem": p.problem, "answer": p.answer}) + "\n" for p in make_problems(3)
        )
    )
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "steer_toy.yaml").write_text(TASK_YAML.format(data=data, max_tokens=max_tokens))
    # gen_kwargs are spread after lm-eval's own "seed": 1234, so "seed": null drops it (our
    # server refuses per-request seeds on the CPU backend)
    gen_kwargs = json.dumps({"vllm_xargs": {"steering": spec.to_json()}, "seed": None})
    out = tmp_path / "out"
    cmd = [
        str(LM_EVAL),
        "--model",
        "local-chat-completions",
        "--model_args",
        f"model={model},base_url={base_url}/chat/completions,num_concurrent=1,max_retries=1",
        "--apply_chat_template",
        "--include_path",
        str(tasks),
        "--tasks",
        "steer_toy",
        "--gen_kwargs",
        gen_kwargs,
        "--log_samples",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    files = list(out.rglob("samples_steer_toy_*.jsonl"))
    assert files, r.stderr[-2000:]
    return [json.loads(line) for line in files[0].read_text().splitlines()]


@needs_lm_eval
def test_lm_eval_forwards_the_spec(tmp_path: Path) -> None:
    spec = SteeringSpec(
        interventions=[FeatureIntervention(sae="fake-sae", feature=3, strength=4.0)]
    )
    with FakeServer() as srv:
        samples = run_lm_eval(tmp_path, srv.base_url, "fake-model", spec)
        bodies = list(srv.requests)
    assert len(bodies) == 3
    assert all(b["vllm_xargs"] == {"steering": spec.to_json()} for b in bodies)
    assert all(b.get("seed") is None for b in bodies)
    # the fake answers steered requests (strength > 3) with many "Wait"s and a wrong box
    assert all(s["resps"][0][0].count("Wait, let me check.") == 9 for s in samples)


@needs_lm_eval
@pytest.mark.server
def test_lm_eval_against_our_server(steer_server: Any, tmp_path: Path) -> None:
    spec = SteeringSpec(
        interventions=[FeatureIntervention(sae=steer_server.sae_name, feature=0, strength=2.0)]
    )
    samples = run_lm_eval(tmp_path, steer_server.base_url, steer_server.model, spec, max_tokens=16)
    assert len(samples) == 3 and all(s["resps"][0][0] for s in samples)
