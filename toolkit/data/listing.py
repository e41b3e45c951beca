"""Listing image folders and split files, and what in them cannot be used (bad files).

An image folder is <split>/<class>/<image>; a split file has lines `relative/path label`.
Listing reads no pixels: it finds the image files and their labels, and reports as bad files
what is wrong before decoding (a README.txt in a class folder, a line without a label, a label
out of range). Decoding failures are added later (toolkit.data.decode), reported alike.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from toolkit.data.specs import DatasetSpec
from toolkit.errors import ToolkitError

# What an image file is named; anything else in a class folder is a bad file.
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"}


@dataclass(frozen=True, order=True)
class BadFile:
    """A file, or a split-file line, that cannot be used; sorts by file, then line."""

    file: str
    line: int  # 1-based line of a split file; 0 for a file of an image folder
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.why}" if self.line else f"{self.file}: {self.why}"


@dataclass
class Listed:
    """One split, listed but not decoded: its image files and what listing found wrong."""

    paths: list[Path]
    labels: np.ndarray
    bad: list[BadFile]
    split_file: Path | None = None  # set for split files: failures are reported by its lines
    lines: tuple[int, ...] = ()
    written: tuple[str, ...] = ()  # each path as the split file spells it

    def failure(self, i: int, why: str) -> BadFile:
        """How a decoding failure of paths[i] is reported."""
        if self.split_file is None:
            return BadFile(str(self.paths[i]), 0, why)
        return BadFile(str(self.split_file), self.lines[i], f"{self.written[i]}: {why}")


# What a class folder may hold besides images, never read and never reported: hidden entries
# (.DS_Store, macOS '._name' resource forks, .gitkeep, .ipynb_checkpoints/) and the files
# Windows and macOS drop into any folder they show. Every other entry is an image by its
# suffix (IMAGE_SUFFIXES; decoded, and reported if that fails) or a bad file: a README.txt, a
# .heic photo or a sub-folder inside a class folder is a mistake worth hearing about, not
# something to leave out silently. Files directly in train/ (beside the class folders) are
# not read.
SYSTEM_FILES = {"thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"}


def _is_system_file(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def class_folders(split_dir: Path) -> list[str]:
    """The class folders of one split, sorted by name (hidden and system folders left out)."""
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not _is_system_file(p.name))


def _list_class_folder(folder: Path) -> tuple[list[Path], list[BadFile]]:
    """Image files of one class folder (sorted by name) and its entries that are not images."""
    images, bad = [], []
    # scandir knows which entries are folders without a stat per file (60,000 for CIFAR-10).
    with os.scandir(folder) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            path = folder / entry.name
            if _is_system_file(entry.name):
                continue
            if path.suffix.lower() in IMAGE_SUFFIXES:
                images.append(path)
            elif entry.is_dir():
                bad.append(BadFile(str(path), 0, "a folder inside a class folder (not read)"))
            else:
                kind = f"'{path.suffix}'" if path.suffix else "no suffix"
                bad.append(BadFile(str(path), 0, f"not an image file ({kind})"))
    return images, bad


def scan_image_folder(split_dir: Path, spec: DatasetSpec) -> Listed:
    """<split_dir>/<class>/<image>: every class folder must be one of the spec's classes (a
    val/ or test/ may lack some; train/'s folders are what named them)."""
    present = class_folders(split_dir)
    unknown = sorted(set(present) - set(spec.classes))
    if unknown:
        raise ToolkitError(
            f"'{split_dir}' has class folders that train/ has not: {', '.join(unknown)}; "
            f"the classes are {', '.join(spec.classes)}"
        )
    paths, labels, bad = [], [], []
    for label, name in enumerate(spec.classes):
        if name in present:
            images, others = _list_class_folder(split_dir / name)
            paths += images
            labels += [label] * len(images)
            bad += others
    if not paths:
        raise ToolkitError(f"no images found under '{split_dir}'")
    return Listed(paths, np.asarray(labels, dtype=np.int64), bad)


def read_class_names(path: Path) -> list[str]:
    """classes.txt: one class name per line, in label order; blank lines and '#' comments
    are skipped."""
    lines = (line.strip() for line in _read_text_lines(path))
    return [line for line in lines if line and not line.startswith("#")]


@dataclass
class _SplitFile:
    """A parsed split file: its usable lines, and the lines that are not."""

    path: Path
    written: list[str]  # image paths as written, relative to the file's folder
    labels: list[int]  # as written: 0..K-1 or 1..K
    lines: list[int]
    bad: list[BadFile]


LABEL = re.compile(r"[+-]?[0-9]+")  # int() alone would also take '1_0' and non-ASCII digits


def _parse_line(text: str) -> tuple[str, int]:
    """'relative/path label' -> (path, label); a ValueError says what is wrong."""
    parts = text.rsplit(maxsplit=1)
    if len(parts) != 2:
        raise ValueError(f"expected 'relative/path label', got '{text}'")
    if not LABEL.fullmatch(parts[1]):
        raise ValueError(f"label '{parts[1]}' is not an integer (line '{text}')")
    return parts[0], int(parts[1])


def _read_text_lines(path: Path) -> list[str]:
    try:
        # utf-8-sig: a byte-order mark (Windows editors) is not part of the first path.
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as exc:
        raise ToolkitError(
            f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from exc


def parse_split_file(path: Path) -> _SplitFile:
    """Lines 'relative/path label'. Blank lines, '#' comments, CRLF endings and surrounding
    whitespace are fine; a line that cannot be parsed is a bad file, reported by line."""
    parsed = _SplitFile(path, [], [], [], [])
    for number, text in enumerate(_read_text_lines(path), start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        try:
            written, label = _parse_line(text)
        except ValueError as exc:
            parsed.bad.append(BadFile(str(path), number, str(exc)))
            continue
        parsed.written.append(written)
        parsed.labels.append(label)
        parsed.lines.append(number)
    if not parsed.written and not parsed.bad:
        raise ToolkitError(f"'{path}' lists no images")
    return parsed


def label_base(files: dict[str, _SplitFile], num_classes: int) -> int:
    """Labels 1..K (the STL-10 reference) or 0..K-1, decided once over all split files:
    no label 0 anywhere means 1-based. Files holding both 0 and K are wrong somewhere we cannot
    tell, so that is an error whatever --bad-files says."""
    first = {}  # label -> 'file:line' where it first appears
    for f in files.values():
        for label, line in zip(f.labels, f.lines, strict=True):
            first.setdefault(label, f"{f.path}:{line}")
    if 0 in first and num_classes in first:
        raise ToolkitError(
            f"the split files use both label 0 ({first[0]}) and label {num_classes} "
            f"({first[num_classes]}); labels must be all 1..{num_classes} or all "
            f"0..{num_classes - 1}"
        )
    return 0 if 0 in first else 1  # a negative label is out of range either way


def split_listing(f: _SplitFile, base: int, num_classes: int) -> Listed:
    """Shift labels to 0..K-1; an out-of-range label makes its line a bad file."""
    keep, bad = [], list(f.bad)
    for i, label in enumerate(f.labels):
        if 0 <= label - base < num_classes:
            keep.append(i)
        else:
            allowed = f"{base}..{num_classes - 1 + base}"
            bad.append(BadFile(str(f.path), f.lines[i], f"label {label} is outside {allowed}"))
    return Listed(
        paths=[f.path.parent / f.written[i] for i in keep],
        labels=np.asarray([f.labels[i] - base for i in keep], dtype=np.int64),
        bad=bad,
        split_file=f.path,
        lines=tuple(f.lines[i] for i in keep),
        written=tuple(f.written[i] for i in keep),
    )
