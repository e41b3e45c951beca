"""The numbers of an evaluation, from one split's labels and logits: pure functions."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import classification_report, top_k_accuracy_score

from toolkit.errors import ToolkitError

FAILURES_PER_CLASS = 2
TOP_K = 5  # top-5 accuracy beside top-1, as ImageNet-style reports give it


def compute_metrics(labels: torch.Tensor, logits: torch.Tensor, classes) -> dict:
    """Accuracy, loss, confusion matrix (rows true, columns predicted), per-class rows and the
    sklearn classification report (dict and text) for one split's labels and logits.

    Per-class accuracy is None for a class with no images in the split (0/0 is not 0 %).
    """
    classes, k = list(classes), len(classes)
    labels, logits = labels.long().cpu(), logits.float().cpu()
    if len(labels) == 0:
        raise ToolkitError("cannot evaluate an empty split")
    preds = logits.argmax(1)
    confusion = torch.bincount(labels * k + preds, minlength=k * k).reshape(k, k).numpy()
    support, correct = confusion.sum(axis=1), np.diag(confusion)
    per_class = [
        {"class": name, "support": int(n), "correct": int(ok), "accuracy": ok / n if n else None}
        for name, n, ok in zip(classes, support.tolist(), correct.tolist(), strict=True)
    ]
    # labels=range(k): every class gets a row, even one absent from this split.
    args = dict(
        y_true=labels.numpy(),
        y_pred=preds.numpy(),
        labels=list(range(k)),
        target_names=classes,
        digits=4,
        zero_division=0,
    )
    report = classification_report(**args, output_dict=True)
    return {
        "n": len(labels),
        "accuracy": float(correct.sum() / len(labels)),
        "top5_accuracy": top_k_accuracy(labels, logits),
        "loss": F.cross_entropy(logits, labels).item(),
        "macro_f1": float(report["macro avg"]["f1-score"]),
        "confusion": confusion,
        "per_class": per_class,
        "report": report,
        "report_text": classification_report(**args),
    }


def top_k_accuracy(labels: torch.Tensor, logits: torch.Tensor, k: int = TOP_K) -> float | None:
    """Share of images whose class is among the k highest scores; None with k classes or
    fewer, where every image would count."""
    classes = logits.shape[1]
    if classes <= k:
        return None
    scores = logits.float().numpy()
    return float(top_k_accuracy_score(labels.numpy(), scores, k=k, labels=list(range(classes))))


def select_failures(
    labels: torch.Tensor, logits: torch.Tensor, k: int = FAILURES_PER_CLASS
) -> list[dict]:
    """For each true class, in class order, its `k` most confident wrong predictions.

    Entries are {"index", "true", "predicted", "confidence"} (class indices; confidence is the
    softmax probability of the predicted class), sorted by descending confidence within a
    class; ties keep split order, so the gallery is deterministic.
    """
    confidence, preds = logits.float().softmax(1).max(1)
    out = []
    for c in labels.unique(sorted=True).tolist():
        wrong = torch.nonzero((labels == c) & (preds != labels)).flatten()
        order = torch.argsort(confidence[wrong], descending=True, stable=True)
        out += [
            {"index": i, "true": c, "predicted": int(preds[i]), "confidence": float(confidence[i])}
            for i in wrong[order][:k].tolist()
        ]
    return out
