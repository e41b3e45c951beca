"""Do the probabilities mean what they say? Calibration measured, and fixed by a temperature.

- ECE (expected calibration error, 15 equal-width confidence bins as Guo et al. 2017), NLL and
  the multi-class Brier score, for any set of probabilities;
- temperature scaling: one scalar T fitted on the val split by minimising NLL, so the served
  probabilities are softmax(logits / T); it never changes the top-1 prediction;
- selective prediction: the confidence threshold above which the predictions kept are at
  least a target accuracy on val (the app says "not sure" below it).

toolkit.evaluate.calibrators has the calibrators beyond one temperature.

Pure functions of logits and labels; toolkit.evaluate.calibrate fits them for a run.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ECE_BINS = 15
SELECTIVE_TARGET = 0.95  # the accuracy the predictions above the threshold should have
# T is searched in log space within these bounds: far beyond any real net's miscalibration.
LOG_T_BOUNDS = (math.log(0.05), math.log(20.0))


def scaled_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return (logits.float() / temperature).softmax(1)


def _binned(probs: torch.Tensor, labels: torch.Tensor, bins: int):
    """Top-1 confidence, whether it is right, and its bin: (0, 1/bins], ..., ((bins-1)/bins, 1]."""
    confidence, predicted = probs.float().max(1)
    correct = (predicted == labels).float()
    # ceil(c * bins) - 1: a confidence of exactly k/bins belongs to bin k-1, as (a, b] bins.
    index = (torch.ceil(confidence * bins).long() - 1).clamp(0, bins - 1)
    return confidence, correct, index


def expected_calibration_error(
    probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS
) -> float:
    """Σ_bins (n_bin / n) · |accuracy(bin) − mean confidence(bin)| over equal-width bins of
    the top-1 confidence."""
    confidence, correct, index = _binned(probs, labels, bins)
    gap = torch.zeros(bins).index_add_(0, index, correct - confidence)
    return float(gap.abs().sum() / len(labels))


def reliability_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list:
    """Per confidence bin: {"low", "high", "count", "accuracy", "confidence"} (the last two
    None for an empty bin): what the reliability diagram draws."""
    confidence, correct, index = _binned(probs, labels, bins)
    out = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        out.append(
            {
                "low": b / bins,
                "high": (b + 1) / bins,
                "count": n,
                "accuracy": float(correct[inside].mean()) if n else None,
                "confidence": float(confidence[inside].mean()) if n else None,
            }
        )
    return out


def negative_log_likelihood(probs: torch.Tensor, labels: torch.Tensor) -> float:
    picked = probs.float()[torch.arange(len(labels)), labels]
    return float(-picked.clamp_min(1e-12).log().mean())


def brier_score(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over images of Σ_classes (p − one_hot)²: 0 is perfect, 2 is worst."""
    one_hot = F.one_hot(labels, probs.shape[1]).float()
    return float(((probs.float() - one_hot) ** 2).sum(1).mean())


def calibration_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    return {
        "ece": expected_calibration_error(probs, labels),
        "nll": negative_log_likelihood(probs, labels),
        "brier": brier_score(probs, labels),
    }


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T > 0 that minimises the mean NLL of softmax(logits / T) on these images.

    NLL is convex in 1/T, so a bounded golden-section search on log T finds its one minimum;
    deterministic and exact to ~1e-6 in T.
    """
    logits, labels = logits.float(), labels.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), labels))

    low, high = LOG_T_BOUNDS
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = nll(a), nll(b)
    while high - low > 1e-7:
        if fa <= fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = nll(a)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = nll(b)
    return math.exp((low + high) / 2)


def selective_threshold(probs: torch.Tensor, labels: torch.Tensor, target: float) -> dict:
    """The lowest confidence threshold whose kept predictions (confidence ≥ threshold) are at
    least `target` accurate here, i.e. the one that keeps the most; None when even the most
    confident group of predictions misses the target.

    Returns {"threshold", "coverage", "accuracy"}: the share kept and their accuracy.
    """
    confidence, predicted = probs.float().max(1)
    correct = (predicted == labels).double()  # exact counts: accuracy is compared to `target`
    order = torch.argsort(confidence, descending=True, stable=True)
    sorted_conf, sorted_correct = confidence[order], correct[order]
    kept = torch.arange(1, len(order) + 1, dtype=torch.float64)
    accuracy = sorted_correct.cumsum(0) / kept
    # A threshold keeps every prediction at least as confident: only the last of a run of
    # equal confidences is a place where a threshold can cut.
    cut = torch.ones(len(order), dtype=torch.bool)
    cut[:-1] = sorted_conf[1:] < sorted_conf[:-1]
    valid = torch.nonzero(cut & (accuracy >= target)).flatten()
    if len(valid) == 0:
        return {"threshold": None, "coverage": 0.0, "accuracy": None}
    n = int(valid[-1]) + 1
    return {
        "threshold": float(sorted_conf[n - 1]),
        "coverage": n / len(order),
        "accuracy": float(accuracy[n - 1]),
    }


def expected_threshold(probs: torch.Tensor, target: float) -> float | None:
    """The lowest confidence threshold whose kept predictions have a mean (calibrated)
    confidence of at least `target`: the accuracy the calibrator expects of them. None when
    even the most confident prediction is below it."""
    confidence = probs.float().max(1).values.double()
    ordered = confidence.sort(descending=True).values
    expected = ordered.cumsum(0) / torch.arange(1, len(ordered) + 1, dtype=torch.float64)
    cut = torch.ones(len(ordered), dtype=torch.bool)
    cut[:-1] = ordered[1:] < ordered[:-1]
    valid = torch.nonzero(cut & (expected >= target)).flatten()
    return float(ordered[int(valid[-1])]) if len(valid) else None


def fit_selective(probs: torch.Tensor, labels: torch.Tensor, target: float) -> dict:
    """The "not sure" threshold for calibrated val probabilities: the higher of
    selective_threshold's (the kept val predictions are `target` accurate) and
    expected_threshold's (their calibrated confidence says so too).

    The first alone picks the lowest threshold at which a noisy running accuracy still
    touches the target, so it lands where val happened to be lucky (measured: `net` kept
    95.0 % right on val, 93.5 % on test); asking the calibrated probabilities, which are
    smooth in the threshold, to agree removes most of that luck.
    """
    observed = selective_threshold(probs, labels, target)["threshold"]
    expected = expected_threshold(probs, target)
    threshold = None if observed is None or expected is None else max(observed, expected)
    kept = selective_result(probs, labels, threshold)
    return {
        "target_accuracy": target,
        "threshold": threshold,
        "val_coverage": kept["coverage"],
        "val_accuracy": kept["accuracy"],
        "bound_by": None
        if threshold is None
        else ("val" if observed >= expected else "calibrated"),
    }


def selective_result(probs: torch.Tensor, labels: torch.Tensor, threshold: float | None) -> dict:
    """Coverage and accuracy of the predictions at or above `threshold` on other images."""
    if threshold is None:
        return {"coverage": 0.0, "accuracy": None}
    confidence, predicted = probs.float().max(1)
    kept = confidence >= threshold
    n = int(kept.sum())
    accuracy = float((predicted[kept] == labels[kept]).float().mean()) if n else None
    return {"coverage": n / len(labels), "accuracy": accuracy}
