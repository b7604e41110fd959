"""An independent transformers reference for conditional steering (issue 15): the engine tests' oracle.

It shares no code with the plugin's gates (``think_phase``, ``slot_tables``, ``steering_plan``):
every rule of ``docs/conditional_steering.md`` is written again here in plain Python, per token
position, from the token sequence alone:

* phases: ``S`` (reasoning start) and ``E`` (first end marker) from the prompt scan and the
  generated tokens; ``thinking`` is ``S <= p <= E``, ``answer`` is ``p > E`` and generated;
* ``window [a, b)``: generated index ``g = p - P`` with ``a <= g < b``;
* ``when``: the condition SAE's own ``encode`` of resid_post at the layer *before* any edit
  there, strictly ``above < f < below``;
* modes ``clamp`` (set the feature, keep the SAE error), ``add`` (``c * W_dec[i]``) and
  ``scale`` (the feature times ``factor``), at site ``resid_post`` or ``mlp_out``.

Every intervention on a layer is computed from the same unedited layer output (and MLP output,
for ``mlp_out``) and the gated deltas are summed, as the engine does. Generation is greedy,
recomputing the whole sequence each step (no KV cache: tiny models make this cheap, and a
position's edit depends only on tokens at or before it, so nothing differs from incremental
decoding). ``logit_bias`` is added only to choose the next token, as vLLM's sampler does; the
returned logprobs are those of the raw logits (vLLM's default ``raw_logprobs``: V1
``v1/sample/sampler.py`` computes them before its logits processors; V2
``v1/worker/gpu/sample/sampler.py`` applies the bias to a copy).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.sae import SAE, load_max_activation
from sae_steer_vllm.spec import FeatureIntervention, SteeringSpec, VectorIntervention

NONE = 1 << 62
"""``S`` / ``E`` of a sequence whose marker has not appeared (beyond every position)."""
MAX_BIAS = 100.0
"""vLLM clamps each ``logit_bias`` entry to [-100, 100] (``vllm/sampling_params.py``)."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the count: the tiny matmuls here are ~25x faster
    that way on a shared two-core machine (threads contend instead of helping)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Markers:
    """Single-token think markers; ``start_id`` None: reasoning starts at the first generated
    token; ``end_id`` None: the model has no phases."""

    start_id: int | None
    end_id: int | None


def phase_bounds(ids: Sequence[int], prompt_len: int, markers: Markers) -> tuple[int, int]:
    """``(S, E)`` of the whole sequence ``ids`` whose first ``prompt_len`` tokens are the prompt."""
    s = e = NONE
    if markers.start_id is None:
        s = prompt_len
    else:
        for p in range(prompt_len - 1, -1, -1):  # the prompt's LAST opening marker
            if ids[p] == markers.start_id:
                s = p
                break
        if s != NONE:
            for p in range(s, prompt_len):  # a close after it inside the prompt
                if ids[p] == markers.end_id:
                    e = p
                    break
        for p in range(prompt_len, len(ids)):
            if ids[p] == markers.start_id:
                s = min(s, p)
                break
    for p in range(prompt_len, len(ids)):
        if ids[p] == markers.end_id:
            e = min(e, p)
            break
    return s, e


def in_scope(positions: str, p: int, prompt_len: int, s: int, e: int) -> bool:
    """Whether ``positions`` admits position ``p``."""
    if positions == "all":
        return True
    if positions == "prompt":
        return p < prompt_len
    if positions == "generated":
        return p >= prompt_len
    if positions == "thinking":
        return s <= p <= e
    if positions == "answer":
        return p > e and p >= prompt_len
    raise ValueError(f"unknown positions {positions!r}")


def in_window(window: Sequence[int | None] | None, p: int, prompt_len: int) -> bool:
    """Whether ``window`` ([start, stop) in generated-token indices) admits position ``p``."""
    if window is None:
        return True
    if p < prompt_len:
        return False
    g = p - prompt_len
    start, stop = window
    return (start is None or g >= start) and (stop is None or g < stop)


def condition_holds(when: Any, f: float) -> bool:
    """``above < f < below`` (either bound may be absent)."""
    above, below = getattr(when, "above", None), getattr(when, "below", None)
    return (above is None or f > above) and (below is None or f < below)


def static_gates(
    spec: SteeringSpec, ids: Sequence[int], prompt_len: int, markers: Markers
) -> list[list[bool]]:
    """Per intervention, per position: scope AND window (the condition needs activations)."""
    s, e = phase_bounds(ids, prompt_len, markers)
    out = []
    for iv in spec.interventions:
        own = getattr(iv, "positions", None) if isinstance(iv, FeatureIntervention) else None
        scope = own or spec.positions
        window = getattr(iv, "window", None)
        out.append(
            [
                in_scope(scope, p, prompt_len, s, e) and in_window(window, p, prompt_len)
                for p in range(len(ids))
            ]
        )
    return out


@dataclass
class Trace:
    """What the last forward's gates did: per intervention, positions on/off, and the smallest
    distance of a condition feature to its threshold (how robust the gate is to rounding)."""

    on: list[int] = field(default_factory=list)
    off: list[int] = field(default_factory=list)
    cond_margin: float = float("inf")
    cond_values: dict[int, list[float]] = field(default_factory=dict)
    """Per conditioned intervention: its condition feature at every position."""


@dataclass
class Generation:
    """A greedy reference generation.

    ``margins[k]``: top-1 minus top-2 of the (biased) logits at step ``k``; ``gaps[m][k]``: the
    best other token's biased logit minus marker ``m``'s at step ``k`` (> 0: ``m`` not chosen).
    """

    prompt: list[int]
    ids: list[int]
    logprobs: list[float]
    margins: list[float]
    gaps: dict[int, list[float]]
    bias: dict[int, float]
    trace: Trace

    def first(self, token: int) -> int | None:
        """Generated index of the first ``token``, or None."""
        return self.ids.index(token) if token in self.ids else None


class ConditionalReference:
    """One float32 eager HF model and its SAEs, loaded once for many generations."""

    def __init__(self, model_path: str | Path, saes: Mapping[str, Path], markers: Markers) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_path), dtype=torch.float32, attn_implementation="eager"
        ).eval()
        self.saes = {n: SAE.load(p) for n, p in saes.items()}
        self.max_acts = {n: load_max_activation(p) for n, p in saes.items()}
        self.markers = markers

    # ------------------------------------------------------------------ one forward
    def _target(self, iv: FeatureIntervention) -> float:
        if iv.value is not None:
            return float(iv.value)
        if getattr(iv, "unit", "max") != "max":
            raise ValueError("the reference resolves strength x max_activation only")
        m = self.max_acts[iv.sae]
        if m is None:
            raise ValueError(f"SAE {iv.sae!r} has no max_activation for 'strength'")
        return float(iv.strength) * float(m[iv.feature])  # type: ignore[arg-type]

    def _layer_of(self, iv: Any) -> int:
        return iv.layer if isinstance(iv, VectorIntervention) else self.saes[iv.sae].cfg.hook_layer

    def _delta(self, iv: Any, x: torch.Tensor, mlp: torch.Tensor | None) -> torch.Tensor:
        """The intervention's ungated edit at every position ([T, d])."""
        if isinstance(iv, VectorIntervention):
            return (iv.scale * torch.tensor(iv.vector, dtype=x.dtype)).expand_as(x)
        sae = self.saes[iv.sae]
        if iv.mode == "add":
            return (self._target(iv) * sae.W_dec[iv.feature]).expand_as(x).detach()
        src = mlp if iv.site == "mlp_out" else x
        assert src is not None
        f = sae.encode(src)
        f2 = f.clone()
        if iv.mode == "scale":
            f2[:, iv.feature] = float(iv.factor) * f[:, iv.feature]  # type: ignore[attr-defined]
        elif iv.mode == "clamp":
            f2[:, iv.feature] = self._target(iv)
        else:
            raise ValueError(f"unknown mode {iv.mode!r}")
        return (sae.decode(f2, src) - sae.decode(f, src)).detach()

    def _condition(
        self, k: int, iv: Any, layer: int, x: torch.Tensor, trace: Trace
    ) -> torch.Tensor:
        when = getattr(iv, "when", None) if isinstance(iv, FeatureIntervention) else None
        if when is None:
            return torch.ones(x.shape[0], dtype=torch.bool)
        csae = self.saes[when.sae]
        if csae.cfg.hook_layer != layer:
            raise ValueError("a condition must read the intervention's own layer")
        f = csae.encode(x)[:, when.feature].detach()
        trace.cond_values[k] = f.tolist()
        for bound in (when.above, when.below):
            if bound is not None:
                trace.cond_margin = min(trace.cond_margin, float((f - bound).abs().min()))
        return torch.tensor([condition_holds(when, float(v)) for v in f.tolist()])

    def logits(
        self,
        ids: Sequence[int],
        prompt_len: int,
        spec: SteeringSpec | None,
        *,
        ignore_gates: bool = False,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, Trace]:
        """Logits [T, V] of ``ids`` with ``spec`` applied token by token (``ignore_gates``:
        every intervention at every position, the counterfactual the gates must differ from;
        ``last_only``: the last position's logits only, [1, V])."""
        trace = Trace()
        ivs = list(spec.interventions) if spec is not None else []
        static = static_gates(spec, ids, prompt_len, self.markers) if spec is not None else []
        if ignore_gates:
            static = [[True] * len(ids) for _ in ivs]
        trace.on = [0] * len(ivs)
        trace.off = [0] * len(ivs)
        by_layer: dict[int, list[int]] = {}
        for k, iv in enumerate(ivs):
            by_layer.setdefault(self._layer_of(iv), []).append(k)
        mlp_out: dict[int, torch.Tensor] = {}
        hooks = []

        def capture(layer: int) -> Any:
            def hook(_m: Any, _i: Any, out: Any) -> None:
                mlp_out[layer] = (out[0] if isinstance(out, tuple) else out)[0].detach()

            return hook

        def steer(layer: int, items: list[int]) -> Any:
            def hook(_m: Any, _i: Any, out: Any) -> Any:
                h = out[0] if isinstance(out, tuple) else out
                x = h[0]  # [T, d], the unedited resid_post
                delta = torch.zeros_like(x)
                for k in items:
                    iv = ivs[k]
                    gate = torch.tensor(static[k])
                    if not ignore_gates:
                        gate = gate & self._condition(k, iv, layer, x, trace)
                    trace.on[k] = int(gate.sum())
                    trace.off[k] = len(ids) - trace.on[k]
                    d = self._delta(iv, x, mlp_out.get(layer))
                    delta = delta + gate.to(x.dtype).unsqueeze(1) * d
                new = (x + delta).unsqueeze(0)
                return (new, *out[1:]) if isinstance(out, tuple) else new

            return hook

        layers = self.model.model.layers
        for layer, items in by_layer.items():
            hooks.append(layers[layer].mlp.register_forward_hook(capture(layer)))
            hooks.append(layers[layer].register_forward_hook(steer(layer, items)))
        try:
            with torch.no_grad(), one_thread():
                keep = 1 if last_only else 0  # 0: every position
                out = self.model(torch.tensor([list(ids)]), logits_to_keep=keep).logits[0]
        finally:
            for hk in hooks:
                hk.remove()
        return out.float(), trace

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        prompt: Sequence[int],
        spec: SteeringSpec | None,
        max_tokens: int,
        *,
        logit_bias: Mapping[int, float] | None = None,
        watch: Sequence[int] = (),
        reuse: tuple[Generation, int] | None = None,
    ) -> Generation:
        """Greedy ``max_tokens`` tokens; ``watch``: tokens whose gap to the choice is recorded;
        ``reuse=(gen, k)``: take ``gen``'s first ``k`` steps as they are (the caller knows
        this run makes the same choices there)."""
        bias = dict(logit_bias or {})
        gen = Generation(list(prompt), [], [], [], {m: [] for m in watch}, bias, Trace())
        if reuse is not None:
            old, k = reuse
            gen.ids, gen.logprobs, gen.margins = old.ids[:k], old.logprobs[:k], old.margins[:k]
            gen.gaps = {m: old.gaps[m][:k] for m in watch}
        seq = list(prompt) + gen.ids
        for _ in range(max_tokens - len(gen.ids)):
            logits, gen.trace = self.logits(seq, len(prompt), spec, last_only=True)
            last = logits[-1]
            biased = last.clone()
            for t, b in bias.items():
                biased[t] += torch.tensor(b, dtype=torch.float32)
            top2 = torch.topk(biased.double(), 2)
            choice = int(top2.indices[0])
            gen.margins.append(float(top2.values[0] - top2.values[1]))
            for m in watch:
                others = biased.double().clone()
                others[m] = -float("inf")
                gen.gaps[m].append(float(others.max() - biased[m].double()))
            gen.logprobs.append(float(torch.log_softmax(last.double(), -1)[choice]))
            gen.ids.append(choice)
            seq.append(choice)
        return gen

    def teacher_forced(
        self, gen: Generation, spec: SteeringSpec | None, *, ignore_gates: bool = False
    ) -> list[float]:
        """Raw logprobs of ``gen``'s chosen tokens under another spec (or with every gate on)."""
        seq = gen.prompt + gen.ids
        logits, _ = self.logits(seq[:-1], len(gen.prompt), spec, ignore_gates=ignore_gates)
        lp = torch.log_softmax(logits.double(), -1)
        p = len(gen.prompt)
        return [float(lp[p - 1 + k, t]) for k, t in enumerate(gen.ids)]


def pick_marker_bias(
    gen: Generation, marker: int, lo: int, hi: int, margin: float = 1e-3
) -> tuple[float, int] | None:
    """An extra bias for ``marker`` that makes it first appear at a generated index in
    ``[lo, hi]``, with every comparison it changes at least ``margin`` away from a tie.

    ``gen`` must record ``marker`` in ``watch``. Before its first appearance the biased run
    repeats ``gen`` (the marker loses every earlier step), so the marker first wins at step
    ``k`` exactly when ``gap[k] < B < min(gap[j], j < k)``: ``k`` must be a record low of the
    gaps. Returns ``(B, k)`` for the record low in range with the widest interval, or None.
    """
    gaps = gen.gaps[marker]
    best: tuple[float, float, int] | None = None
    prev_min = float("inf")
    for k, d in enumerate(gaps):
        if lo <= k <= hi and prev_min > 0 and d < prev_min:
            upper = min(prev_min, d + 20.0)  # a finite bias even when k is the first step
            fits = (upper + d) / 2 <= MAX_BIAS  # vLLM clamps a bias to [-100, 100]
            if fits and upper - d >= 2 * margin and (best is None or upper - d > best[0]):
                best = (upper - d, (upper + d) / 2, k)
        prev_min = min(prev_min, d)
    return None if best is None else (best[1], best[2])


def with_marker_at(
    ref: ConditionalReference,
    prompt: Sequence[int],
    spec: SteeringSpec | None,
    max_tokens: int,
    marker: int,
    lo: int,
    hi: int,
    base_bias: Mapping[int, float] | None = None,
    watch: Sequence[int] = (),
) -> Generation:
    """The reference generation with ``marker`` biased to first appear at an index in
    ``[lo, hi]`` (on top of ``base_bias``); raises if no such bias exists for this prompt."""
    watch = list(dict.fromkeys([marker, *watch]))
    base = dict(base_bias or {})
    plain = ref.generate(prompt, spec, max_tokens, logit_bias=base, watch=watch)
    picked = pick_marker_bias(plain, marker, lo, hi)
    if picked is None:
        raise ValueError(f"no bias puts token {marker} at a generated index in [{lo}, {hi}]")
    b, k = picked
    base[marker] = base.get(marker, 0.0) + b
    out = ref.generate(prompt, spec, max_tokens, logit_bias=base, watch=watch, reuse=(plain, k))
    if out.first(marker) != k:
        raise AssertionError(f"bias {b} put token {marker} at {out.first(marker)}, not {k}")
    return out


__all__ = [
    "NONE",
    "ConditionalReference",
    "Generation",
    "Markers",
    "Trace",
    "condition_holds",
    "in_scope",
    "in_window",
    "one_thread",
    "phase_bounds",
    "pick_marker_bias",
    "static_gates",
    "with_marker_at",
]
