"""Command-line pieces the benchmark commands share, defined once.

``sae-steer eval``, ``bench`` and ``demo`` derive their parsers from pydantic config
models (:mod:`sae_steer_vllm.command`). What they have in common lives here: the
endpoint options, the comma-list and shell-words field types their flags have always
taken (``--strengths 1,2,4``, ``--vllm-args '--dtype float32'``), and laying one model's
fields out in titled ``--help`` groups.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, TypeVar, cast

from pydantic import BaseModel, BeforeValidator, Field

from sae_steer_vllm.command import CommandConfig, add_model_options

T = TypeVar("T")

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"


def split_commas(value: Any) -> Any:
    """``"1,2, 4"`` -> ``["1", "2", "4"]`` (pydantic then converts each item); lists pass."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return value


def split_shell_words(value: Any) -> Any:
    """``"--dtype float32"`` -> ``["--dtype", "float32"]`` (shell quoting rules); lists pass."""
    if isinstance(value, str):
        return shlex.split(value)
    return value


_ONE_STRING = {"type": None, "nargs": None}
"""argparse takes the flag's value as one string; the field's validator splits it."""

CommaList = Annotated[
    list[T],
    BeforeValidator(split_commas),
    Field(json_schema_extra={"cli": {**_ONE_STRING, "metavar": "A,B,..."}}),
]
"""A list given on the command line as one comma-separated value."""

ShellWords = Annotated[
    list[str],
    BeforeValidator(split_shell_words),
    Field(json_schema_extra={"cli": {**_ONE_STRING, "metavar": "'WORDS'"}}),
]
"""A list given on the command line as one quoted string of shell words."""


class EndpointOptions(CommandConfig):
    """Where the OpenAI-compatible server is (``sae-steer eval`` and ``bench``)."""

    base_url: str | None = None
    """OpenAI-compatible base URL ending in /v1 (default: $OPENAI_BASE_URL or
    http://127.0.0.1:8000/v1)"""
    model: str | None = None
    """served model name (default: the first model the server lists)"""
    api_key: str | None = None
    """API key if the server wants one (default: $OPENAI_API_KEY or EMPTY)"""

    @property
    def url(self) -> str:
        """The base URL, with the environment's default read at run time, not import time."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL", DEFAULT_BASE_URL)

    @property
    def key(self) -> str:
        return self.api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")


def command_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """A subcommand's parser: its description, and an epilog of examples kept as written."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_option_groups(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    groups: Mapping[str, Sequence[str]],
) -> dict[str, argparse._ArgumentGroup]:
    """Add every field of ``model`` as an option, in titled ``--help`` groups.

    ``groups`` maps a title to field names and must name each field exactly once (a
    field added to the model is never silently missing from the command line). Returns
    the groups, so a command can add a genuinely extra option to one of them.
    """
    named = [n for names in groups.values() for n in names]
    missing = set(model.model_fields) - set(named)
    if missing or len(named) != len(set(named)):
        raise TypeError(f"{model.__name__}: option groups must list each field once ({missing})")
    out = {}
    for title, names in groups.items():
        group = parser.add_argument_group(title)
        exclude = set(model.model_fields) - set(names)
        # an argument group has add_argument, all add_model_options uses
        add_model_options(cast(argparse.ArgumentParser, group), model, exclude=exclude)
        out[title] = group
    return out
