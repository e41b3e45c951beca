"""Holding out val and test from train when the source has no such split: stratified, seeded.

Test is carved first, with a fixed seed (TEST_SEED), so every --seed of a dataset is tested on
the same images; val is then carved from what is left with the run's own seed. A class too
small to give every carved split an image is one clear error naming it, never a split that
silently lacks a class.
"""

from __future__ import annotations

import torch

from toolkit.errors import ToolkitError

TEST_SEED = 0  # the test carve does not follow --seed: seeds are compared on one test set


def carve(labels: torch.Tensor, fraction: float, seed: int, what: str = "val"):
    """Stratified, seeded split of `labels`' indices into (kept, held out): `fraction` of
    every class (at least one image, never all of them) is held out. A val fraction of 0
    holds out nothing: a fixed-length recipe trains on all of train and keeps its final
    weights (toolkit.train.setup.selection records that no epoch was selected)."""
    if fraction == 0.0 and what == "val":
        everything = torch.arange(len(labels))
        return everything, everything[:0]
    if not 0.0 < fraction < 1.0:
        raise ToolkitError(f"--{what}-fraction must be between 0 and 1, got {fraction}")
    generator = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_held = int(round(len(idx) * fraction))
        if len(idx) > 1:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.cat(kept).sort().values, torch.cat(held).sort().values


def carve_val(labels: torch.Tensor, fraction: float, seed: int):
    """(train, val) indices: the val carve."""
    return carve(labels, fraction, seed, "val")


def check_enough_per_class(labels: torch.Tensor, spec, carved: list[str]) -> None:
    """Each class of train must keep an image for training and give one to each carve.

    An official dataset's class may be absent altogether (split files of a subset of
    CIFAR-10); a class of a folder's own is there because it has a folder, and needs images.
    """
    if not carved:
        return
    need = 1 + len(carved)
    counts = labels.bincount(minlength=spec.num_classes).tolist()
    short = [
        (name, n)
        for name, n in zip(spec.classes, counts, strict=True)
        if n < need and (n or not spec.official)
    ]
    if short:
        listed = ", ".join(f"'{name}' has {n}" for name, n in short)
        folders = " and ".join(f"{s}/" for s in carved)
        raise ToolkitError(
            f"too few training images to carve {' and '.join(carved)} from: {listed} "
            f"(each class needs at least {need}); add images to those classes, or provide "
            f"{folders} folders (or .txt split files)"
        )
