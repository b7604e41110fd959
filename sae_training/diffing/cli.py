"""``sae-steer diff``: :func:`~sae_training.diffing.diff_models` plus a printed summary."""

from __future__ import annotations

from sae_steer_vllm.command import run_model_command
from sae_training.diffing.config import DiffConfig

PROG = "sae-steer diff"


def _run(cfg: DiffConfig) -> int:
    from sae_training.diffing.classify import CLASSES
    from sae_training.diffing.run import diff_models

    res = diff_models(cfg)
    total = sum(res.counts.values()) or 1
    for key, n in res.counts.items():
        print(f"{CLASSES[key]:<32} {n:>7}  {100 * n / total:5.1f}%")
    if res.reasonscore is not None:
        print(
            f"\nReasonScore top-{len(res.reasonscore['top'])} vs "
            f"{len(res.reasonscore['random'])} random features:"
        )
        for key, r in res.reasonscore["per_class"].items():
            print(
                f"  {CLASSES[key]:<32} top {r['top']:>3}  random {r['random']:>3}  "
                f"Fisher p {r['fisher_p']:.3g}"
            )
    print(f"\nreport : {res.report_path}\njson   : {res.json_path}\nplot   : {res.plot_path}")
    return 0


def main(argv: list[str]) -> int:
    """``sae-steer diff [options]``: options are the fields of :class:`DiffConfig`."""
    return run_model_command(PROG, DiffConfig, _run, argv)
