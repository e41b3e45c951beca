"""Batches straight out of one uint8 tensor: a seeded order, augmentation on the whole batch
(crop/translation with reflect padding, random or alternating flip, cutout) by tensor ops,
normalisation, channels_last; BatchNorm's ghost batches when a batch trains in chunks.

In the spirit of airbench: no DataLoader and no per-image Python work, so the same code is
fast on a CPU and needs no host sync on a GPU. Augmentation parameters are drawn for the
global batch and then sliced per rank (BatchAugment.select), so under DDP each image is
augmented exactly as in a single-process run.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data import Split

CROP_PADDING = 4


def on_device(split: Split, device: torch.device) -> Split:
    """The split's uint8 images and labels moved to `device` once, for the whole run."""
    return Split(split.images.to(device), split.labels.to(device))


def epoch_batches(
    n: int,
    batch_size: int,
    generator: torch.Generator,
    world_size: int = 1,
    weights: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """A seeded random order of range(n), cut into global batches of `batch_size`.

    With `weights` (one per image) the epoch is n draws with replacement in proportion to
    them instead: --balance sampler gives every class the same share of the batches.
    A last batch too small to give every rank two images is dropped (BatchNorm cannot train
    on one image; with one process this drops only a batch of one).
    """
    if weights is None:
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.multinomial(weights, n, replacement=True, generator=generator)
    batches = list(order.split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:
        batches.pop()
    return batches


def alternating_flips(n: int, seed: int, epoch: int) -> torch.Tensor:
    """--alt-flip: which of `n` images are flipped in `epoch` (1-based). A seeded half is
    flipped in odd epochs and the other half in even ones, so every image is seen both ways
    in any two consecutive epochs (more diverse than flipping at random)."""
    base = torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5
    return base if epoch % 2 else ~base


@dataclass(frozen=True)
class BatchAugment:
    """Per-image augmentation parameters of one batch: crop offsets, flips, cutout corners.

    Drawn for the global batch, then `select`ed per rank, so the augmentation an image gets
    does not depend on how many processes train.
    """

    dy: torch.Tensor | None = None  # crop offsets in [0, 2 * pad]
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None  # bool
    cut_y: torch.Tensor | None = None  # top-left corner of the cutout square
    cut_x: torch.Tensor | None = None
    cutout: int = 0
    pad: int = CROP_PADDING  # reflect padding of the crop: the largest translation
    # --resized-crop: per image (width, height, x centre, y centre) of the crop, as fractions
    # of the image in affine_grid's [-1, 1] coordinates
    box: torch.Tensor | None = None

    @classmethod
    def draw(
        cls,
        n: int,
        size: tuple[int, int],
        generator: torch.Generator,
        crop_flip: bool,
        cutout: int,
        translate: int = 0,
        flips: torch.Tensor | None = None,
        resized_crop: float = 0.0,
    ) -> BatchAugment:
        """`crop_flip`: crop of the 4-px padded image and a random flip; `translate` N
        crops the N-px padded image instead, `resized_crop` a random crop of at least that
        share of the area resized back; `flips` (the batch's alternating flips) replace the
        random ones."""
        h, w = size
        pad = 0 if resized_crop else translate or (CROP_PADDING if crop_flip else 0)
        values: dict = {"cutout": cutout, "pad": pad}
        if resized_crop:
            values["box"] = _resized_crop_boxes(n, resized_crop, generator)
        if pad:
            values["dy"] = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
            values["dx"] = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
        if flips is not None:
            values["flip"] = flips
        elif crop_flip:
            values["flip"] = torch.rand(n, generator=generator) < 0.5
        if cutout:
            if cutout > min(h, w):
                raise ValueError(f"cutout {cutout} is larger than the {h}x{w} images")
            values["cut_y"] = torch.randint(0, h - cutout + 1, (n,), generator=generator)
            values["cut_x"] = torch.randint(0, w - cutout + 1, (n,), generator=generator)
        return cls(**values)

    def select(self, part: slice) -> BatchAugment:
        """The parameters of the images `part` of the batch."""
        pick = {k: getattr(self, k) for k in ("dy", "dx", "flip", "cut_y", "cut_x", "box")}
        return BatchAugment(
            **{k: v[part] if v is not None else None for k, v in pick.items()},
            cutout=self.cutout,
            pad=self.pad,
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.box is not None:
            images = _resize_crops(images, self.box)
        if self.dy is not None:
            images = _crop(images, self.dy, self.dx, self.pad)
        if self.flip is not None:
            flip = self.flip.to(images.device)[:, None, None, None]
            images = torch.where(flip, images.flip(3), images)
        if self.cutout:
            images = _cutout(images, self.cut_y, self.cut_x, self.cutout)
        return images


def _crop(images: torch.Tensor, dy, dx, p: int) -> torch.Tensor:
    """Random crop with `p`-px reflect padding, per image, on a float batch.

    Two gathers (rows, then columns) instead of a Python loop over images: the same code is
    fast on the CPU and needs no host sync on a GPU.
    """
    n, c, h, w = images.shape
    device = images.device
    dy, dx = dy.to(device), dx.to(device)
    padded = F.pad(images, (p, p, p, p), mode="reflect")
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cropped = padded.gather(2, rows.expand(n, c, h, w + 2 * p))
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    return cropped.gather(3, cols.expand(n, c, h, w))


# The crop's aspect ratio (width / height) is drawn log-uniformly in this range (torchvision's
# RandomResizedCrop default).
CROP_RATIO = (3 / 4, 4 / 3)


def _resized_crop_boxes(n: int, min_area: float, generator: torch.Generator) -> torch.Tensor:
    """n random crops (width, height, x centre, y centre), each covering a share of the
    image's area drawn uniformly in [min_area, 1], its aspect in CROP_RATIO, placed
    uniformly where it fits; sides are fractions of the image's."""
    area = min_area + (1 - min_area) * torch.rand(n, generator=generator)
    low, high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    ratio = torch.exp(low + (high - low) * torch.rand(n, generator=generator))
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    # Centres in affine_grid's coordinates ([-1, 1] spans the image): the crop stays inside.
    cx = (1 - width) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1 - height) * (2 * torch.rand(n, generator=generator) - 1)
    return torch.stack([width, height, cx, cy], 1)


def _resize_crops(images: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Each image's crop resized (bilinear) back to the full size, in one grid_sample."""
    box = box.to(images.device, images.dtype)
    theta = torch.zeros(len(images), 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0], theta[:, 1, 1] = box[:, 0], box[:, 1]
    theta[:, 0, 2], theta[:, 1, 2] = box[:, 2], box[:, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", align_corners=False)


def _cutout(images: torch.Tensor, cut_y, cut_x, size: int) -> torch.Tensor:
    """Zero a size×size square per image: in normalised space 0 is the dataset's mean colour."""
    _, _, h, w = images.shape
    device = images.device
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    y0, x0 = cut_y.to(device)[:, None, None], cut_x.to(device)[:, None, None]
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return images.masked_fill(inside[:, None], 0.0)


class Normalizer:
    """uint8 batch -> normalised float batch, with mean/std kept on the device."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().div_(255) - self.mean) / self.std
        return to_channels_last(x)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    # Convolutions run ~2x faster in channels_last on the CPU (oneDNN) and on CUDA (tensor
    # cores); the nets are moved to it too, so no layout conversion happens inside them.
    return x.contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def ghost_batches(net: nn.Module, chunks: int):
    """While a batch trains in `chunks` (--micro-batch), BatchNorm normalises each chunk on its
    own (ghost batches) and updates its running statistics once per chunk, so their momentum
    is lowered to 1 - (1 - m)^(1/chunks) meanwhile: a batch's chunks together move them as far
    as one whole-batch update did."""
    norms = [
        m
        for m in net.modules()
        if chunks > 1 and isinstance(m, nn.modules.batchnorm._BatchNorm) and m.momentum is not None
    ]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 1 - (1 - m.momentum) ** (1 / chunks)
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
