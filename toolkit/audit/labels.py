"""Suspected label errors: confident learning (cleanlab's core) on probabilities that never
saw the image.

cleanlab estimates from the confident joint how many labels of a split are wrong, and
`filter_by="low_self_confidence"` flags that many: the images whose given label the models
believe least. On CIFAR-10 with 5 % of train flipped at random (benchmarks/audit.md, a first
run with weaker fold models) this flagged 4,037 images at precision 0.52 and recall 0.84,
where cleanlab's default `prune_by_noise_rate` flagged 6,487 at 0.32 and 0.82: the same
flips found, far fewer clean images accused. Each split is judged on its own: train with its
cross-validated probabilities, val and test with the probabilities of models that never saw
them.
The score is 1 − the self-confidence (the probability of the given label), so higher is
surer, and the suggested label is the most probable class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Fewer rows than this per class and the noise-rate estimate is not worth making.
MIN_ROWS_PER_CLASS = 5


@dataclass(frozen=True)
class LabelIssue:
    row: int
    score: float
    suggested: int


def label_issues(labels: np.ndarray, probs: np.ndarray, rows: np.ndarray) -> list[LabelIssue]:
    """The label issues among `rows` (one split), surest first."""
    if len(rows) == 0:
        return []
    given, p = labels[rows], _usable(probs[rows])
    present = np.unique(given)
    if len(present) < 2 or np.bincount(given).max(initial=0) < MIN_ROWS_PER_CLASS:
        return []
    flagged = _find(given, p)
    score = 1.0 - p[np.arange(len(given)), given]
    suggested = p.argmax(1)
    # An image flagged while its most probable class is its own label says "unsure", not
    # "wrong": leave it out (cleanlab flags it only when the classes overlap badly).
    flagged = [i for i in flagged if suggested[i] != given[i]]
    issues = [LabelIssue(int(rows[i]), float(score[i]), int(suggested[i])) for i in flagged]
    return sorted(issues, key=lambda issue: -issue.score)


def _find(given: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """cleanlab's default filter, on the classes present in this split only (a split may lack
    a class; cleanlab wants labels 0..K'-1 and a row per class)."""
    from cleanlab.filter import find_label_issues

    present = np.unique(given)
    remap = np.full(probs.shape[1], -1)
    remap[present] = np.arange(len(present))
    sub = probs[:, present]
    sub = sub / np.maximum(sub.sum(1, keepdims=True), 1e-12)
    mask = find_label_issues(remap[given], sub, filter_by="low_self_confidence")
    return np.flatnonzero(mask)


def _usable(probs: np.ndarray) -> np.ndarray:
    """Probabilities with no exact zeros (cleanlab divides by them), rows summing to 1."""
    p = np.clip(probs.astype(np.float64), 1e-7, 1.0)
    return p / p.sum(1, keepdims=True)
