"""Readers for the official on-disk formats: CIFAR-10 python batches and STL-10 binaries.

Our own readers (not torchvision's datasets), so that synthetic files written in these formats
are read exactly like the real ones. An official file is all or nothing: a damaged one is an
error naming it, never partly skipped. CIFAR-10 batches are pickles; they are unpickled with
an allow-list of the numpy array constructors, so a doctored batch cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from toolkit.errors import ToolkitError

# An official file is all or nothing: it cannot be partly skipped like a folder's images.
BINARY_FIX = (
    "delete the folder to download the files again (--bad-files does not apply: a binary "
    "file cannot be partly skipped)"
)
CIFAR_IMAGE_BYTES = 3 * 32 * 32


def read_cifar10_batches(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """cifar-10-batches-py: pickled dicts with b'data' (N×3072 uint8, CHW rows) and b'labels'."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    out = {}
    for split, files in names.items():
        batches = [read_cifar10_batch(folder / name) for name in files]
        out[split] = tuple(np.concatenate(parts) for parts in zip(*batches, strict=True))
    return out


def read_cifar10_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch -> (N×3×32×32 uint8, N int64 labels 0..9); a damaged file names itself."""
    batch = _unpickle(path)
    data, labels = batch.get("data", batch.get(b"data")), batch.get("labels", batch.get(b"labels"))
    if data is None or labels is None:
        raise ToolkitError(
            f"'{path}' is not a CIFAR-10 python batch (no 'data' and 'labels'); {BINARY_FIX}"
        )
    try:
        data = np.asarray(data, dtype=np.uint8)
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ToolkitError(
            f"'{path}': unreadable 'data' or 'labels' ({exc}); {BINARY_FIX}"
        ) from exc
    if data.size % CIFAR_IMAGE_BYTES:
        raise ToolkitError(
            f"'{path}' holds {data.size:,} pixel bytes, not a whole number of 3×32×32 images "
            f"({CIFAR_IMAGE_BYTES:,} bytes each); {BINARY_FIX}"
        )
    images = data.reshape(-1, 3, 32, 32)
    if len(images) != len(labels):
        raise ToolkitError(f"'{path}': {len(images)} images but {len(labels)} labels; {BINARY_FIX}")
    _check_label_range(path, labels, 0, 9)
    return images, labels


class _ArraysOnly(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays, and refuses every other global: a pickle
    can name any callable, so a doctored batch could otherwise run code when read."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),  # arrays pickled by numpy 1.x (the official
        ("numpy._core.multiarray", "_reconstruct"),  # files hold plain lists) and numpy 2.x
        ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol 2 spells bytes
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load '{module}.{name}'")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="latin1").load()
    except FileNotFoundError:
        raise  # the caller says which file of the set is missing
    except Exception as exc:  # unpickling damaged bytes raises almost anything
        why = "empty file (0 bytes)" if path.stat().st_size == 0 else f"{type(exc).__name__}: {exc}"
        raise ToolkitError(
            f"'{path}' is not a CIFAR-10 python batch ({why}); {BINARY_FIX}"
        ) from exc
    if not isinstance(batch, dict):
        raise ToolkitError(
            f"'{path}' is not a CIFAR-10 python batch (holds a {type(batch).__name__}, "
            f"not a dict); {BINARY_FIX}"
        )
    return batch


def _check_label_range(path: Path, labels: np.ndarray, low: int, high: int) -> None:
    bad = np.flatnonzero((labels < low) | (labels > high))
    if bad.size:
        i = int(bad[0])
        raise ToolkitError(
            f"'{path}': label {labels[i]} at position {i} is outside {low}..{high} "
            f"({bad.size} such labels); {BINARY_FIX}"
        )


STL10_SIDE = 96
STL10_IMAGE_BYTES = 3 * STL10_SIDE * STL10_SIDE


def read_stl10_binary(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """stl10_binary: {split}_X.bin uint8 N×3×96×96 column-major, {split}_y.bin labels 1..10."""
    out = {}
    for split in ("train", "test"):
        x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
        raw = np.fromfile(x_path, dtype=np.uint8)
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        _check_stl10_sizes(x_path, raw.size, y_path, labels.size)
        _check_label_range(y_path, labels, 1, 10)
        images = raw.reshape(-1, 3, STL10_SIDE, STL10_SIDE).transpose(0, 1, 3, 2)  # col-major
        out[split] = (np.ascontiguousarray(images), labels - 1)
    return out


def _check_stl10_sizes(x_path: Path, x_bytes: int, y_path: Path, n_labels: int) -> None:
    """One label byte per image in {split}_y.bin, 3×96×96 bytes per image in {split}_X.bin."""
    expected = n_labels * STL10_IMAGE_BYTES
    if x_bytes % STL10_IMAGE_BYTES:
        raise ToolkitError(
            f"'{x_path}' is {x_bytes:,} bytes, not a whole number of 3×96×96 images "
            f"({STL10_IMAGE_BYTES:,} bytes each); expected {expected:,} bytes for the "
            f"{n_labels:,} labels in '{y_path.name}'; {BINARY_FIX}"
        )
    if x_bytes != expected:
        raise ToolkitError(
            f"'{x_path}' holds {x_bytes // STL10_IMAGE_BYTES:,} images ({x_bytes:,} bytes) but "
            f"'{y_path}' holds {n_labels:,} labels (so expected {expected:,} bytes); {BINARY_FIX}"
        )
