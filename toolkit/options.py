"""Options declared once: a config field carries its flag's help, and the rest is derived.

    @dataclass(frozen=True)
    class DataOptions:
        image_size: int | None = option(None, "Train at this size.")

The field is the declaration: its name gives the flag (`--image-size`), its type and default
the flag's, `help` its text. The CLI builds its parameters from the declared fields
(toolkit.cli), and `toolkit reproduce` writes a config back as the `toolkit train` command
line that rebuilds it (`as_flags`), so no list of options is kept anywhere else.

A field declared with `recipe_option` has no default of its own: the training recipe sets
it (toolkit.train.recipes) and its flag, when given, overrides the recipe's value.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Flag:
    """How one config field appears on the command line."""

    help: str
    path: bool = False  # a file or folder: typed relative, stored absolute
    recipe: bool = False  # set by the recipe unless the flag is given


def option(default: Any, help: str, *, path: bool = False) -> Any:
    """A config field with a default and a command-line flag."""
    return dataclasses.field(default=default, metadata={"flag": Flag(help, path=path)})


def recipe_option(help: str) -> Any:
    """A config field the recipe fills in; its flag overrides the recipe."""
    return dataclasses.field(metadata={"flag": Flag(help, recipe=True)})


@dataclass(frozen=True)
class Declared:
    """A declared option: its field name, value type, default and flag."""

    name: str
    type: type
    default: Any
    flag: Flag

    @property
    def spelling(self) -> str:
        """The flag as typed: --image-size."""
        return "--" + self.name.replace("_", "-")


def declared(cls: type) -> list[Declared]:
    """The declared options of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if "flag" in f.metadata:
            default = None if f.default is dataclasses.MISSING else f.default
            out.append(Declared(f.name, _value_type(hints[f.name]), default, f.metadata["flag"]))
    return out


def given_values(options: list[Declared], values: dict) -> dict:
    """The values of `options` that `values` holds; paths made absolute, so a run started
    from one folder works from any other."""
    out = {}
    for opt in options:
        if opt.name in values:
            value = values[opt.name]
            out[opt.name] = str(Path(value).resolve()) if opt.flag.path and value else value
    return out


def _value_type(hint: Any) -> type:
    """`int | None` -> int: the type a flag's value has when it is given."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def as_flags(options: list[Declared], values: dict, baseline: dict) -> list[str]:
    """The flags that turn `baseline` into `values`: one per declared option that differs."""
    out: list[str] = []
    for opt in options:
        value = values[opt.name]
        if value == baseline.get(opt.name, opt.default):
            continue
        if opt.type is bool:
            out.append(opt.spelling if value else "--no-" + opt.spelling[2:])
        elif value is not None:
            out += [opt.spelling, str(value)]
    return out
