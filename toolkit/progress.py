"""Progress bars for long work (decoding datasets, epochs), quiet when asked or not a terminal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def progress_enabled() -> bool:
    return os.environ.get("TOOLKIT_PROGRESS", "1") != "0"


class _Bar:
    def __init__(self, progress: Progress | None, task):
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=n, **fields)

    def update(self, **fields) -> None:
        if self._progress is not None:
            self._progress.update(self._task, **fields)


@contextmanager
def progress_bar(
    total: int,
    description: str,
    status: str = "",
    enabled: bool = True,
    console: Console | None = None,
) -> Iterator[_Bar]:
    """A rich progress bar with a free-form `status` field (loss, acc, img/s...).

    `enabled=False` (a torchrun rank other than 0) and TOOLKIT_PROGRESS=0 show nothing;
    `console` is where it draws (default rich's, on stdout; a stderr one keeps stdout for
    results, as `toolkit predict` prints them).
    """
    if not (enabled and progress_enabled()):
        yield _Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("<"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status=status)
        yield _Bar(progress, task)
