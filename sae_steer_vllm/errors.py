"""The one base class of every error sae-steer reports to a user, and its exit codes.

Every module raises a subclass of :class:`SaeSteerError` (usually also a ``ValueError`` or
``RuntimeError``, so callers that caught those keep working). The command runner
(:mod:`sae_steer_vllm.command`) prints the message, never a traceback, and exits with the
class's ``exit_code``: the same failure gives the same code in every subcommand.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""The input was valid but the work failed (bad data, a broken model folder, some samples failed)."""
EXIT_USAGE = 2
"""Bad options or configuration: nothing was done; fix the command line."""
EXIT_UNREACHABLE = 3
"""A service the command talks to (the OpenAI endpoint) could not be reached."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (128 + SIGINT), after saving what can be resumed."""


class SaeSteerError(Exception):
    """A failure the user can act on; the message says what to change."""

    exit_code: int = EXIT_FAILED


class UsageError(SaeSteerError, ValueError):
    """Bad options, configuration or spec files: nothing ran."""

    exit_code = EXIT_USAGE
