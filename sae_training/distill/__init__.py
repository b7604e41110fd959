"""``sae-steer distill``: a small R1-distill stand-in built from the default model.

:func:`distill_model` (:mod:`.distill`) runs it: traces rendered and split (:mod:`.data`),
the R1 tokenizer surface and embedding growth (:mod:`.tokenizer`), the resumable
fine-tuning loop (:mod:`.finetune`), the before/after check (:mod:`.check`); :mod:`.cli` is
the command. Names are imported on first use, so importing the package stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_steer_vllm.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_training.distill.check import CheckResult, reasoning_word_rate
    from sae_training.distill.distill import DistillConfig, distill_model, read_check

_EXPORTS: dict[str, str] = {
    "CheckResult": ".check",
    "reasoning_word_rate": ".check",
    "DistillConfig": ".distill",
    "distill_model": ".distill",
    "read_check": ".distill",
}

__all__ = ["CheckResult", "DistillConfig", "distill_model", "read_check", "reasoning_word_rate"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
