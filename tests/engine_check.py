"""Run one offline vLLM engine with the plugin and record what the tests assert.

Run as a subprocess by tests/test_engine_matrix.py (vLLM spawns workers and
keeps process-global state, so each engine configuration gets its own
process). Writes a JSON report:

* ``exactness``: per spec, max |logprob difference| between vLLM's prompt
  logprobs and the transformers reference with the same intervention;
* ``isolation``: greedy outputs of a mixed concurrent batch vs an all-unsteered
  batch and vs each steered request run alone;
* ``changed``: whether steered outputs differ from unsteered ones at all.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from helpers.steering import reference_prompt_logprobs

from sae_steer_vllm.spec import SteeringSpec

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away,",
    "def fibonacci(n):",
    "Question: what is 17 times 3? Answer:",
    "My favourite food is",
    "The three primary colours are",
    "In 1492, Columbus",
    "Water boils at",
]


def specs_for(sae: str, d_model: int, layer: int) -> dict[str, SteeringSpec]:
    vec = [((i * 37) % 11 - 5) / 5.0 for i in range(d_model)]
    return {
        "clamp": SteeringSpec.from_obj(
            {"interventions": [{"sae": sae, "feature": 3, "strength": 6.0, "mode": "clamp"}]}
        ),
        "add": SteeringSpec.from_obj(
            {"interventions": [{"sae": sae, "feature": 5, "value": 8.0, "mode": "add"}]}
        ),
        "multi": SteeringSpec.from_obj(
            {
                "interventions": [
                    {"sae": sae, "feature": 1, "value": 10.0, "mode": "clamp"},
                    {"sae": sae, "feature": 2, "value": 0.0, "mode": "clamp"},
                    {"layer": max(layer - 1, 0), "vector": vec, "scale": 1.5},
                ]
            }
        ),
        "generated_only": SteeringSpec.from_obj(
            {
                "interventions": [{"sae": sae, "feature": 4, "value": 12.0, "mode": "add"}],
                "positions": "generated",
            }
        ),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--sae", required=True, help="SAE folder registered as 'test'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--num-blocks", type=int, default=None, help="force preemption")
    ap.add_argument(
        "--max-num-seqs",
        type=int,
        default=None,
        help="fewer rows: V2's start-up sampler run costs per row in Triton's interpreter",
    )
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument(
        "--prompt-len", type=int, default=100, help="isolation prompts are this long plus 0-15"
    )
    ap.add_argument(
        "--long-repeats",
        type=int,
        default=3,
        help="the long exactness prompt is PROMPTS joined this many times (55 tokens each)",
    )
    ap.add_argument(
        "--exact-specs",
        default="none,clamp,add,multi",
        help="which specs the exactness check runs in vLLM (the reference always runs 'none')",
    )
    ap.add_argument(
        "--iso-requests", type=int, default=16, help="requests in the mixed isolation batch"
    )
    ap.add_argument(
        "--steered-together",
        action="store_true",
        help="compare each steered request of the mixed batch with the steered requests run "
        "as one reversed batch instead of one by one (the solo check is ~8x the decode steps)",
    )
    args = ap.parse_args()
    exact_names = args.exact_specs.split(",")
    t0 = time.perf_counter()
    phases: dict[str, float] = {}

    def phase(name: str) -> None:
        phases[name] = round(time.perf_counter() - t0 - sum(phases.values()), 1)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM, SamplingParams

    from sae_steer_vllm.sae import read_config

    hf = AutoConfig.from_pretrained(args.model)
    arch = hf.architectures[0]
    sae_cfg, _, _ = read_config(args.sae)
    specs = specs_for("test", hf.hidden_size, sae_cfg.hook_layer)
    tok = AutoTokenizer.from_pretrained(args.model)
    long_prompt = " ".join(PROMPTS) * args.long_repeats
    exact_prompts = [PROMPTS[0], long_prompt]

    report: dict = {"exactness": {}, "isolation": {}}
    # reference first: transformers in this process, before vLLM takes the cores
    ref: dict[str, list[list[float]]] = {}
    if not args.skip_reference:
        for name in dict.fromkeys(["none", *exact_names]):
            spec = None if name == "none" else specs[name]
            ref[name] = [
                reference_prompt_logprobs(
                    args.model, tok(p)["input_ids"], spec, {"test": Path(args.sae)}
                )
                for p in exact_prompts
            ]

    phase("reference")
    kw: dict = {}
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.num_blocks:
        kw["num_gpu_blocks_override"] = args.num_blocks
    if args.max_num_seqs:
        kw["max_num_seqs"] = args.max_num_seqs
    llm = LLM(
        args.model,
        dtype="float32",
        enforce_eager=args.eager,
        tensor_parallel_size=args.tp,
        hf_overrides={"architectures": ["Steered" + arch]},
        logits_processors=["sae_steer_vllm.batch_tracker:SteeringBatchTracker"],
        additional_config={"sae_steer": {"saes": {"test": args.sae}, "readout": True}},
        max_model_len=1024,
        seed=0,
        disable_log_stats=False,
        **kw,
    )
    phase("engine_start")

    def params(spec: SteeringSpec | None, **extra: object) -> SamplingParams:
        kw: dict = {"temperature": 0, "max_tokens": args.max_tokens, "ignore_eos": True}
        kw.update(extra)
        return SamplingParams(extra_args={"steering": spec.to_json()} if spec else None, **kw)

    def prompt(p: str | list[int], spec: SteeringSpec | None) -> dict:
        d: dict = {"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}
        if spec is not None:
            d["cache_salt"] = spec.cache_salt()
        return d

    if not args.skip_reference:
        for name in exact_names:
            spec = None if name == "none" else specs[name]
            outs = llm.generate(
                [prompt(p, spec) for p in exact_prompts],
                [params(spec, prompt_logprobs=0, max_tokens=1)] * len(exact_prompts),
            )
            diffs = []
            for o, r in zip(outs, ref[name]):
                got = [
                    d[tid].logprob for d, tid in zip(o.prompt_logprobs[1:], o.prompt_token_ids[1:])
                ]
                diffs.append(max(abs(a - b) for a, b in zip(got, r)))
            # does the intervention move the logprobs at all (guards against a no-op)?
            moved = (
                max(abs(a - b) for a, b in zip(ref[name][1], ref["none"][1]))
                if name != "none"
                else 0.0
            )
            report["exactness"][name] = {"max_abs_diff": max(diffs), "ref_shift": moved}

    phase("exactness")
    # isolation: 16 requests, half steered (4 different specs), half not
    # stronger variants so every steered output visibly changes (else "identical to
    # alone" would hold trivially)
    iso_specs = [
        SteeringSpec.from_obj({"interventions": [{"sae": "test", "feature": 3, "value": 40.0}]}),
        SteeringSpec.from_obj(
            {"interventions": [{"sae": "test", "feature": 5, "value": 60.0, "mode": "add"}]}
        ),
        SteeringSpec.from_obj(
            {
                "interventions": [
                    {"sae": "test", "feature": 1, "value": 50.0},
                    {"sae": "test", "feature": 2, "value": 0.0},
                    {"layer": 0, "vector": [0.5] * hf.hidden_size, "scale": 3.0},
                ]
            }
        ),
        SteeringSpec.from_obj(
            {
                "interventions": [{"sae": "test", "feature": 4, "value": 60.0, "mode": "add"}],
                "positions": "generated",
            }
        ),
    ]
    # prompts of 100-115 tokens: with 128-token KV blocks every request needs a second
    # block while decoding, so a small KV pool (--num-blocks) forces preemptions
    filler = tok(" ".join(PROMPTS) * 8)["input_ids"]
    batch: list[tuple[list[int], SteeringSpec | None]] = []
    for i in range(args.iso_requests):
        p = filler[i * 5 : i * 5 + args.prompt_len + i]
        spec = iso_specs[(i // 2) % 4] if i % 2 == 0 else None
        batch.append((p, spec))
    mixed = llm.generate([prompt(p, s) for p, s in batch], [params(s) for _, s in batch])
    plain = llm.generate([prompt(p, None) for p, _ in batch], [params(None) for _ in batch])
    alone = {}
    steered = [i for i, (_, s) in enumerate(batch) if s is not None]
    if args.steered_together:
        # reversed, without the unsteered neighbours: other rows, other preemptions
        outs = llm.generate(
            [prompt(*batch[i]) for i in reversed(steered)],
            [params(batch[i][1]) for i in reversed(steered)],
        )
        alone = {i: o.outputs[0].token_ids for i, o in zip(reversed(steered), outs)}
    else:
        for i in steered:
            p, s = batch[i]
            alone[i] = llm.generate([prompt(p, s)], [params(s)])[0].outputs[0].token_ids
    unsteered_ok = all(
        list(mixed[i].outputs[0].token_ids) == list(plain[i].outputs[0].token_ids)
        for i, (_, s) in enumerate(batch)
        if s is None
    )
    steered_ok = all(list(mixed[i].outputs[0].token_ids) == list(alone[i]) for i in alone)
    changed = sum(
        list(mixed[i].outputs[0].token_ids) != list(plain[i].outputs[0].token_ids) for i in alone
    )
    report["isolation"] = {
        "unsteered_identical": unsteered_ok,
        "steered_identical_to_alone": steered_ok,
        "steered_changed": changed,
        "steered_total": len(alone),
    }
    phase("isolation")
    # prefix cache: the unsteered long prompt ran first; steered must not reuse its KV
    strong = SteeringSpec.from_obj(
        {"interventions": [{"sae": "test", "feature": 5, "value": 60.0, "mode": "add"}]}
    )

    def gen_lps(p: dict, spec: SteeringSpec) -> list[float]:
        o = llm.generate([p], [params(spec, logprobs=0, max_tokens=8)])[0].outputs[0]
        return [d[t].logprob for d, t in zip(o.logprobs, o.token_ids)]

    # 165 tokens: the prefix cache keeps only full 128-token blocks
    cached = " ".join(PROMPTS) * 3
    llm.generate([prompt(cached, None)], [params(None)])
    salted = gen_lps(prompt(cached, strong), strong)
    llm.reset_prefix_cache()
    cold = gen_lps(prompt(cached, strong), strong)
    report["prefix_cache_clean"] = max(abs(a - b) for a, b in zip(salted, cold)) < 1e-5
    # control: the same steered request WITHOUT the salt, after the unsteered prompt
    # was cached, reuses unsteered KV; if this never differs the check above proves nothing
    llm.generate([prompt(cached, None)], [params(None)])
    unsalted = gen_lps({"prompt": cached}, strong)
    report["unsalted_contaminated"] = max(abs(a - b) for a, b in zip(unsalted, cold)) > 1e-3
    report["outputs_mixed"] = [list(o.outputs[0].token_ids) for o in mixed]
    report["preemptions"] = sum(
        getattr(m, "value", 0)
        for m in llm.get_metrics()
        if "preemption" in m.name and hasattr(m, "value")
    )
    phase("prefix_cache")
    report["readout"] = readout_check(llm, iso_specs[0], params)
    phase("readout")
    report["phases_s"] = phases
    Path(args.out).write_text(json.dumps(report, indent=1))


def readout_check(llm: Any, steer: SteeringSpec, params: Any) -> dict:
    """One steered request that reads every position, collected on a socket of our own (the
    API server's part): each position must arrive exactly once, so with tensor parallelism
    only one rank reported."""
    import uuid

    import zmq

    from sae_steer_vllm.readout_server import socket_address
    from sae_steer_vllm.readout_wire import READOUT_ID_KEY, READOUT_TO_KEY, decode

    address, _ = socket_address()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(address)
    rid = uuid.uuid4().hex
    readout = {"saes": [{"sae": "test", "top_k": 5, "features": [3]}]}
    spec = SteeringSpec.from_obj({**json.loads(steer.to_json()), "readout": readout})
    sp = params(None, max_tokens=8)
    sp.extra_args = {"steering": spec.to_json(), READOUT_ID_KEY: rid, READOUT_TO_KEY: address}
    out = llm.generate([{"prompt": PROMPTS[0], "cache_salt": f"readout-{rid}"}], [sp])[0]
    n_read = len(out.prompt_token_ids) + len(out.outputs[0].token_ids) - 1
    counts: dict[int, int] = {}
    rows: dict[int, list] = {}
    deadline = time.time() + 10
    while time.time() < deadline:
        if not pull.poll(300):
            if len(rows) >= n_read:
                break  # and nothing more arrived for 0.3 s: no second rank is sending
            continue
        for b in decode(pull.recv_multipart()):
            assert b.readout_id == rid
            for i, p in enumerate(b.positions.tolist()):
                counts[p] = counts.get(p, 0) + 1
                rows.setdefault(
                    p, [b.top_ids[i].tolist(), b.top_vals[i].tolist(), b.watched[i].tolist()]
                )
    pull.close()
    ctx.term()
    return {
        "complete": sorted(rows) == list(range(n_read)),
        "repeated": sum(c - 1 for c in counts.values()),
        "rows": [rows[p] for p in sorted(rows)],
    }


if __name__ == "__main__":
    main()
