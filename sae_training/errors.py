"""The errors sae_training reports to a user, in one place.

Each is a :class:`~sae_steer_vllm.errors.SaeSteerError` (so every ``sae-steer``
subcommand turns it into a message and exit code 1, never a traceback) and also the
builtin it always was (``ValueError`` for bad input, ``RuntimeError`` for a run that
cannot go on), so callers that caught those keep working. They live together rather than
beside their owners because the text -> tokens -> residual -> activations stack raises
them at every level, and a low module must not import a high one to raise its error.
"""

from __future__ import annotations

from sae_steer_vllm.errors import SaeSteerError


class CorpusError(SaeSteerError, ValueError):
    """Bad input data or corpus settings; the message names the file and line."""


class ActivationError(SaeSteerError, ValueError):
    """Bad request or bad data for activation collection or an activation cache."""


class ModelLoadError(SaeSteerError, RuntimeError):
    """The model folder cannot be loaded or has no decoder-layer list we recognise."""


class TrainingError(SaeSteerError, RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class TrainingDiverged(TrainingError):
    """The loss became NaN/inf; the last good checkpoint is kept untouched."""


class VocabularyError(SaeSteerError, ValueError):
    """A reasoning-vocabulary file that cannot be read or has the wrong shape."""


class VocabPatternError(SaeSteerError, ValueError):
    """A vocabulary string cannot be turned into token ids."""


class FeatureStatsError(SaeSteerError, ValueError):
    """Feature statistics that cannot be computed or do not belong to the SAE at hand."""


__all__ = [
    "ActivationError",
    "CorpusError",
    "FeatureStatsError",
    "ModelLoadError",
    "TrainingDiverged",
    "TrainingError",
    "VocabPatternError",
    "VocabularyError",
]
