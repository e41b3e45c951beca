"""Test-time augmentation as part of the model: logits averaged over fixed views.

Level 1 averages the image and its mirror; level 2 (airbench's) also the two 1-pixel
diagonal translations (reflect padding), each with its mirror:

    0.5 * mirror(x) + 0.25 * mirror(x shifted up-left) + 0.25 * mirror(x shifted down-right)

where mirror(v) = (f(v) + f(flip(v))) / 2. Flips and reflect padding commute with the
per-channel normalisation, so the wrapper gives the same logits around the normalised net
(evaluation) or the [0, 1] classifier (the ONNX export, toolkit export --tta): the served
model is the evaluated one. All views go through the net as one batch.

Selective TTA (--tta-below P, after hiverge's cifar10-speedrun): the plain pass first, and
the other views only for the images whose top-1 probability is below P, the ones it is
least sure of; the others keep their plain logits. Only those images go through the views,
in torch and in the exported graph (an `If` on "any image unsure", then a gather of those):
a confident upload costs one pass.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.train.recipes import TTA_LEVELS


def tta_views(images: torch.Tensor, level: int) -> tuple[torch.Tensor, list[float]]:
    """The N×C×H×W batch's views stacked on the batch axis (view-major), and each view's
    weight in the average."""
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level}")
    if level == 0:
        return images, [1.0]
    views, weights = [images], [1.0]
    if level == 2:
        views += [_shift(images, 1), _shift(images, -1)]
        weights = [0.5, 0.25, 0.25]
    views += [v.flip(3) for v in views]
    weights = [x / 2 for x in weights] * 2
    return torch.cat(views), weights


def _shift(x: torch.Tensor, by: int) -> torch.Tensor:
    """x moved 1 px down-right (by=1) or up-left (by=-1), the edge reflected: the crop of the
    1-px reflect-padded image at (0, 0) or (2, 2). Slices and concats, not a Pad: the ONNX
    converter cannot take opset 18's Pad down to 17."""
    for dim in (2, 3):
        n = x.shape[dim]
        if by > 0:
            x = torch.cat([x.narrow(dim, 1, 1), x.narrow(dim, 0, n - 1)], dim)
        else:
            x = torch.cat([x.narrow(dim, 1, n - 1), x.narrow(dim, n - 2, 1)], dim)
    return x


class TTAClassifier(nn.Module):
    """`classifier` with its logits averaged over the views of `tta_views(level)`; with
    `below` < 1, only for the images whose plain top-1 probability is below it."""

    def __init__(self, classifier: nn.Module, level: int = 2, below: float = 1.0):
        super().__init__()
        if level not in TTA_LEVELS:
            raise ValueError(f"TTA level must be one of {TTA_LEVELS}, got {level}")
        self.classifier = classifier
        self.level = level
        self.below = float(below)
        weights = tta_views(torch.zeros(1, 1, 2, 2), level)[1]
        self.register_buffer("weights", torch.tensor(weights).view(-1, 1, 1), persistent=False)

    @property
    def views(self) -> int:
        return {0: 1, 1: 2, 2: 6}[self.level]

    @property
    def selective(self) -> bool:
        return self.level > 0 and self.below < 1.0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if not self.selective:
            batch, _ = tta_views(image, self.level)
            return self._average(self.classifier(batch))
        plain = self.classifier(image)
        unsure = plain.softmax(1).amax(1) < self.below
        if torch.compiler.is_compiling():  # torch.export: an If on "any image unsure"
            return torch.cond(unsure.any(), self._views_for, self._plain, (image, plain, unsure))
        return self._views_for(image, plain, unsure) if unsure.any() else plain

    def _average(self, logits: torch.Tensor) -> torch.Tensor:
        per_view = logits.reshape(len(self.weights), -1, logits.shape[-1])
        return (per_view * self.weights.to(logits.dtype)).sum(0)

    def _with_views(self, image: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        """The views' average, reusing the plain pass for view 0."""
        others = tta_views(image, self.level)[0][len(image) :]
        return self._average(torch.cat([plain, self.classifier(others)]))

    def _views_for(self, image, plain, unsure):
        """The plain logits, those of the unsure images replaced by their views' average."""
        index = unsure.nonzero().squeeze(1)
        torch._check(index.shape[0] > 0)  # this branch runs for at least one (export's guard)
        views = self._with_views(image.index_select(0, index), plain.index_select(0, index))
        return plain.index_copy(0, index, views)

    @staticmethod
    def _plain(image, plain, unsure):
        return plain.clone()  # torch.cond's branches may not return their inputs
