"""TEST ONLY proof that the V2 shim works: the offline ``LLM`` on Model Runner V2, on CPU.

``python tests/v2_check.py`` starts this same script as a child under
:func:`v2_shim.activate.v2_env` (the Triton ``cpu`` backend on ``PYTHONPATH``,
``TRITON_INTERPRET=1``, ``VLLM_USE_V2_MODEL_RUNNER=1``), captures the child's log (its
engine-core and worker processes write to the same stream), and checks that

* vLLM logged "Using V2 Model Runner" (``vllm/v1/worker/cpu_worker.py:162``);
* a steered greedy generation differs from the unsteered one;
* the steered request in a mixed batch equals its solo run, and the unsteered one
  equals an all-unsteered batch.

It prints the timings (engine start, each generate) as JSON on its last line, and
``bad_spec``: whether a malformed steering spec is rejected at admission (informational;
it depends on the logits processor passed). ``--v1``: the same check on Model Runner V1
(a baseline for the timings); ``--compile``: torch.compile instead of eager;
``--logits-processor FQCN``: passed as ``logits_processors``; ``--log PATH``: keep the
engine's full log.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from v2_shim.activate import V2_LOG_LINE, v1_env, v2_env  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, in a land far away,"]


def engine(
    out: Path, sae_dir: Path, max_tokens: int, v1: bool, lp: str | None, compile_: bool
) -> None:
    """The child: one engine, three generate calls, a JSON report."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    from sae_steer_vllm.default_model import prepare_default_model
    from sae_steer_vllm.sae import random_sae
    from sae_steer_vllm.spec import SteeringSpec

    model = prepare_default_model()
    random_sae(sae_dir, d_in=576, d_sae=1024, layer=18)
    t_import = time.perf_counter() - t0
    kw = {"logits_processors": ["sae_steer_vllm.batch_tracker:SteeringBatchTracker"]} if v1 else {}
    if lp:
        kw["logits_processors"] = [lp]
    t1 = time.perf_counter()
    llm = LLM(
        str(model),
        dtype="float32",
        enforce_eager=not compile_,
        hf_overrides={"architectures": ["SteeredLlamaForCausalLM"]},
        additional_config={"sae_steer": {"saes": {"test": str(sae_dir)}}},
        max_model_len=512,
        seed=0,
        **kw,
    )
    t_start = time.perf_counter() - t1
    spec = SteeringSpec.from_obj(
        {"interventions": [{"sae": "test", "feature": 5, "value": 60.0, "mode": "add"}]}
    )

    def params(s: SteeringSpec | None) -> SamplingParams:
        extra = {"steering": s.to_json()} if s else None
        return SamplingParams(
            temperature=0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
        )

    def prompt(p: str, s: SteeringSpec | None) -> dict:
        return {"prompt": p, **({"cache_salt": s.cache_salt()} if s else {})}

    def run(batch: list[tuple[str, SteeringSpec | None]]) -> tuple[list[list[int]], float]:
        t = time.perf_counter()
        outs = llm.generate([prompt(p, s) for p, s in batch], [params(s) for _, s in batch])
        return [list(o.outputs[0].token_ids) for o in outs], time.perf_counter() - t

    plain, t_plain = run([(PROMPTS[0], None), (PROMPTS[1], None)])
    mixed, t_mixed = run([(PROMPTS[0], spec), (PROMPTS[1], None)])
    solo, t_solo = run([(PROMPTS[0], spec)])
    try:  # admission: does this runner validate specs without the middleware?
        bad = SamplingParams(max_tokens=1, extra_args={"steering": "{not json"})
        llm.generate([PROMPTS[0]], [bad])
        bad_spec = "served"
    except Exception as e:  # noqa: BLE001 - recorded, not judged
        bad_spec = f"rejected: {type(e).__name__}"
    report = {
        "bad_spec": bad_spec,
        "steered_differs": mixed[0] != plain[0],
        "steered_equals_solo": mixed[0] == solo[0],
        "unsteered_unchanged": mixed[1] == plain[1],
        "tokens": {"plain": plain, "mixed": mixed, "solo": solo},
        "seconds": {
            "imports_model_sae": round(t_import, 1),
            "engine_start": round(t_start, 1),
            "mode": "compile" if compile_ else "eager",
            "generate_2x_unsteered": round(t_plain, 2),
            "generate_mixed": round(t_mixed, 2),
            "generate_solo": round(t_solo, 2),
        },
        "max_tokens": max_tokens,
    }
    out.write_text(json.dumps(report))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--v1", action="store_true", help="Model Runner V1 instead (baseline)")
    ap.add_argument("--logits-processor", help="FQCN passed as logits_processors (trials)")
    ap.add_argument("--compile", action="store_true", help="torch.compile mode, not eager")
    ap.add_argument("--log", type=Path, help="also copy the engine's full log here")
    ap.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sae-dir", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_out:
        engine(
            args.child_out,
            args.sae_dir,
            args.max_tokens,
            args.v1,
            args.logits_processor,
            args.compile,
        )
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        out, log = Path(tmp) / "report.json", Path(tmp) / "engine.log"
        env = (v1_env if args.v1 else v2_env)({**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
        cmd = [sys.executable, __file__, "--child-out", str(out), "--sae-dir", f"{tmp}/sae"]
        cmd += ["--max-tokens", str(args.max_tokens), *(["--v1"] if args.v1 else [])]
        cmd += [*(["--compile"] if args.compile else [])]
        if args.logits_processor:
            cmd += ["--logits-processor", args.logits_processor]
        t = time.perf_counter()
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=600)
        wall = time.perf_counter() - t
        text = log.read_text()
        if args.log:
            args.log.write_text(text)
        if proc.returncode != 0 or not out.exists():
            print(text[-6000:])
            print(f"engine child failed (exit {proc.returncode})")
            return 1
        report = json.loads(out.read_text())
        report["v2_logged"] = V2_LOG_LINE in text
        report["seconds"]["process_wall"] = round(wall, 1)
        ok = report["steered_differs"] and report["steered_equals_solo"]
        ok = ok and report["unsteered_unchanged"] and report["v2_logged"] != args.v1
        for line in text.splitlines():
            if "Model Runner" in line or "Triton" in line or "sae-steer" in line:
                print(line[:300])
        print(json.dumps(report))
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
