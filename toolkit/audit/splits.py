"""`--write-splits DIR`: the toolkit's split files without what the audit flagged.

train.txt, val.txt (when the source has a val split), test.txt and classes.txt, lines
'path label' that `toolkit train --splits DIR` reads: every image of the source except the
flagged ones (the dropped copy of each duplicate pair, so a test image that repeats a
training image leaves test, and the training image stays). Paths are written relative to
DIR, so the folder moves with the data; the user's files are never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

from toolkit.atomic import atomic_write_text
from toolkit.audit.findings import Finding
from toolkit.audit.rows import SPLITS, Rows
from toolkit.errors import ToolkitError


def write_clean_splits(rows: Rows, findings: list[Finding], out: Path) -> dict:
    """Write the split files into `out`; returns {split: images written}."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ToolkitError(f"cannot create --write-splits folder '{out}': {exc.strerror}") from exc
    root = Path(rows.bundle.source["path"])  # what the rows' paths are relative to
    dropped = {f.path for f in findings}
    written = {}
    for split in SPLITS:
        chosen = [r for r in rows.where(split) if rows.path[r] not in dropped]
        if split == "val" and not len(rows.where("val")):
            continue  # the source has none: training carves its own
        lines = [f"{_relative(root / rows.path[r], out)} {rows.label[r]}\n" for r in chosen]
        atomic_write_text(out / f"{split}.txt", "".join(lines))
        written[split] = len(chosen)
    atomic_write_text(out / "classes.txt", "".join(f"{c}\n" for c in rows.classes))
    return written


def _relative(path: Path, folder: Path) -> str:
    """`path` as seen from `folder` (absolute on another drive); spaces are fine in split
    files, whose label is the last word of a line."""
    try:
        return Path(os.path.relpath(path.resolve(), folder.resolve())).as_posix()
    except ValueError:
        return path.resolve().as_posix()
