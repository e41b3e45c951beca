"""The audited images as one table: every row of train, then val, then test, with its split,
file name and given label, so each check is a function of arrays indexed by row."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.data import DataBundle

SPLITS = ("train", "val", "test")


@dataclass
class Rows:
    bundle: DataBundle
    split: np.ndarray  # the split of each row ("train", "val", "test")
    path: list[str]  # relative to the data root (toolkit.data.sources.source_names)
    label: np.ndarray  # int64, the given label
    offsets: dict[str, tuple[int, int]]  # split -> [start, stop) of its rows

    @classmethod
    def of(cls, bundle: DataBundle) -> Rows:
        split, path, labels, offsets, start = [], [], [], {}, 0
        for name in SPLITS:
            part = getattr(bundle, name)
            split += [name] * len(part)
            path += list(bundle.paths.get(name) or (f"{name}/{i}" for i in range(len(part))))
            labels.append(part.labels.numpy())
            offsets[name] = (start, start + len(part))
            start += len(part)
        return cls(bundle, np.asarray(split), path, np.concatenate(labels), offsets)

    def __len__(self) -> int:
        return len(self.label)

    @property
    def classes(self) -> tuple[str, ...]:
        return self.bundle.spec.classes

    def where(self, split: str) -> np.ndarray:
        """The row indices of one split."""
        start, stop = self.offsets[split]
        return np.arange(start, stop)

    def images(self, split: str):
        """The split's uint8 N×C×H×W images (a tensor, or memory-mapped)."""
        return getattr(self.bundle, split).images

    def image(self, row: int) -> np.ndarray:
        """One row's C×H×W uint8 image."""
        split = str(self.split[row])
        return np.asarray(self.images(split)[row - self.offsets[split][0]])

    def all_images(self, rows: np.ndarray | None = None):
        """(split, local indices, images) blocks covering `rows` (default: all), in order."""
        rows = np.arange(len(self)) if rows is None else np.asarray(rows)
        for name in SPLITS:
            start, stop = self.offsets[name]
            local = rows[(rows >= start) & (rows < stop)] - start
            if len(local):
                yield name, local + start, self.images(name), torch.from_numpy(local)
