"""The one runner of every ``sae-steer`` subcommand, and options derived from config models.

Two jobs, so that no subcommand repeats them:

* :func:`run_command` calls a subcommand's body and maps what escapes it to the same exit
  codes everywhere (:mod:`sae_steer_vllm.errors`): a :class:`SaeSteerError` prints its
  message and exits with its ``exit_code``; a pydantic ``ValidationError`` is a usage error
  (2); Ctrl-C is 130. Never a traceback for a user error.
* :func:`add_model_options` / :func:`model_from_args` derive an argparse parser from a
  pydantic config model (as sparsify derives its CLI from dataclasses): a field
  ``max_tokens: int = 1024`` with a docstring becomes ``--max-tokens`` whose ``--help`` is
  that docstring. Options are defined once, in the model; validation happens in the model.

Imports nothing heavy: ``sae-steer eval --help`` must answer without torch or vLLM.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, SaeSteerError

M = TypeVar("M", bound=BaseModel)


class CommandConfig(BaseModel):
    """Base of subcommand config models: attribute docstrings are the ``--help`` texts."""

    model_config = ConfigDict(use_attribute_docstrings=True, extra="forbid", frozen=True)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _scalar_type(tp: Any) -> Callable[[str], Any] | None:
    if tp in (int, float, str, Path):
        return typing.cast(Callable[[str], Any], tp)
    return None


def add_model_options(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    positional: Iterable[str] = (),
    group: str | None = None,
) -> None:
    """Add one option per field of ``model`` (``--field-name``), typed, with its docstring.

    Field types understood: ``bool`` (``--x`` when the default is False, ``--no-x`` when it
    is True), ``int``/``float``/``str``/``Path`` and their ``| None``, ``Literal[...]``
    (choices) and ``list``/``tuple`` of those (space-separated values). Other fields must be
    excluded and filled by the caller. Defaults are not set on the parser: an option the
    user did not give is absent from the namespace, and the model's default applies.
    Extra argparse keywords (``metavar``, short flags as ``aliases``) come from the field's
    ``json_schema_extra={"cli": {...}}``.
    """
    target: Any = parser.add_argument_group(group) if group else parser
    skip = set(exclude)
    pos = set(positional)
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        schema_extra: Any = (
            field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        )
        extra: dict[str, Any] = dict(schema_extra.get("cli", {}))
        aliases = list(extra.pop("aliases", []))
        help_text = " ".join((field.description or "").split())
        default = field.get_default(call_default_factory=True)
        if (
            not field.is_required()
            and default not in (None, [], ())
            and field.annotation is not bool
        ):
            shown = (
                default if not isinstance(default, (list, tuple)) else " ".join(map(str, default))
            )
            help_text += f" (default: {shown})"
        kw: dict[str, Any] = {"help": help_text or None, "dest": name}
        tp, _ = _unwrap_optional(field.annotation)
        origin = get_origin(tp)
        if tp is bool:
            if field.default is True:
                target.add_argument(
                    _flag("no_" + name),
                    *aliases,
                    action="store_false",
                    default=argparse.SUPPRESS,
                    **kw,
                )
            else:
                target.add_argument(
                    _flag(name), *aliases, action="store_true", default=argparse.SUPPRESS, **kw
                )
            continue
        if origin is Literal:
            kw["choices"] = list(get_args(tp))
            kw["type"] = type(kw["choices"][0])
        elif origin in (list, tuple):
            args = [a for a in get_args(tp) if a is not Ellipsis]
            inner = _scalar_type(args[0]) if args else str
            if inner is None:
                raise TypeError(f"{model.__name__}.{name}: no CLI type for {tp!r}")
            kw["type"] = inner
            kw["nargs"] = "+"
        else:
            scalar = _scalar_type(tp)
            if scalar is None:
                raise TypeError(f"{model.__name__}.{name}: no CLI type for {tp!r}; exclude it")
            kw["type"] = scalar
        kw.update(extra)
        if name in pos:
            kw.pop("dest")
            if not field.is_required():
                kw["nargs"] = "?"
            target.add_argument(name, default=argparse.SUPPRESS, **kw)
        else:
            target.add_argument(
                _flag(name), *aliases, default=argparse.SUPPRESS, required=field.is_required(), **kw
            )


def model_from_args(model: type[M], args: argparse.Namespace, **overrides: Any) -> M:
    """Build ``model`` from the options the user gave (plus ``overrides``); defaults otherwise.

    Raises pydantic's ``ValidationError`` for bad values, which :func:`run_command` turns
    into a usage error naming the option.
    """
    given = {k: v for k, v in vars(args).items() if k in model.model_fields}
    given.update(overrides)
    return model.model_validate(given)


def validation_message(err: ValidationError) -> str:
    """One line per bad field, named as the option the user typed."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        where = _flag(loc) if loc and "." not in loc else (loc or "input")
        lines.append(f"{where}: {e['msg']}")
    return "; ".join(lines)


def run_command(prog: str, body: Callable[[], int]) -> int:
    """Run a subcommand body and map its failures to exit codes (see module docstring)."""
    try:
        return body()
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ValidationError as e:
        print(f"{prog}: error: {validation_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except SaeSteerError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # a path the user gave cannot be read or written
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_FAILED


def run_model_command(
    prog: str,
    model: type[M],
    run: Callable[[M], int],
    argv: list[str],
    **parser_kw: Any,
) -> int:
    """The whole ``main`` of a subcommand whose options are exactly ``model``'s fields.

    Parses ``argv`` (``--help`` shows the model's docstring and field docstrings), builds
    the model (a bad value is a usage error) and runs ``run(config)`` under
    :func:`run_command`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=model.__doc__, **parser_kw)
    add_model_options(parser, model)
    args = parser.parse_args(argv)
    return run_command(prog, lambda: run(model_from_args(model, args)))
