"""The decode-once cache: a source's decoded uint8 tensors, saved under the data root.

A cache file is keyed by the source, the image size and a cheap listing of the files (names,
sizes, modification times), so any change to the files rebuilds it; it also stores the
content fingerprint (a SHA-1 of every pixel and label, the data's identity in checkpoints)
and the training split's mean/std, so nothing anywhere pastes them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from serving.preprocess import Resize
from toolkit.atomic import atomic_torch_save
from toolkit.data.mapped import MappedImages, chunks
from toolkit.data.specs import DatasetSpec, size_label

log = logging.getLogger(__name__)

CACHE_VERSION = 3  # 3: each image's file name (`paths`)
SPLITS = ("train", "val", "test")


def cache_path(
    data_root: Path, spec: DatasetSpec, source: dict, resize: Resize, listing: str
) -> Path:
    """Where the tensors of `source` resized by `resize` with this file `listing` are cached.

    The bad-file policy is not part of the key: a cache holds the images that decoded *and*
    the list of bad files, so "fail" and "skip" read the same entry and each applies its own
    rule (and the `--bad-files skip` rerun that a failure suggests starts from the cache).
    """
    # A square size is written as one number, as before non-square sizes, and the default
    # resize adds nothing, as before pretrained preprocessing: old caches stay valid.
    label = size_label(resize.size)
    if (resize.interpolation, resize.crop_fraction) != ("bilinear", 1.0):
        label += f"-{resize.interpolation}-crop{resize.crop_fraction:g}"
    key = hashlib.sha1(f"{CACHE_VERSION}|{spec.name}|{source}|{label}|{listing}".encode())
    return data_root / "cache" / f"{spec.name}-{source['kind']}-{label}px-{key.hexdigest()[:16]}.pt"


def listing_key(files: list[Path]) -> str:
    """Cheap change detector for the cache: names, sizes, modification times.

    Bad files are part of the listing too (a missing one as 'missing'), so fixing, adding or
    removing one rebuilds the cache instead of replaying its old verdict.
    """
    digest = hashlib.sha1()
    for path in files:
        try:
            st = path.stat()
            stamp = f"{st.st_size}\0{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        digest.update(f"{path}\0{stamp}\n".encode())
    return digest.hexdigest()


def content_fingerprint(tensors: dict) -> str:
    """SHA-1 of the decoded pixels and labels of every split: the data's identity.

    Unlike file names or timestamps it survives copying or moving the data, and changes
    whenever a pixel or a label does.
    """
    digest = hashlib.sha1()
    for split in sorted(k for k in tensors if k in SPLITS):
        images, labels = tensors[split]
        digest.update(split.encode())
        for block in chunks(images):  # hashed in blocks: the same digest as all at once
            digest.update(np.ascontiguousarray(block).tobytes())
        digest.update(labels.contiguous().numpy().tobytes())
    return digest.hexdigest()


def channel_stats(images) -> tuple[list[float], list[float]]:
    """Per-channel mean and (unbiased) std of uint8 images scaled to [0, 1], accumulated in
    float64 block by block: no float copy of the whole set."""
    total = np.zeros(images.shape[1])
    squares = np.zeros(images.shape[1])
    for block in chunks(images):
        block = block.astype(np.float64) / 255
        total += block.sum(axis=(0, 2, 3))
        squares += np.square(block).sum(axis=(0, 2, 3))
    n = len(images) * images.shape[2] * images.shape[3]
    mean = total / n
    std = np.sqrt(np.maximum(squares - n * mean**2, 0) / max(n - 1, 1))
    return mean.tolist(), std.tolist()


# --- memory-mapped images (toolkit.data.mapped) stored beside the cache file -----------------


def mapped_file(cache_file: Path, split: str) -> Path:
    return cache_file.with_name(f"{cache_file.stem}.{split}.npy")


def _on_disk(tensors: dict) -> dict:
    """What torch.save writes: mapped images become a note of their .npy file and rows."""
    out = dict(tensors)
    for split in SPLITS:
        if split in out and isinstance(out[split][0], MappedImages):
            images, labels = out[split]
            out[split] = ({"npy": images.path.name, "rows": images.rows}, labels)
    return out


def _from_disk(cached: dict, cache_file: Path) -> dict:
    for split in SPLITS:
        if split in cached and isinstance(cached[split][0], dict):
            note, labels = cached[split]
            cached[split] = (MappedImages(cache_file.parent / note["npy"], note["rows"]), labels)
    return cached


def load_or_build(cache_file: Path, build: Callable[[], dict]) -> dict:
    """The cached tensors in `cache_file`, or `build()`'s, with their fingerprint and mean/std
    added and saved there for the next run."""
    if cache_file.is_file():
        try:
            cached = torch.load(cache_file, map_location="cpu", weights_only=True)
            if cached.get("cache_version") == CACHE_VERSION:
                log.info("loaded decoded tensors from cache %s", cache_file)
                return _from_disk(cached, cache_file)
        except Exception as exc:  # a damaged cache (or its .npy) is rebuilt, never trusted
            log.warning("ignoring unreadable cache %s (%s)", cache_file, exc)
    built = build()
    built["content_sha1"] = content_fingerprint(built)
    built["mean"], built["std"] = channel_stats(built["train"][0])
    built["cache_version"] = CACHE_VERSION
    try:
        # Mapped images are already in their .npy files: the cache file, written last and
        # atomically, is what makes them count.
        atomic_torch_save(cache_file, _on_disk(built))
    except OSError as exc:  # a read-only cache folder only costs time
        log.warning("could not write cache %s (%s)", cache_file, exc)
    return built
