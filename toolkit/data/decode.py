"""Decoding image files into uint8 arrays, and what to do with the files that do not decode.

Every image goes through serving.preprocess.prepare (EXIF orientation, any mode to RGB,
centre-crop, the run's `Resize`): the same code that prepares an upload for a served model.
A file that cannot be decoded (missing, empty, not an image, truncated, damaged) raises
`UnreadableImage`, which names the file and says why in a few words (`reason`), so a whole
split is decoded in one pass and every bad file is listed at once (`decode_listed`); the
`--bad-files` policy then stops or skips them (`apply_bad_file_policy`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from serving.preprocess import Resize, prepare
from toolkit.data.listing import Listed
from toolkit.data.mapped import MappedImages
from toolkit.errors import ToolkitError, first_line
from toolkit.progress import progress_bar

log = logging.getLogger(__name__)

BAD_FILES_SHOWN = 5  # bad files named in an error or warning; all of them are counted
DECODE_CHUNK = 512  # files handed to the thread pool at a time (progress granularity)


class UnreadableImage(ToolkitError):
    """An image file that cannot be decoded; `reason` says why without repeating the path."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot read image '{path}': {reason}")
        self.path, self.reason = path, reason


def load_image(path: Path, resize: Resize | int | tuple[int, int]) -> np.ndarray:
    """Read a file -> H×W×3 uint8; any decoding problem is an UnreadableImage naming the file."""
    try:
        with Image.open(path) as image:
            image.seek(0)  # first frame of an animation
            return prepare(image, resize)
    except Exception as exc:
        # Pillow's format plugins raise many types on malformed input (OSError and its
        # UnidentifiedImageError, SyntaxError, ValueError, EOFError, struct.error, ...): a data
        # file is input, never code, so whatever decoding it raises is that file's fault.
        raise UnreadableImage(path, failure_reason(path, exc)) from exc


def failure_reason(path: Path, exc: BaseException) -> str:
    """A few words on why `path` did not decode, for a list of bad files."""
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "a folder, not an image file"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        # Pillow says the same for an empty file and for text renamed .png; the user's fix differs.
        if _size(path) == 0:
            return "empty file (0 bytes)"
        return "not an image (no format Pillow reads; a renamed or non-image file?)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"too many pixels ({first_line(exc)})"
    text = first_line(exc)
    if "truncated" in text.lower():
        return f"truncated image ({text})"
    return f"damaged image ({type(exc).__name__}: {text})"


def _size(path: Path) -> int | None:
    try:
        return Path(path).stat().st_size
    except OSError:
        return None


def resize_array(images: np.ndarray, resize: Resize) -> np.ndarray:
    """N×C×H×W uint8 -> N×C×height×width with the same PIL rules as image files."""
    if tuple(images.shape[-2:]) == resize.size and resize.crop_fraction == 1.0:
        return images
    out = np.empty((len(images), images.shape[1], *resize.size), dtype=np.uint8)
    for i, chw in enumerate(images):
        out[i] = prepare(Image.fromarray(chw.transpose(1, 2, 0)), resize).transpose(2, 0, 1)
    return out


# --- a whole split at once ------------------------------------------------------------------


def _decode_one(path: Path, resize: Resize) -> tuple[np.ndarray | None, str | None]:
    try:
        return load_image(path, resize), None
    except UnreadableImage as exc:
        return None, exc.reason


# Where a split's decoded images go: (split, count, (height, width)) -> a count×3×height×width
# uint8 array, in memory or memory-mapped on disk (toolkit.data.mapped).
Allocate = Callable[[str, int, tuple[int, int]], np.ndarray]


def in_memory(split: str, count: int, size: tuple[int, int]) -> np.ndarray:
    return np.empty((count, 3, *size), dtype=np.uint8)


def decode_files(
    paths: list[Path], resize: Resize, what: str, out: np.ndarray | None = None
) -> tuple[np.ndarray, dict[int, str]]:
    """Decode many files in parallel threads (PIL releases the GIL while decoding) into `out`
    (default: a new array).

    Returns the images that decoded, in order, and {index: why} for the files that did not:
    one pass finds every bad file.
    """
    out = in_memory("", len(paths), resize.size) if out is None else out
    kept = 0  # images are written in order, bad files leave no gap
    failures: dict[int, str] = {}
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        progress_bar(len(paths), f"decoding {what}") as bar,
    ):
        for start in range(0, len(paths), DECODE_CHUNK):
            block = paths[start : start + DECODE_CHUNK]
            for i, (array, why) in enumerate(pool.map(lambda p: _decode_one(p, resize), block)):
                if why is None:
                    out[kept] = array.transpose(2, 0, 1)
                    kept += 1
                else:
                    failures[start + i] = why
            bar.advance(len(block))
    return out[:kept], failures


def decode_listed(
    listed: dict[str, Listed], resize: Resize, root: Path, allocate: Allocate = in_memory
) -> dict:
    """Decode every split; the result also holds every bad file found, as 'where: why', and
    each decoded image's file relative to `root` (`paths`: what an audit reports)."""
    out, bad, paths = {}, [], {}
    for split, entry in listed.items():
        target = allocate(split, len(entry.paths), resize.size)
        images, failures = decode_files(entry.paths, resize, f"{split} images", target)
        labels = np.delete(entry.labels, list(failures))
        paths[split] = [
            relative_name(p, root) for i, p in enumerate(entry.paths) if i not in failures
        ]
        bad += entry.bad + [entry.failure(i, why) for i, why in failures.items()]
        if not len(labels):
            raise ToolkitError(
                f"no usable images left in the {split} split; {_bad_summary(sorted(bad))}"
            )
        out[split] = as_tensors(images, labels)
    out["bad_files"] = [str(b) for b in sorted(bad)]
    out["paths"] = paths
    return out


def relative_name(path: Path, root: Path) -> str:
    """How a file is named in reports: relative to the source's folder, '/'-separated (a split
    file may list a file outside its folder: then its absolute path)."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).as_posix()


def _bad_summary(bad: list) -> str:
    """'N bad files: first; second; ...; and M more' — the count and the first few."""
    shown = "; ".join(str(b) for b in bad[:BAD_FILES_SHOWN])
    more = f"; and {len(bad) - BAD_FILES_SHOWN} more" if len(bad) > BAD_FILES_SHOWN else ""
    return f"{len(bad)} bad file{'' if len(bad) == 1 else 's'}: {shown}{more}"


def apply_bad_file_policy(bad: list[str], policy: str) -> None:
    """'fail' stops on any bad file; 'skip' has already left them out and says so."""
    if not bad:
        return
    if policy == "fail":
        raise ToolkitError(
            f"{_bad_summary(bad)}. Fix or remove them, or pass --bad-files skip to leave them out"
        )
    log.warning("--bad-files skip: left out %s", _bad_summary(bad))


def as_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) as tensors; images decoded into a memory-mapped file stay there."""
    if isinstance(images, np.memmap):
        images.flush()
        return MappedImages(Path(images.filename), len(images)), torch.from_numpy(labels)
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)
