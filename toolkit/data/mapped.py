"""Decoded images that stay on disk: a memory-mapped uint8 array, gathered a batch at a time.

A dataset whose decoded pixels would take more than the memory budget (`--memory-gb`,
default half of this machine's RAM) is decoded straight into a .npy file beside the cache
and memory-mapped, so a set larger than RAM trains at disk speed instead of failing. Training
and evaluation only ever index images (a batch of indices, a slice, one image), so
`MappedImages` offers exactly that, and the same batches come out as from an in-memory tensor.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

DEFAULT_MEMORY_SHARE = 0.5  # of physical RAM, when --memory-gb is not given


def memory_budget_bytes(memory_gb: float | None) -> int:
    if memory_gb is not None:
        return int(memory_gb * 2**30)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX: assume a modest 8 GiB
        ram = 8 * 2**30
    return int(ram * DEFAULT_MEMORY_SHARE)


def decoded_bytes(count: int, size: tuple[int, int], channels: int = 3) -> int:
    return count * channels * size[0] * size[1]


class MappedImages:
    """N×C×H×W uint8 images in a memory-mapped .npy file, possibly a subset (`index`).

    Indexing reads only the rows asked for and returns an ordinary tensor; `to()` keeps the
    images where they are (each batch moves to the device after it is gathered).
    """

    def __init__(self, path: Path, rows: int, index: np.ndarray | None = None):
        self.path, self.rows = Path(path), rows
        # Copy-on-write: torch wants a writable array; nothing is ever written back.
        self._array = np.load(self.path, mmap_mode="c")[:rows]
        self._index = index

    @property
    def shape(self) -> torch.Size:
        n = self.rows if self._index is None else len(self._index)
        return torch.Size((n, *self._array.shape[1:]))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    def to(self, *args, **kwargs) -> MappedImages:
        return self

    def rows_of(self, key) -> np.ndarray | slice | int:
        """The file rows that `key` (a tensor or array of indices, a slice, an int) picks."""
        if isinstance(key, torch.Tensor):
            key = key.cpu().numpy()
        if self._index is None:
            return key
        return self._index[key]

    def __getitem__(self, key) -> torch.Tensor:
        if isinstance(key, torch.Tensor) and key.dtype == torch.bool:
            key = torch.nonzero(key).flatten()
        picked = self._array[self.rows_of(key)]
        return torch.from_numpy(np.array(picked, copy=True))

    def subset(self, indices: torch.Tensor) -> MappedImages:
        """The images at `indices`, still on disk (a carved split)."""
        rows = np.asarray(self.rows_of(indices), dtype=np.int64).reshape(-1)
        return MappedImages(self.path, self.rows, rows)


def take(images, indices: torch.Tensor):
    """images[indices]: a copy for a tensor, a view on disk for MappedImages."""
    return images.subset(indices) if isinstance(images, MappedImages) else images[indices]


def chunks(images, rows: int = 4096):
    """The images as numpy blocks, so whole-set statistics never hold a float copy of it."""
    for start in range(0, len(images), rows):
        block = images[start : start + rows]
        yield block.numpy() if isinstance(block, torch.Tensor) else block
