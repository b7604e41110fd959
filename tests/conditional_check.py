"""Conditional steering (issue 15) in one offline vLLM engine vs the transformers reference.

Run as a subprocess by tests/test_conditional_engines.py (vLLM keeps process-global state, so
each engine configuration gets its own process). Writes a JSON report:

* ``exact``: per case (``helpers/conditional_cases.py``: thinking / answer scopes, per-
  intervention positions over the request's, windows, ``when`` above / below / band on this
  and another SAE of the layer, ``scale`` by 0 and 3, a prompt that opened ``<think>``, one
  that did not, one that closed it, ``</think>`` placed mid-stream by ``logit_bias``), greedy
  ids and raw logprobs of vLLM against :mod:`helpers.conditional_reference`, all cases in one
  batch;
* ``isolation``: 16 concurrent requests (8 steered, 8 plain) vs each steered one alone (or,
  ``--steered-together``, the steered ones as one reversed batch) and vs an all-plain batch;
* ``preemption``: the ``vllm:num_preemptions`` counter, and with ``--trace-preemptions``
  (engine core in this process) each preemption's request and whether it had generated its
  ``</think>`` before it;
* ``prefix``: pairs of specs that differ only in an issue-15 field, run one after the other on
  one long prompt, vs the second one run on a cold cache; plus the control that without the
  salt they do share KV.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from helpers.conditional_cases import (
    LONG_MESSAGE,
    Case,
    build_cases,
    marker_ids,
    prompt_ids,
)
from helpers.conditional_reference import ConditionalReference, Markers

from sae_steer_vllm.spec import SteeringSpec

TOL = 1e-4


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sae", required=True, help="main SAE folder, registered as 's'")
    ap.add_argument("--cond-sae", required=True, help="an SAE on the same layer, as 'c'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cases", required=True, help="reference cases JSON: read, or built")
    ap.add_argument("--parts", default="exact,iso,prefix")
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None, help="force preemption")
    ap.add_argument("--block-size", type=int, default=None)
    ap.add_argument("--max-num-seqs", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument(
        "--max-tokens",
        type=int,
        default=16,
        help="tokens per request; cases read from --cases keep their length and are compared "
        "on their first --max-tokens tokens",
    )
    ap.add_argument("--only", default=None, help="comma-separated case names (default: all)")
    ap.add_argument("--steered-together", action="store_true")
    ap.add_argument("--trace-preemptions", action="store_true")
    return ap.parse_args()


def reference_cases(args: argparse.Namespace) -> list[Case]:
    path = Path(args.cases)
    if path.is_file():
        return [Case.from_json(d) for d in json.loads(path.read_text())]
    from transformers import AutoConfig

    from sae_steer_vllm.sae import read_config

    cfg, _, _ = read_config(args.sae)
    hf = AutoConfig.from_pretrained(args.model)
    ref = ConditionalReference(
        args.model, {"s": Path(args.sae), "c": Path(args.cond_sae)}, Markers(*marker_ids())
    )
    cases = build_cases(ref, cfg.hook_layer, hf.hidden_size, args.max_tokens)
    path.write_text(json.dumps([c.to_json() for c in cases]))
    return cases


def trace_preemptions(end_id: int) -> list[dict]:
    """Record each preemption in this process's scheduler (engine core in-process)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    seen: list[dict] = []
    original = Scheduler._preempt_request

    def wrapped(self: Any, request: Any, *a: Any, **kw: Any) -> Any:
        out = list(request.output_token_ids)
        extra = request.sampling_params.extra_args or {}
        seen.append(
            {
                "id": request.request_id,
                "steered": "steering" in extra,
                "generated": len(out),
                "after_end": end_id in out,
            }
        )
        return original(self, request, *a, **kw)

    Scheduler._preempt_request = wrapped  # type: ignore[method-assign]
    return seen


def main() -> None:
    args = _args()
    parts = set(args.parts.split(","))
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.perf_counter() - t0 - sum(phases.values()), 1)

    cases = reference_cases(args)
    if args.only:
        cases = [c for c in cases if c.name in args.only.split(",")]
    phase("reference")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    _start_id, end_id = marker_ids()
    traced: list[dict] | None = None
    if args.trace_preemptions:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        traced = trace_preemptions(end_id)
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    arch = AutoConfig.from_pretrained(args.model).architectures[0]
    kw: dict[str, Any] = {}
    for name, key in [
        ("max_num_batched_tokens", "max_num_batched_tokens"),
        ("num_blocks", "num_gpu_blocks_override"),
        ("block_size", "block_size"),
        ("max_num_seqs", "max_num_seqs"),
    ]:
        if getattr(args, name):
            kw[key] = getattr(args, name)
    llm = LLM(
        args.model,
        dtype="float32",
        enforce_eager=args.eager,
        tensor_parallel_size=args.tp,
        hf_overrides={"architectures": ["Steered" + arch]},
        logits_processors=["sae_steer_vllm.batch_tracker:SteeringBatchTracker"],
        additional_config={"sae_steer": {"saes": {"s": args.sae, "c": args.cond_sae}}},
        max_model_len=args.max_model_len,
        seed=0,
        disable_log_stats=False,
        **kw,
    )
    phase("engine_start")

    def request(
        prompt: list[int], spec: dict | None, bias: dict[int, float], n: int, salt: bool = True
    ) -> tuple[dict, Any]:
        p: dict[str, Any] = {"prompt_token_ids": prompt}
        extra = None
        if spec is not None:
            s = SteeringSpec.from_obj(spec)
            extra = {"steering": s.to_json()}
            if salt:
                p["cache_salt"] = s.cache_salt()
        sp = SamplingParams(
            temperature=0,
            max_tokens=n,
            ignore_eos=True,
            logprobs=0,
            logit_bias=dict(bias) or None,
            extra_args=extra,
        )
        return p, sp

    def run(reqs: list[tuple[dict, Any]]) -> list[tuple[list[int], list[float]]]:
        outs = llm.generate([r[0] for r in reqs], [r[1] for r in reqs], use_tqdm=False)
        res = []
        for o in outs:
            c = o.outputs[0]
            res.append((list(c.token_ids), [d[t].logprob for d, t in zip(c.logprobs, c.token_ids)]))
        return res

    n = args.max_tokens
    report: dict[str, Any] = {"cases": [c.to_json() for c in cases]}
    if "exact" in parts:
        got = run([request(c.prompt, c.spec, c.bias, n) for c in cases])
        exact = {}
        for c, (ids, lps) in zip(cases, got):
            want, want_lps = c.ids[:n], c.logprobs[:n]  # --max-tokens may cut the cases short
            same = next((k for k, (a, b) in enumerate(zip(ids, want)) if a != b), None)
            upto = len(ids) if same is None else same
            exact[c.name] = {
                "ids_equal": ids == want,
                "first_diff": same,
                "ref_margin_there": None if same is None else c.margins[same],
                "max_abs_diff": max(
                    (abs(a - b) for a, b in zip(lps[:upto], want_lps[:upto])), default=0.0
                ),
                "vllm_first_end": ids.index(end_id) if end_id in ids else None,
                "ref_first_end": want.index(end_id) if end_id in want else None,
                "vllm_ids": ids,
            }
        report["exact"] = exact
        phase("exact")
    if "iso" in parts:
        report["isolation"] = isolation(cases, request, run, n, args.steered_together)
        phase("isolation")
    if "prefix" in parts:
        report["prefix"] = prefix_check(llm, request, run)
        phase("prefix")
    report["preemptions"] = sum(
        getattr(m, "value", 0)
        for m in llm.get_metrics()
        if "num_preemptions" in m.name and hasattr(m, "value")
    )
    if traced is not None:
        report["traced_preemptions"] = traced
    report["phases_s"] = phases
    Path(args.out).write_text(json.dumps(report, indent=1))


def isolation(cases: list[Case], request: Any, run: Any, n: int, together: bool) -> dict:
    """8 steered requests (each case's prompt and bias, half of them with another case's spec)
    interleaved with 8 plain ones (the same prompts and biases)."""
    steered = [(c.prompt, c.spec, c.bias) for c in cases][:8]
    for i in range(8 - len(steered)):  # fewer cases: other specs on their prompts
        c, other = cases[i % len(cases)], cases[(i + 3) % len(cases)]
        steered.append((c.prompt, other.spec, c.bias))
    batch: list[tuple[list[int], dict | None, dict]] = []
    for p, s, b in steered:
        batch += [(p, s, b), (p, None, b)]
    mixed = run([request(p, s, b, n) for p, s, b in batch])
    plain = run([request(p, None, b, n) for p, _s, b in batch])
    idx = [i for i, (_p, s, _b) in enumerate(batch) if s is not None]
    if together:
        outs = run([request(*batch[i], n) for i in reversed(idx)])
        alone = dict(zip(reversed(idx), outs))
    else:
        alone = {i: run([request(*batch[i], n)])[0] for i in idx}
    unsteered_ok = all(mixed[i] == plain[i] for i in range(len(batch)) if batch[i][1] is None)
    steered_ok = [mixed[i][0] == alone[i][0] for i in idx]
    changed = sum(mixed[i][0] != plain[i][0] for i in idx)
    return {
        "requests": len(batch),
        "unsteered_bit_identical": unsteered_ok,
        "steered_identical_to_alone": all(steered_ok),
        "steered_mismatch": [batch[i][1] for i, ok in zip(idx, steered_ok) if not ok],
        "steered_changed": changed,
        "steered_total": len(idx),
    }


def prefix_check(llm: Any, request: Any, run: Any) -> dict:
    """Spec B after spec A on one long prompt (several full KV blocks) vs B on a cold cache,
    for pairs that differ only in factor / when / positions (each changes prompt positions).
    ``unsalted_shared``: the same without cache salts differs from cold (the check can see
    shared KV at all)."""
    prompt = prompt_ids("open", LONG_MESSAGE)
    base = {"sae": "s", "feature": 7, "mode": "scale", "factor": 3.0}
    clamp = {"sae": "s", "feature": 3, "value": 6.0}
    when = {**clamp, "when": {"sae": "c", "feature": 2, "above": 0.5}}
    pairs = {
        "factor": ({"interventions": [base]}, {"interventions": [{**base, "factor": 0.0}]}),
        "when": (
            {"interventions": [when]},
            {"interventions": [{**when, "when": {"sae": "c", "feature": 2, "above": 1.5}}]},
        ),
        "positions": (
            {"interventions": [clamp]},
            {"interventions": [{**clamp, "positions": "thinking"}]},
        ),
        "window": (  # generated tokens only: prompt KV is the same; the salt must still differ
            {"interventions": [{**clamp, "window": [0, 4]}]},
            {"interventions": [{**clamp, "window": [0, 5]}]},
        ),
    }
    out: dict[str, Any] = {"prompt_len": len(prompt)}
    for name, (a, b) in pairs.items():
        salts_differ = (
            SteeringSpec.from_obj(a).cache_salt() != SteeringSpec.from_obj(b).cache_salt()
        )
        run([request(prompt, a, {}, 4)])
        warm = run([request(prompt, b, {}, 8)])[0]
        llm.reset_prefix_cache()
        cold = run([request(prompt, b, {}, 8)])[0]
        llm.reset_prefix_cache()
        run([request(prompt, a, {}, 4, salt=False)])
        shared = run([request(prompt, b, {}, 8, salt=False)])[0]
        llm.reset_prefix_cache()
        out[name] = {
            "salts_differ": salts_differ,
            "warm_equals_cold": max(abs(x - y) for x, y in zip(warm[1], cold[1])) < 1e-5,
            "unsalted_shared": max(abs(x - y) for x, y in zip(shared[1], cold[1])) > 1e-3,
        }
    return out


if __name__ == "__main__":
    main()
