"""Test seams: the named points where tests step in to inject faults, and nowhere else.

The fault tests kill a real process at an exact moment, fill the disk mid-write, poison a
batch or press Ctrl-C in a given epoch. Instead of overwriting private functions by name
(which silently stops working when one is renamed), the code calls a seam at each such point;
with no hook installed a seam does nothing. A test installs one with `installed`, or, in a
child process, by assigning `hook`: a seam that no longer exists then fails at once.

    with seams.EPOCH_START.installed(lambda epoch: ...):
        fit(config, run_dir)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any


class Seam:
    """A point in the code that calls `hook(**context)` when a hook is installed."""

    def __init__(self, name: str, context: str):
        self.name, self.context = name, context
        self.hook: Callable[..., Any] | None = None

    def __call__(self, **context: Any) -> None:
        if self.hook is not None:
            self.hook(**context)

    @contextlib.contextmanager
    def installed(self, hook: Callable[..., Any]) -> Iterator[None]:
        previous, self.hook = self.hook, hook
        try:
            yield
        finally:
            self.hook = previous

    def __repr__(self) -> str:
        return f"Seam({self.name}: {self.context})"


# toolkit.atomic: a temporary file is about to be filled through `write(file)`; a hook may
# write part of it to `fd` and raise OSError, as a disk filling up would.
FILL_TEMP = Seam("fill_temp", "fd, tmp, write")
# toolkit.atomic: a complete temporary file or folder `tmp` is about to be renamed to `path`.
BEFORE_RENAME = Seam("before_rename", "tmp, path")
# toolkit.predict: `done` of `total` files are classified (a batch has just finished).
PREDICT_BATCH = Seam("predict_batch", "done, total")
# toolkit.train.trainer: epoch `epoch` (1-based) is about to start.
EPOCH_START = Seam("epoch_start", "epoch")
# toolkit.train.engine: training step `step` (1-based within the epoch) has its normalised,
# augmented `images`; a hook may change them in place.
TRAIN_BATCH = Seam("train_batch", "step, images")
