"""``sae-steer distill``: :func:`~sae_training.distill.distill.distill_model` plus a printed summary."""

from __future__ import annotations

from sae_steer_vllm.command import run_model_command

from .distill import DistillConfig, distill_model, is_complete, read_check, read_state

PROG = "sae-steer distill"


def _run(cfg: DistillConfig) -> int:
    out = distill_model(cfg)
    if not is_complete(out):
        state = read_state(out) or {}
        print(
            f"stopped at step {state.get('step', 0)}/{state.get('steps_total', '?')} "
            f"(checkpoint in {out}); rerun the same command to continue"
        )
        return 0
    print(f"model      : {out}")
    report = read_check(out)
    if report is None:
        return 0
    state = read_state(out) or {}
    d = report["data"]
    print(
        f"data       : {d['train']} traces trained on ({d['train_tokens']} tokens), "
        f"{d['held_out']} held out, {d['too_long']} longer than --max-len left out"
    )
    print(
        f"training   : {report['steps']} steps, loss {report['loss_first']:.3f} -> "
        f"{report['loss_last']:.3f}, wall {state.get('wall_s', 0):.0f} s"
    )
    hb, ha = report["held_out_loss_before"], report["held_out_loss_after"]
    if hb is not None and ha is not None:
        print(f"held out   : loss {hb:.3f} -> {ha:.3f} (completion tokens of held-out traces)")
    b, a = report["before"], report["after"]
    print(f"{'check':<11}{'closes </think>':>16}{'words/100 tok':>15}{'tokens':>8}")
    for name, r in (("before", b), ("after", a)):
        print(
            f"{name:<11}{r['closed_think_share']:>16.2f}{r['reasoning_word_rate']:>15.2f}"
            f"{r['completion_tokens']:>8}"
        )
    return 0


def main(argv: list[str]) -> int:
    return run_model_command(PROG, DistillConfig, _run, argv)


__all__ = ["main"]
