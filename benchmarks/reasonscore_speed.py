"""ReasonScore speed: our one-pass statistics vs the authors' algorithm (not a test).

The authors' ``extraction/compute_score.py`` re-runs the model over the whole corpus for
every batch of features (48 per batch in the paper's set-up) and keeps Welford means for
that batch only. Ours runs the model once and accumulates every feature at once. Both are
run here on the same corpus windows, the same model (early-stopped at the SAE's layer the
same way) and the same SAE, each in its own subprocess so peak memory (max RSS) is
measured separately.

When the full authors' run would take hours, ``--authors-batches N`` measures N feature
batches, checks their numbers against ours, and extrapolates the wall time linearly
(time per batch x number of batches + set-up); the table says so.

Usage::

    .venv/bin/python benchmarks/reasonscore_speed.py            # default model, 16x SAE
    .venv/bin/python benchmarks/reasonscore_speed.py --max-tokens 4096 --authors-batches 2

With no trained SAE at ``runs/default-sae`` (or one of another width) a throwaway SAE of
16x width is made: random decoder directions, encoder = decoder transpose, biases set so
each feature fires on ~1% of tokens (trained SAEs are that sparse; a dense random SAE
would misrepresent the histogram/top-k costs).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from sae_steer_vllm.constants import SAELENS_CFG, TRACE_CORPUS
from sae_steer_vllm.sae import SAE, SAEConfig
from sae_training import ResidReader, load_model, load_vocabulary
from sae_training.features.masks import build_patterns
from sae_training.features.stats_pass import run_feature_stats
from sae_training.tokens import CorpusSpec, iter_batches, iter_windows, special_token_ids

FEATURE_BATCH = 48
LAYER = 18
WIDTH = 16


# ---------------------------------------------------------------------- the authors' algorithm
class AuthorsRollingMean:
    """Their RollingMean, vectorised as in their code: per-concept masks via ``unfold``,
    expansion by a difference array + cumsum, Welford updates per token minibatch."""

    def __init__(
        self,
        concepts: list[list[torch.Tensor]],
        ignore_ids: list[int],
        expand: tuple[int, int],
        n: int,
    ) -> None:
        self.concepts, self.expand = concepts, expand
        self.ignore = torch.tensor(ignore_ids, dtype=torch.long)
        self.means = [torch.zeros(n, dtype=torch.float64) for _ in concepts]
        self.counts = [0] * len(concepts)
        self.mean_pos = torch.zeros(n, dtype=torch.float64)
        self.count_pos = 0
        self.mean_neg = torch.zeros(n, dtype=torch.float64)
        self.count_neg = 0

    def _single_mask(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        B, T = tokens.shape
        L = len(ids)
        mask = torch.zeros_like(tokens, dtype=torch.bool)
        if L > T:
            return mask
        matches = (tokens.unfold(1, L, 1) == ids.view(1, 1, -1)).all(dim=2)
        b, w = torch.nonzero(matches, as_tuple=True)
        if len(b) == 0:
            return mask
        spans = w.unsqueeze(1) + torch.arange(L).unsqueeze(0)
        mask[b.unsqueeze(1).expand(-1, L).reshape(-1), spans.reshape(-1)] = True
        left, right = self.expand
        b, p = torch.nonzero(mask, as_tuple=True)
        starts = (p - left).clamp(min=0)
        ends = (p + right).clamp(max=T - 1)
        delta = torch.zeros(B, T + 1, dtype=torch.int32)
        delta.index_put_((b, starts), torch.ones_like(b, dtype=torch.int32), accumulate=True)
        delta.index_put_((b, ends + 1), -torch.ones_like(b, dtype=torch.int32), accumulate=True)
        return delta.cumsum(dim=1)[:, :-1] > 0

    @staticmethod
    def _welford(
        mean: torch.Tensor, count: int, acts: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, int]:
        sel = acts[mask]
        if sel.shape[0] == 0:
            return mean, count
        c = sel.shape[0]
        new = count + c
        return mean + (c / new) * (sel.mean(dim=0) - mean), new

    def update(self, tokens: torch.Tensor, acts: torch.Tensor) -> None:
        ignore = torch.isin(tokens, self.ignore)
        combined = torch.zeros_like(tokens, dtype=torch.bool)
        for j, pats in enumerate(self.concepts):
            m = torch.zeros_like(tokens, dtype=torch.bool)
            for ids in pats:
                m |= self._single_mask(tokens, ids)
            m &= ~ignore
            self.means[j], self.counts[j] = self._welford(self.means[j], self.counts[j], acts, m)
            combined |= m
        pos = combined & ~ignore
        neg = ~combined & ~ignore
        self.mean_pos, self.count_pos = self._welford(self.mean_pos, self.count_pos, acts, pos)
        self.mean_neg, self.count_neg = self._welford(self.mean_neg, self.count_neg, acts, neg)


@torch.inference_mode()
def authors_batches(
    reader: ResidReader,
    sae: SAE,
    batches: list[torch.Tensor],
    concepts: list[list[torch.Tensor]],
    ignore_ids: list[int],
    feature_batches: list[list[int]],
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """Run the given feature batches; returns folded means for their features and the
    wall time of each feature batch (each is a full pass of the model over the corpus)."""
    norm = sae.W_dec.norm(dim=1)
    W_enc, b_enc = sae.W_enc * norm, sae.b_enc * norm  # fold_W_dec_norm
    thr = None if sae.threshold is None else sae.threshold * norm
    out: dict[str, list[torch.Tensor]] = {"mean_group": [], "mean_pos": [], "mean_neg": []}
    times = []
    for feats in feature_batches:
        t0 = time.perf_counter()
        rm = AuthorsRollingMean(concepts, ignore_ids, (1, 2), len(feats))
        for tokens in batches:
            h = reader(tokens)[sae.cfg.hook_layer]
            if sae.cfg.architecture == "topk":
                acts = (sae.encode(h) * norm)[..., feats]
            else:
                pre = (h - sae.b_dec) @ W_enc[:, feats] + b_enc[feats]
                acts = torch.relu(pre)
                if thr is not None:
                    acts = acts * (pre > thr[feats])
            rm.update(tokens, acts.double())
        times.append(time.perf_counter() - t0)
        out["mean_group"].append(torch.stack(rm.means, dim=1))
        out["mean_pos"].append(rm.mean_pos)
        out["mean_neg"].append(rm.mean_neg)
    return {k: torch.cat(v) for k, v in out.items()}, times


# ---------------------------------------------------------------------- set-up
def throwaway_sae(
    d_in: int, d_sae: int, layer: int, reader: ResidReader, sample: torch.Tensor
) -> SAE:
    g = torch.Generator().manual_seed(0)
    W_dec = torch.randn(d_sae, d_in, generator=g)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.T.contiguous()
    b_dec = torch.zeros(d_in)
    h = reader(sample)[layer].reshape(-1, d_in)
    pre = h @ W_enc
    b_enc = -torch.quantile(pre[: min(len(pre), 2048)], 0.99, dim=0)  # ~1% density
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="standard", hook_layer=layer)
    return SAE(cfg, W_enc, b_enc, W_dec, b_dec)


def prepare(args: argparse.Namespace) -> tuple[Any, Any, SAE, CorpusSpec, str]:
    from sae_steer_vllm.default_model import prepare_default_model

    model_dir = Path(args.model) if args.model else prepare_default_model()
    model, tok = load_model(model_dir)
    # burn_in 0: the authors' algorithm counts every window position, and the means of the
    # two methods are compared on the same positions
    spec = CorpusSpec(Path(args.corpus), ctx=args.ctx, max_tokens=args.max_tokens, burn_in=0)
    sae_dir = Path(args.sae)
    d_in = int(model.config.hidden_size)
    if (sae_dir / SAELENS_CFG).is_file():
        sae = SAE.load(sae_dir)
        if sae.cfg.d_sae == WIDTH * d_in:
            return model, tok, sae, spec, f"trained SAE {sae_dir}"
    reader = ResidReader(model, LAYER)
    first = next(iter_windows(tok, spec))
    sae = throwaway_sae(d_in, WIDTH * d_in, LAYER, reader, torch.tensor([first.ids]))
    return model, tok, sae, spec, "throwaway calibrated random SAE (standard, ~1% density)"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---------------------------------------------------------------------- the two workers
def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    model, tok, sae, spec, sae_desc = prepare(args)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    res = run_feature_stats(model, tok, sae, spec, load_vocabulary(), batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    torch.save({k: res.stats[k] for k in ("mean_group", "mean_pos", "mean_neg")}, args.result_file)
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb(),
        "rss_before_mb": base,
        "tokens": res.report.n_tokens,
        "d_sae": sae.cfg.d_sae,
        "sae": sae_desc,
    }


def run_authors(args: argparse.Namespace) -> dict[str, Any]:
    model, tok, sae, spec, sae_desc = prepare(args)
    reader = ResidReader(model, sae.cfg.hook_layer)
    vp = build_patterns(tok, load_vocabulary())
    concepts = [[torch.tensor(p) for p in pats] for pats in vp.patterns]
    ignore_ids = sorted(special_token_ids(tok))
    t_setup = time.perf_counter()
    batches = [
        torch.tensor([w.ids for w in b])
        for b in iter_batches(iter_windows(tok, spec), args.batch_size, spec.ctx)
    ]
    d = sae.cfg.d_sae
    all_batches = [list(range(s, min(d, s + FEATURE_BATCH))) for s in range(0, d, FEATURE_BATCH)]
    # spread the measured batches over the feature range
    step = max(1, len(all_batches) // max(args.authors_batches, 1))
    chosen = all_batches[::step][: args.authors_batches]
    setup = time.perf_counter() - t_setup
    means, times = authors_batches(reader, sae, batches, concepts, ignore_ids, chosen)
    torch.save({"features": [f for b in chosen for f in b], **means}, args.result_file)
    per_batch = sum(times) / len(times)
    return {
        "seconds_measured": sum(times) + setup,
        "batches_measured": len(chosen),
        "batches_total": len(all_batches),
        "seconds_per_batch": per_batch,
        "seconds_extrapolated": setup + per_batch * len(all_batches),
        "peak_rss_mb": peak_rss_mb(),
        "tokens": int(sum(b.numel() for b in batches)),
    }


# ---------------------------------------------------------------------- driver
def _child(method: str, args: argparse.Namespace, result_file: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--result-file",
        str(result_file),
        "--max-tokens",
        str(args.max_tokens),
        "--ctx",
        str(args.ctx),
        "--batch-size",
        str(args.batch_size),
        "--authors-batches",
        str(args.authors_batches),
        "--corpus",
        args.corpus,
        "--sae",
        args.sae,
    ] + (["--model", args.model] if args.model else [])
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout
    last = [line for line in out.splitlines() if line.startswith("RESULT ")][-1]
    result: dict[str, Any] = json.loads(last[len("RESULT ") :])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default=None, help="HF model folder (default: the default model)")
    p.add_argument("--sae", default="runs/default-sae", help="SAE folder (16x width) if trained")
    p.add_argument("--corpus", default=TRACE_CORPUS)
    p.add_argument("--max-tokens", type=int, default=8192)
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward (both methods)")
    p.add_argument("--authors-batches", type=int, default=3, help="feature batches to time")
    p.add_argument("--out", default="runs/reasonscore_speed.json")
    p.add_argument("--worker", choices=("ours", "authors"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.worker:
        res = run_ours(args) if args.worker == "ours" else run_authors(args)
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    ours_file, auth_file = out.with_suffix(".ours.pt"), out.with_suffix(".authors.pt")
    ours = _child("ours", args, ours_file)
    authors = _child("authors", args, auth_file)
    a, o = torch.load(auth_file), torch.load(ours_file)
    feats = torch.tensor(a["features"])
    errs = {}
    for k in ("mean_group", "mean_pos", "mean_neg"):
        ref = a[k]
        errs[k] = float((o[k][feats] - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)
    speedup = authors["seconds_extrapolated"] / ours["seconds"]
    report = {
        "ours": ours,
        "authors": authors,
        "speedup": speedup,
        "max_rel_diff_on_measured_features": errs,
        "torch_threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(report, indent=2))
    extrap = authors["batches_measured"] < authors["batches_total"]
    print(f"SAE: {ours['sae']}, d_sae {ours['d_sae']}; corpus {ours['tokens']} tokens")
    print("| method | wall time | peak RSS |")
    print("|---|---:|---:|")
    print(
        f"| ours (one pass, all features) | {ours['seconds']:.1f} s | {ours['peak_rss_mb']:.0f} MB |"
    )
    note = (
        f" (extrapolated from {authors['batches_measured']} of {authors['batches_total']} "
        f"feature batches, {authors['seconds_per_batch']:.1f} s each)"
        if extrap
        else ""
    )
    print(
        f"| authors (model re-run per {FEATURE_BATCH} features) | "
        f"{authors['seconds_extrapolated']:.0f} s{note} | {authors['peak_rss_mb']:.0f} MB |"
    )
    print(
        f"speed-up: {speedup:.0f}x; max relative difference of the means: {max(errs.values()):.1e}"
    )
    return 0 if all(math.isfinite(v) for v in errs.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
