"""``sae-steer diff``: which SAE features need the reasoning model, reasoning data, or both.

Read in this order: :mod:`.config` (the inputs, :class:`DiffConfig`, and
:class:`DiffResult`), :mod:`.conditions` (the four model x data conditions: collection and
feature activity), :mod:`.finetune` (the brief SAE fine-tune on the project's trainer and
the direction cosines), :mod:`.classify` (the rule), :mod:`.compare` (ReasonScore's top
features vs random ones), :mod:`.report`, and :mod:`.run` (:func:`diff_models`, end to
end); :mod:`.cli` is the command. Names are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sae_steer_vllm.lazy import lazy_exports

if TYPE_CHECKING:
    from sae_training.diffing.classify import CLASSES, Thresholds, classify
    from sae_training.diffing.config import DiffConfig, DiffResult
    from sae_training.diffing.run import diff_models

_EXPORTS: dict[str, str] = {
    "CLASSES": ".classify",
    "Thresholds": ".classify",
    "classify": ".classify",
    "DiffConfig": ".config",
    "DiffResult": ".config",
    "diff_models": ".run",
}

__all__ = ["CLASSES", "DiffConfig", "DiffResult", "Thresholds", "classify", "diff_models"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
