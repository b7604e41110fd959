"""SAE training speed: ours vs SAELens's trainer on identical cached activations.

Not a test: it takes minutes and its numbers depend on the machine's load.
Each trainer runs in its own subprocess (ours in this environment, SAELens in
``.venv-saelens``, built by ``scripts/setup_saelens_env.sh``) on the same
first ``--tokens`` activations of one cache, same architecture, width, batch,
learning rate and schedule; both are then scored on the same held-out
activations (the cache's last ``--eval-tokens``) with their saved, folded
weights. Memory: the child's peak RSS during training (the peak is reset
after loading the data) minus its RSS before training = the training working
set, plus that absolute peak.

Also measures activation collection tokens/s (our early-stopping capture)
against a plain full transformers forward over the same packed rows.

    .venv/bin/python -m benchmarks.sae_train_speed --activations runs/acts-l18-240k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sae_steer_vllm.files import atomic_write_json
from sae_training import ActivationError, DiskCache
from sae_training.architectures.matryoshka import default_widths

ROOT = Path(__file__).resolve().parent.parent
ARCHS = ("standard", "topk", "batchtopk", "matryoshka_batchtopk")
SAELENS_PY = ROOT / ".venv-saelens" / "bin" / "python"

# Shared by both children: the same train/held-out tensors, prepared once by the parent from
# the cache (through sae_training's cache owner), so neither child knows the cache format.
_LOAD = r"""
import json, resource, sys, time, torch
from pathlib import Path
from safetensors.torch import load_file
a = json.loads(sys.argv[1])
torch.manual_seed(0)
data = load_file(a["data"])
train_x, eval_x = data["train"], data["eval"]
del data
import gc; gc.collect()
def status_mb(key):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")
def rss_mb():
    return status_mb("VmHWM")
Path("/proc/self/clear_refs").write_text("5")  # reset the peak so loading does not count
rss0 = status_mb("VmRSS")
def ev_l0(encode, decode, x):
    with torch.no_grad():
        f = encode(x)
        r = decode(f)
    # ~0.01% of layer-18 tokens are "massive activations" (norm up to 100x the median); a
    # JumpReLU SAE can blow up on them and dominate a raw EV, so EV is also reported on the
    # typical tokens (norm <= 10x the median), the same tokens for every trainer.
    n = x.norm(dim=-1)
    typ = n <= 10 * n.median()
    def ev(m):
        xs, rs = x[m], r[m]
        return float(1 - (xs - rs).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
    return {"explained_variance": ev(torch.ones_like(typ)), "explained_variance_typical": ev(typ),
            "typical_fraction": float(typ.float().mean()),
            "l0": float((f > 0).float().sum(-1).mean()),
            "l0_typical": float((f[typ] > 0).float().sum(-1).mean())}
"""

_OURS = (
    _LOAD
    + r"""
from sae_training import MemoryActivations, RunOptions, TrainConfig, Trainer, export_sae
import tempfile
cfg = TrainConfig(architecture=a["arch"], d_sae=a["d_sae"], k=a["k"], l1_coeff=a["l1_coeff"], lr=a["lr"],
                  matryoshka_widths=a["widths"] if a["arch"] == "matryoshka_batchtopk" else None,
                  lr_decay=0.2, batch_size=a["batch_size"], train_tokens=a["tokens"], grad_clip=a["grad_clip"],
                  norm_tokens=min(32768, a["tokens"]))
t = time.perf_counter()
res = Trainer(cfg, MemoryActivations(train_x), Path(tempfile.mkdtemp()), RunOptions(progress=False, checkpoint_every=10**9)).train()
secs = time.perf_counter() - t
sae = export_sae(res, hook_layer=a["layer"])
out = {"seconds": secs, "tokens_per_second": a["tokens"] / secs, "peak_rss_mb": rss_mb(), "train_rss_mb": rss_mb() - rss0}
out.update(ev_l0(sae.encode, sae.decode, eval_x))
print("RESULT " + json.dumps(out))
"""
)

_SAELENS = (
    _LOAD
    + r"""
from sae_lens import StandardTrainingSAE, StandardTrainingSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
from sae_lens.saes.matryoshka_batchtopk_sae import MatryoshkaBatchTopKTrainingSAE, MatryoshkaBatchTopKTrainingSAEConfig
from sae_lens.config import LoggingConfig, SAETrainerConfig
from sae_lens.training.sae_trainer import SAETrainer
B = a["batch_size"]
steps = a["tokens"] // B
def provider():
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(epoch)
        perm = torch.randperm(train_x.shape[0], generator=g)
        for i in range(train_x.shape[0] // B):
            yield train_x[perm[i * B:(i + 1) * B]]
        epoch += 1
common = dict(d_in=train_x.shape[1], d_sae=a["d_sae"], normalize_activations="expected_average_only_in", decoder_init_norm=0.1)
if a["arch"] == "topk":
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(k=a["k"], **common))
elif a["arch"] == "batchtopk":
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=a["k"], **common))
elif a["arch"] == "matryoshka_batchtopk":
    sae = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(k=a["k"], matryoshka_widths=list(a["widths"]), **common))
else:
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=a["l1_coeff"], l1_warm_up_steps=int(0.05 * steps), **common))
cfg = SAETrainerConfig(total_training_samples=steps * B, train_batch_size_samples=B, lr=a["lr"], lr_end=0.0,
                       lr_decay_steps=int(0.2 * steps), device="cpu", logger=LoggingConfig(log_to_wandb=False),
                       n_batches_for_norm_estimate=max(1, min(32768, a["tokens"]) // B))
t = time.perf_counter()
trainer = SAETrainer(cfg, sae, provider())
trained = trainer.fit()
secs = time.perf_counter() - t
out = {"seconds": secs, "tokens_per_second": a["tokens"] / secs, "peak_rss_mb": rss_mb(), "train_rss_mb": rss_mb() - rss0}
# score the inference SAE SAELens saves (decoder-norm rescaling folded in), as users load it
import tempfile
from sae_lens import SAE
tmp = tempfile.mkdtemp()
trained.save_inference_model(tmp)
inf = SAE.load_from_disk(tmp, device="cpu")
out.update(ev_l0(inf.encode, inf.decode, eval_x))
print("RESULT " + json.dumps(out))
"""
)


def _run_child(python: Path, code: str, args: dict[str, Any]) -> dict[str, Any]:
    r = subprocess.run(
        [str(python), "-c", code, json.dumps(args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=7200,
    )
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            res: dict[str, Any] = json.loads(line[len("RESULT ") :])
            return res
    raise RuntimeError(f"{python} failed (rc={r.returncode}):\n{r.stderr[-3000:]}")


def split_activations(cache: DiskCache, tokens: int, eval_tokens: int, out: Path) -> None:
    """The cache's first ``tokens`` activations (training) and last ``eval_tokens``
    (held out) of its layer, saved to ``out`` for both trainers' children."""
    import torch
    from safetensors.torch import save_file

    acts = torch.cat([cache.load_shard(i) for i in range(len(cache.meta.shards))])
    train, held_out = acts[:tokens].clone(), acts[-eval_tokens:].clone()
    del acts
    save_file({"train": train, "eval": held_out}, str(out))


def collection_speed(
    model_path: str, layer: int, tokens: int, context_size: int = 256
) -> dict[str, float]:
    """Our capture (stops after ``layer``) vs a plain full forward over the same rows."""
    import torch

    from sae_training import ResidReader, TextMix, load_model
    from sae_training.tokens import pack_rows

    model, tok = load_model(model_path, device="cpu")
    rows = []
    for r in pack_rows(tok, TextMix().texts(tok, "train"), context_size):
        rows.append(r)
        if len(rows) * context_size >= tokens:
            break
    ids = torch.stack(rows)
    capture = ResidReader(model, layer)
    out: dict[str, float] = {}
    for name, fn in (
        ("plain_forward", lambda b: model(input_ids=b, use_cache=False)),
        ("ours_capture", lambda b: capture(b)),
    ):
        t = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, ids.shape[0], 8):
                fn(ids[i : i + 8])
        out[f"{name}_tokens_per_second"] = ids.numel() / (time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--activations", type=Path, default=ROOT / "runs" / "acts-l18-240k", help="activation cache"
    )
    p.add_argument("--layer", type=int, default=18)
    p.add_argument("--arch", choices=ARCHS, nargs="+", default=list(ARCHS))
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs per trainer and architecture; the table shows the median (default 3)",
    )
    p.add_argument(
        "--matryoshka-widths",
        type=int,
        nargs="+",
        default=None,
        help="levels for matryoshka_batchtopk, both trainers (default d_sae/64, /16, /4, d_sae)",
    )
    p.add_argument("--tokens", type=int, default=65536, help="training tokens for each trainer")
    p.add_argument(
        "--eval-tokens", type=int, default=8192, help="held-out tokens (the cache's last)"
    )
    p.add_argument("--d-sae", type=int, default=9216)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--l1-coeff", type=float, default=5.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument(
        "--grad-clip", type=float, default=None, help="ours only (SAELens always clips at 1.0)"
    )
    p.add_argument(
        "--trainers", nargs="+", choices=["ours", "SAELens"], default=["ours", "SAELens"]
    )
    p.add_argument(
        "--collect-tokens",
        type=int,
        default=4096,
        help="tokens for the collection comparison (0: skip)",
    )
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "sae_train_speed.json")
    args = p.parse_args(argv)
    try:
        cache = DiskCache(args.activations, args.layer)
    except ActivationError as e:
        print(f"{e} (run `sae-steer collect` first)", file=sys.stderr)
        return 1
    if not SAELENS_PY.is_file():
        print("building .venv-saelens (scripts/setup_saelens_env.sh) ...", file=sys.stderr)
        subprocess.run(["bash", str(ROOT / "scripts" / "setup_saelens_env.sh")], check=True)
    tmp = tempfile.TemporaryDirectory(prefix="sae_train_speed-")
    data = Path(tmp.name) / "activations.safetensors"
    split_activations(cache, args.tokens, args.eval_tokens, data)
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": []}
    for arch in args.arch:
        child = {
            "data": str(data),
            "layer": args.layer,
            "tokens": args.tokens,
            "eval_tokens": args.eval_tokens,
            "arch": arch,
            "d_sae": args.d_sae,
            "k": args.k,
            "l1_coeff": args.l1_coeff,
            "lr": args.lr,
            "batch_size": args.batch_size,
            "grad_clip": args.grad_clip,
            "widths": args.matryoshka_widths or default_widths(args.d_sae),
        }
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in args.trainers}
        # trainers alternate within each repeat, so a drift in the machine's load hits both
        for rep in range(args.repeats):
            for name, py, code in (
                ("ours", Path(sys.executable), _OURS),
                ("SAELens", SAELENS_PY, _SAELENS),
            ):
                if name not in args.trainers:
                    continue
                print(f"[bench] {arch} {name} run {rep + 1} ...", file=sys.stderr, flush=True)
                res = _run_child(py, code, child)
                runs[name].append(res)
                print(f"[bench] {arch} {name}: {json.dumps(res)}", file=sys.stderr, flush=True)
        for name, reps in runs.items():
            results["rows"].append({"arch": arch, "trainer": name, **median_run(reps)})
    tmp.cleanup()
    if args.collect_tokens:
        results["collection"] = collection_speed(cache.meta.model, args.layer, args.collect_tokens)
    atomic_write_json(args.out, results)
    print(markdown_table(results))
    return 0


def median_run(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several runs of the same training: the median-speed run's numbers (its EV
    and L0 are every run's: training is deterministic), each run's tokens/s, and the
    largest training memory of any run (memory is compared, so the worst case counts)."""
    by_speed = sorted(reps, key=lambda r: r["tokens_per_second"])
    row = dict(by_speed[(len(by_speed) - 1) // 2])
    row["runs_tokens_per_second"] = [r["tokens_per_second"] for r in reps]
    for key in ("train_rss_mb", "peak_rss_mb"):
        row[key] = max(r[key] for r in reps)
    return row


def markdown_table(results: dict[str, Any]) -> str:
    lines = [
        "| arch | trainer | tokens/s (median) | runs | speed-up | train RSS (MB) | peak RSS (MB) "
        "| EV | L0 | EV typical tokens | L0 typical |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base = {r["arch"]: r["tokens_per_second"] for r in results["rows"] if r["trainer"] == "SAELens"}
    for r in results["rows"]:
        up = r["tokens_per_second"] / base[r["arch"]] if r["arch"] in base else float("nan")
        lines.append(
            f"| {r['arch']} | {r['trainer']} | {r['tokens_per_second']:.0f} | "
            f"{', '.join(f'{v:.0f}' for v in r.get('runs_tokens_per_second', []))} | {up:.2f}x | "
            f"{r['train_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['explained_variance']:.3f} | "
            f"{r['l0']:.1f} | {r.get('explained_variance_typical', float('nan')):.3f} | "
            f"{r.get('l0_typical', float('nan')):.1f} |"
        )
    c = results.get("collection")
    if c:
        lines += [
            "",
            "| collection | tokens/s |",
            "|---|---|",
            f"| plain transformers forward (all layers + logits) | {c['plain_forward_tokens_per_second']:.0f} |",
            f"| ours (hooks, stops after the layer) | {c['ours_capture_tokens_per_second']:.0f} |",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
