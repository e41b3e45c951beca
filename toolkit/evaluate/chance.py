"""Did the model learn anything? A run at chance must say so, not end with a normal summary.

Two signs, either enough: the accuracy is not significantly better than always answering
the most common class (within 1.645 standard errors of that baseline: a one-sided test at
5 %), or one class is predicted for nearly every image while the labels are spread over
several. `toolkit train` checks val at the end,
`toolkit evaluate` checks test; both print the verdict with its likely causes.
"""

from __future__ import annotations

import math

import torch

ONE_CLASS_SHARE = 0.95  # one class predicted for this share of the images: collapsed
ONE_SIDED_95 = 1.645  # standard errors above chance before an accuracy counts as learned
# Fewer images than this cannot tell an accuracy from chance (4 images: ± 50 points); only
# the one-class sign is judged on them.
MIN_IMAGES = 30
LIKELY_CAUSES = (
    "likely causes: too few optimiser steps (a large --batch-size on a small folder), an "
    "--lr too high or too low for this model, a model and recipe made for 32-px images at "
    "another --image-size; try more --epochs, a smaller --batch-size, or a pretrained timm "
    "model (--pretrained)"
)


def learned_nothing(predicted: torch.Tensor, labels: torch.Tensor, classes) -> str | None:
    """Why these predictions are at chance, in one sentence; None when they are not."""
    n = len(labels)
    if n == 0:
        return None
    counts = labels.bincount(minlength=len(classes))
    baseline = counts.max().item() / n
    if baseline >= ONE_CLASS_SHARE:  # nearly one class in the labels: nothing to judge
        return None
    answers = predicted.bincount(minlength=len(classes))
    top = int(answers.argmax())
    if answers[top].item() / n >= ONE_CLASS_SHARE:
        return (
            f"it answers '{classes[top]}' for {answers[top].item() / n:.0%} of the {n} images; "
            + LIKELY_CAUSES
        )
    accuracy = (predicted == labels).float().mean().item()
    margin = ONE_SIDED_95 * math.sqrt(baseline * (1 - baseline) / n)
    if n >= MIN_IMAGES and accuracy <= baseline + margin:
        return (
            f"its accuracy {accuracy:.1%} on {n} images cannot be told from always answering "
            f"'{classes[int(counts.argmax())]}' ({baseline:.1%}, ± {margin:.1%}); " + LIKELY_CAUSES
        )
    return None
