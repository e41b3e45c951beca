"""What the pixels alone tell: exact duplicates, blank or near-constant images, extreme
aspect ratios, tiny images, and files that do not decode.

Every image file is decoded once more at its own resolution (the model sees a resized copy,
where two different pictures could coincide): an exact duplicate is the same decoded RGB
pixels at the same size under another name, so a re-encoded JPEG of a picture is not one (the
near-duplicate search finds those) while a PNG copied under two names is. The official
CIFAR-10/STL-10 files hold arrays, not files: their decoded rows are hashed.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from toolkit.progress import progress_bar

# odd_image rules, each a plain fact about the picture (score: how far past the rule).
BLANK_STD = 4.0  # grey-level standard deviation (0..255) at or below which an image is blank
EXTREME_ASPECT = 4.0  # long side / short side at or above which a picture is a strip
TINY_SIDE = 16  # a short side (px) below this holds too little to classify

CHUNK = 512  # files handed to the thread pool at a time (progress granularity)


@dataclass(frozen=True)
class Pixels:
    """One image's facts: its pixel hash, size and grey-level spread (None: unreadable)."""

    digest: str | None
    width: int = 0
    height: int = 0
    grey_std: float = 0.0


def scan_file(path: Path) -> Pixels:
    """Decode `path` at full resolution (EXIF-rotated, RGB) and describe it."""
    try:
        with Image.open(path) as image:
            image.seek(0)
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            return describe(np.asarray(rgb))
    except Exception:  # any decoding failure: the data loader has already said why
        return Pixels(None)


def describe(hwc: np.ndarray) -> Pixels:
    """The facts of an H×W×3 uint8 array."""
    height, width = hwc.shape[:2]
    digest = hashlib.sha1(f"{height}x{width}|".encode())
    digest.update(np.ascontiguousarray(hwc).tobytes())
    grey = hwc.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return Pixels(digest.hexdigest(), width, height, float(grey.std()))


def scan_files(paths: list[Path], what: str = "files") -> list[Pixels]:
    """`scan_file` for many files in threads (PIL releases the GIL while decoding)."""
    out: list[Pixels] = []
    with (
        ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool,
        progress_bar(len(paths), f"scanning {what}") as bar,
    ):
        for start in range(0, len(paths), CHUNK):
            block = paths[start : start + CHUNK]
            out += pool.map(scan_file, block)
            bar.advance(len(block))
    return out


def scan_arrays(images, what: str = "images") -> list[Pixels]:
    """`describe` for N×C×H×W uint8 images (the official files' decoded rows)."""
    out: list[Pixels] = []
    with progress_bar(len(images), f"scanning {what}") as bar:
        for start in range(0, len(images), CHUNK):
            block = np.asarray(images[start : start + CHUNK])
            out += [describe(chw.transpose(1, 2, 0)) for chw in block]
            bar.advance(len(block))
    return out


def odd_reasons(pixels: Pixels) -> list[tuple[str, float]]:
    """(why, score) for each odd_image rule the image breaks; score 1 at the rule's edge,
    higher the further past it."""
    reasons = []
    if pixels.grey_std <= BLANK_STD:
        reasons.append(
            (
                f"blank or near-constant (grey std {pixels.grey_std:.1f})",
                1 + BLANK_STD - pixels.grey_std,
            )
        )
    short, long = sorted((pixels.width, pixels.height))
    if short and long / short >= EXTREME_ASPECT:
        reasons.append(
            (f"extreme aspect ratio {long / short:.1f}:1", long / short / EXTREME_ASPECT)
        )
    if short < TINY_SIDE:
        reasons.append((f"tiny ({pixels.width}x{pixels.height} px)", TINY_SIDE / max(short, 1)))
    return reasons


def exact_groups(digests: list[str | None]) -> list[list[int]]:
    """Indices sharing a pixel hash, each group in index order (groups of two or more)."""
    groups: dict[str, list[int]] = {}
    for i, digest in enumerate(digests):
        if digest is not None:
            groups.setdefault(digest, []).append(i)
    return [members for members in groups.values() if len(members) > 1]
