"""Typer parameters derived from the declared options (toolkit.options): `toolkit train` and
`toolkit reproduce` get a flag per field of DataOptions, TrainConfig and ModelOptions, with
its type, default and help, and no flag is listed by hand."""

from __future__ import annotations

import inspect
from pathlib import Path

import typer
from typer.core import TyperGroup

from toolkit.options import Declared
from toolkit.train.config import DEFAULT_WEIGHTS

# Flags whose value may be left out, and what they then mean (click's parser wants a value
# for every option that takes one, so a bare one is given it before parsing).
BARE_VALUES = {"--pretrained": DEFAULT_WEIGHTS}


def typer_parameter(opt: Declared) -> inspect.Parameter:
    """One declared option as a Typer parameter: its flag, type, default and help. A recipe
    option defaults to None: the recipe's value unless the flag is given."""
    negatable = f"{opt.spelling}/--no-{opt.spelling[2:]}"
    decls = [negatable] if opt.type is bool else [opt.spelling]
    by_recipe = opt.flag.recipe
    help_text = opt.flag.help + (" (default: the recipe's)" if by_recipe else "")
    option = typer.Option(
        None if by_recipe else opt.default, *decls, help=help_text, show_default=not by_recipe
    )
    return inspect.Parameter(
        opt.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=option,
        annotation=Path if opt.flag.path else opt.type,
    )


def with_declared_options(*groups: list[Declared]):
    """Give a command taking `**flags` a Typer parameter per declared option, after its own
    parameters: Typer reads the function's signature, so no flag is listed by hand."""

    def decorate(fn):
        own = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
        extra = [typer_parameter(o) for group in groups for o in group]
        fn.__signature__ = inspect.Signature([*own, *extra])
        return fn

    return decorate


def with_bare_values(args: list[str]) -> list[str]:
    """`--pretrained` last or before another flag -> `--pretrained default`."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in BARE_VALUES and (following is None or following.startswith("-")):
            out.append(BARE_VALUES[arg])
    return out


class BareValueGroup(TyperGroup):
    """The command group, reading BARE_VALUES flags without a value."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, with_bare_values(list(args)))
