"""Command-line flags made from a frozen dataclass: one flag per field, the same rules for every command.

`cnx train`, `cnx plan-memory` and `cnx pretrain-tiny` build their parsers
here, so a flag behaves the same in each:
- `--name VALUE` or `--name=VALUE`, typed by the field's annotation (`int | None`
  takes an int), with the field's choices;
- a boolean field is `--name` (true), `--no_name` (false), or `--name=true|false`,
  whatever its default;
- a bad flag raises ValueError with one line (the command prints it as
  `cnx <command>: <problem>` and exits 2), never argparse's usage dump.
Help comes from the field's metadata (`flag(default, help)`). No torch here.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import field

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def flag(default, help: str, choices: tuple | None = None):
    """A dataclass field whose flag has this help (and choices)."""
    return field(default=default, metadata={"help": help, "choices": choices})


def base_type(hint) -> tuple[type, bool]:
    """(type, optional) of a field's annotation: `int | None` gives (int, True), `str` (str, False)."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return (args[0], True) if args else (hint, False)


def parse_bool(text: str) -> bool:
    """true/false, 1/0, yes/no in any case; anything else is refused."""
    if text.lower() in TRUE:
        return True
    if text.lower() in FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


class _NoFlag(argparse.Action):
    """`--no_<name>`: the boolean field set to false."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, False)


class FlagParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        """Raise instead of printing usage and exiting, so the command can say it in one line."""
        raise ValueError(message.removeprefix("argument ").replace("\n", " "))


def build_parser(cls, prog: str, description: str, defaults: dict | None = None) -> FlagParser:
    """A parser with one flag per field of the dataclass `cls` (`defaults` replaces some defaults)."""
    parser = FlagParser(
        prog=prog,
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        allow_abbrev=False,  # a launch script's flags mean exactly what they say
    )
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    for f in dataclasses.fields(cls):
        base, _ = base_type(hints[f.name])
        default = defaults.get(f.name, f.default)
        help_ = f.metadata.get("help", "").replace("%", "%%")
        choices = f.metadata.get("choices")
        if base is bool:
            parser.add_argument(
                f"--{f.name}",
                nargs="?",
                const=True,
                default=default,
                type=parse_bool,
                metavar="true|false",
                help=help_,
            )
            parser.add_argument(f"--no_{f.name}", dest=f.name, action=_NoFlag, help=argparse.SUPPRESS)
        else:
            metavar = None if choices else base.__name__.upper()
            parser.add_argument(
                f"--{f.name}", type=base, default=default, choices=choices, metavar=metavar, help=help_
            )
    return parser


def as_argv(values, changed_only: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """Flags that give back the dataclass instance `values` when parsed (`changed_only`: differing ones).

    Floats are written with repr so they read back exactly; None is left out (its default).
    """
    argv = []
    for f in dataclasses.fields(values):
        value = getattr(values, f.name)
        if f.name in skip or value is None or (changed_only and value == f.default):
            continue
        if isinstance(value, bool):
            argv.append(f"--{f.name}" if value else f"--no_{f.name}")
        else:
            argv.append(f"--{f.name}={value!r}" if isinstance(value, float) else f"--{f.name}={value}")
    return argv
