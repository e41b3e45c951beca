"""What every command prints through: the consoles, one-line errors, tables."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from toolkit.errors import ToolkitError

console = Console()
err_console = Console(stderr=True)


def refuse_options_besides(ctx: typer.Context, *allowed: str, why: str) -> None:
    """Fail when the user gave options (or arguments) that this call would ignore."""
    # By name: Typer vendors its own copy of click, whose ParameterSource is another enum.
    given = [
        param.opts[0] if param.opts[0].startswith("-") else param.name.upper()
        for param in ctx.command.params
        if param.name not in allowed
        and ctx.get_parameter_source(param.name).name not in ("DEFAULT", "DEFAULT_MAP")
    ]
    if given:
        raise ToolkitError(f"{why}; drop {', '.join(given)}")


def friendly_errors(fn):
    """Turn ToolkitError into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ToolkitError as exc:
            # escape(): a message quoting a path like 'runs/[x]' must not be read as markup.
            message = f"[red]error:[/red] {escape(str(exc))}"
            err_console.print(message, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def table(title: str, rows: list[dict], columns: list[str] | None = None) -> Table:
    columns = columns or (list(rows[0]) if rows else [])
    out = Table(title=title)
    for c in columns:
        left = c in ("model", "run", "options", "name", "description", "path")
        out.add_column(c, justify="left" if left else "right")
    for row in rows:
        out.add_row(*[fmt(row.get(c, "")) for c in columns])
    return out


def summary_table(title: str, values: dict) -> Table:
    """A two-column key/value table, readable at any terminal width."""
    out = Table(title=title, show_header=False)
    out.add_column(style="bold")
    out.add_column(overflow="fold")
    for key, value in values.items():
        out.add_row(key, fmt(value))
    return out


def fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        if abs(value) < 1:
            return f"{value:.4f}"
        return f"{value:.3f}" if abs(value) < 100 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)
