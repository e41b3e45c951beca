"""Calibrators: what turns a model's logits into the probabilities it serves, fitted on val.

- "temperature": softmax(logits / T), T minimising the val NLL (Guo et al. 2017);
- "ensemble": ensemble temperature scaling (Zhang et al. 2020), a mixture
  w₁·softmax(logits / T) + w₂·softmax(logits) + w₃·uniform, T as above and the weights
  minimising the val NLL;
- "top1-beta": softmax(logits / T), then a monotone map of the top-1 probability c,
  g = sigmoid(a·ln c − b·ln(1 − c) + m) with a, b ≥ 0 (beta calibration, Kull et al. 2017,
  of the top label), fitted by the log-loss of "is the top-1 right" on val; it holds the
  identity (a = b = 1, m = 0), so on val it is never worse than the temperature alone;
- "top1-map": softmax(logits / T), then a monotone piecewise-linear map of the top-1
  probability (isotonic regression of val correctness on equal-count confidence bins).

Both top-1 maps rescale the other classes in proportion, so the vector still sums to 1; the
change in NLL they make is exactly the change in the log-loss of "is the top-1 right".

None of them changes the predicted class (argmax of the logits): see Calibrator.probs. Each
is a few tensor operations that ExportHead puts into the ONNX graph as they are, so the
graph computes exactly the function that was fitted and compared here.

`choose_calibrator` fits every candidate and picks one by 5-fold cross-validation on val
alone: a method scored on the images it was fitted on would always look best when it has
the most freedom (a 12-bin map fits its own bins almost exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toolkit.evaluate.calibration import calibration_metrics, fit_temperature

METHODS = ("temperature", "ensemble", "top1-beta", "top1-map")
CV_FOLDS, CV_SEED = 5, 0
TOP1_BINS = 12  # equal-count bins: ~400 val images each on a 5,000-image val split
# The map's knots are nudged towards the identity by this much so that it rises strictly:
# distinct confidences stay distinct and in order (the "not sure" threshold cuts between them).
STRICTNESS = 1e-3
# The runner-up, rescaled, stays this much (relatively) below the top-1: rounding cannot tie.
ARGMAX_MARGIN = 1e-4
EM_STEPS = 500  # the ensemble weights' NLL is convex; EM reaches its minimum to ~1e-6 by then
BETA_BOUND = 10.0  # |α|, |β| of the top1-beta map: a and b within e^±10


@dataclass(frozen=True)
class Calibrator:
    """logits -> probabilities. `params` are the weights (scaled, raw, uniform) of
    "ensemble" or (a, b, m) of "top1-beta"; `knots` ((confidence, calibrated confidence),
    rising) are "top1-map"'s."""

    method: str = "temperature"
    temperature: float = 1.0
    params: tuple[float, ...] = ()
    knots: tuple[tuple[float, float], ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown calibration method {self.method!r}; one of {METHODS}")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        # T = 1 leaves the graph without a division (the exported graph of uncalibrated runs).
        scaled = (logits if self.temperature == 1.0 else logits / self.temperature).softmax(1)
        if self.method == "ensemble":
            w_scaled, w_raw, w_uniform = self.params
            # Every term ranks the classes as the logits do (the uniform one ties them all).
            return w_scaled * scaled + w_raw * logits.softmax(1) + w_uniform / logits.shape[1]
        if self.method == "top1-beta":
            return remap_top1(scaled, lambda c, rest: _beta_map(c, rest, self.params))
        if self.method == "top1-map":
            return remap_top1(scaled, lambda c, rest: _piecewise_linear(c, self.knots))
        return scaled

    def record(self) -> dict:
        out: dict = {"method": self.method, "temperature": self.temperature}
        if self.params:
            out["params"] = list(self.params)
        if self.knots:
            out["knots"] = [list(k) for k in self.knots]
        return out

    @classmethod
    def from_record(cls, record: dict) -> Calibrator:
        """The calibrator of a calibration record (toolkit.evaluate.calibrate); records from
        before there were several methods hold a temperature only."""
        spec = record.get("calibrator") or {"temperature": record["temperature"]}
        return cls(
            method=spec.get("method", "temperature"),
            temperature=float(spec["temperature"]),
            params=tuple(float(p) for p in spec.get("params", ())),
            knots=tuple((float(x), float(y)) for x, y in spec.get("knots", ())),
        )

    def describe(self) -> str:
        """One line for a model card: what the graph does to the logits."""
        scaled = f"softmax(logits / {self.temperature:.3f})"
        if self.method == "ensemble":
            w = self.params
            return (
                f"ensemble temperature scaling: {w[0]:.3f}·{scaled} + {w[1]:.3f}·softmax(logits)"
                f" + {w[2]:.3f}·uniform"
            )
        if self.method == "top1-beta":
            a, b, m = self.params
            return (
                f"{scaled}, then the top-1 probability c mapped to sigmoid({a:.3f}·ln c − "
                f"{b:.3f}·ln(1 − c) {m:+.3f}) (beta calibration), the other classes rescaled "
                "in proportion"
            )
        if self.method == "top1-map":
            return (
                f"{scaled}, then a monotone map of the top-1 probability ({len(self.knots)} "
                "knots, isotonic), the other classes rescaled in proportion"
            )
        return scaled


def remap_top1(probs: torch.Tensor, top1_map) -> torch.Tensor:
    """`probs` with the top-1 probability c replaced by g = top1_map(c, rest) (rest: the sum
    of the other classes, 1 − c) and the other classes scaled by (1 − g) / rest.

    The new top-1 is kept above the rescaled runner-up p₂ (g ≥ p₂ / (rest + p₂)): the
    predicted class never changes, whatever the map.
    """
    top2 = probs.topk(2, dim=1)
    top, second = top2.values[:, :1], top2.values[:, 1:]
    is_top = torch.arange(probs.shape[1]) == top2.indices[:, :1]
    # The others' own sum, not 1 − c: where c rounds to 1.0 in float32 that would be 0.
    rest = torch.where(is_top, torch.zeros_like(probs), probs).sum(1, keepdim=True)
    floor = second / (rest + second).clamp(min=1e-30) * (1.0 + ARGMAX_MARGIN)
    mapped = torch.maximum(top1_map(top, rest), floor)
    scale = (1.0 - mapped) / rest.clamp(min=1e-30)
    return torch.where(is_top, mapped, probs * scale)


def _beta_map(top: torch.Tensor, rest: torch.Tensor, params) -> torch.Tensor:
    a, b, m = params
    return torch.sigmoid(a * top.clamp(min=1e-30).log() - b * rest.clamp(min=1e-30).log() + m)


def _piecewise_linear(top: torch.Tensor, knots) -> torch.Tensor:
    """The line through `knots`; flat beyond the first and the last."""
    xs = torch.tensor([k[0] for k in knots], dtype=top.dtype)
    ys = torch.tensor([k[1] for k in knots], dtype=top.dtype)
    widths, slopes = xs[1:] - xs[:-1], (ys[1:] - ys[:-1]) / (xs[1:] - xs[:-1])
    # Σ slope·(how far c goes into each segment).
    into = torch.minimum((top - xs[:-1]).clamp(min=0.0), widths)
    return ys[0] + (into * slopes).sum(1, keepdim=True)


# --- fitting -----------------------------------------------------------------------------------


def fit_calibrator(method: str, logits: torch.Tensor, labels: torch.Tensor) -> Calibrator:
    """The calibrator of `method` fitted on these images (val)."""
    logits, labels = logits.float(), labels.long()
    temperature = fit_temperature(logits, labels)
    if method == "temperature":
        return Calibrator("temperature", temperature)
    scaled = (logits / temperature).softmax(1)
    if method == "ensemble":
        weights = _mixture_weights(scaled, logits.softmax(1), labels)
        return Calibrator("ensemble", temperature, params=weights)
    if method == "top1-beta":
        return Calibrator("top1-beta", temperature, params=_beta_params(scaled, labels))
    if method == "top1-map":
        return Calibrator("top1-map", temperature, knots=_top1_knots(scaled, labels))
    raise ValueError(f"unknown calibration method {method!r}; one of {METHODS}")


def _mixture_weights(scaled, raw, labels) -> tuple[float, float, float]:
    """The mixture weights of (scaled, raw, uniform) that minimise the NLL, by EM."""
    picked = torch.stack(
        [
            scaled[torch.arange(len(labels)), labels].double(),
            raw[torch.arange(len(labels)), labels].double(),
            torch.full((len(labels),), 1.0 / scaled.shape[1], dtype=torch.float64),
        ],
        1,
    )
    weights = torch.full((3,), 1.0 / 3, dtype=torch.float64)
    for _ in range(EM_STEPS):
        share = picked * weights
        weights = (share / share.sum(1, keepdim=True)).mean(0)
    return tuple(float(w) for w in weights)


def _beta_params(probs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, float]:
    """(a, b, m) minimising the log-loss of "the top-1 is right" under
    sigmoid(a·ln c − b·ln(1 − c) + m), a = e^α and b = e^β kept positive (a rising map);
    L-BFGS from the identity."""
    top, predicted = probs.double().max(1)
    # As the graph computes it (remap_top1): the others' own sum.
    rest = probs.double().scatter(1, predicted[:, None], 0.0).sum(1)
    correct = (predicted == labels).double()
    features = torch.stack([top.clamp(min=1e-30).log(), -rest.clamp(min=1e-30).log()], 1)
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # α, β, m
    optimizer = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

    def bounded(theta):
        # A val set the model gets all right (or all wrong) has no finite optimum: α, β and m
        # would run off until e^α overflows. Past these bounds the map is a step anyway.
        return theta[:2].clamp(-BETA_BOUND, BETA_BOUND), theta[2].clamp(-50.0, 50.0)

    def loss():
        optimizer.zero_grad()
        log_ab, shift = bounded(theta)
        z = features @ log_ab.exp() + shift
        value = torch.nn.functional.binary_cross_entropy_with_logits(z, correct)
        value.backward()
        return value

    optimizer.step(loss)
    log_ab, shift = bounded(theta.detach())
    alpha, beta = log_ab.tolist()
    return math.exp(alpha), math.exp(beta), float(shift)


def _top1_knots(probs: torch.Tensor, labels: torch.Tensor) -> tuple[tuple[float, float], ...]:
    """(mean confidence, accuracy) of equal-count bins of the top-1 confidence, made
    non-decreasing by pool-adjacent-violators, anchored at (1/K, 1/K) and (1, 1)."""
    confidence, predicted = probs.double().max(1)
    correct = (predicted == labels).double()
    order = torch.argsort(confidence, stable=True)
    points = []  # [mean confidence, accuracy, weight]: equal-count bins weigh the same
    for chunk in torch.tensor_split(order, min(TOP1_BINS, len(order))):
        if len(chunk):
            points.append([float(confidence[chunk].mean()), float(correct[chunk].mean()), 1.0])
    pooled = _pool_adjacent_violators(points)
    floor = 1.0 / probs.shape[1]
    knots = {floor: floor, 1.0: 1.0}
    for x, y, _ in pooled:
        # A bin whose mean is an anchor (every confidence in it rounded to 1.0) keeps the
        # anchor: at c = 1 there is no other class left to take 1 − g, so g must be 1.
        knots.setdefault(x, min(max(y, floor), 1.0))
    xs = sorted(knots)
    ys = _pool_adjacent_violators([[x, knots[x], 1.0] for x in xs])  # the anchors may violate
    return tuple(
        (x, (1 - STRICTNESS) * y + STRICTNESS * x) for x, (_, y, _) in zip(xs, ys, strict=True)
    )


def _pool_adjacent_violators(points: list[list[float]]) -> list[list[float]]:
    """Points [x, y, weight] in x order -> the same xs with the weighted isotonic ys."""
    blocks: list[list[float]] = []  # [weighted y, weight, how many points]
    for _, y, w in points:
        blocks.append([y, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            y2, w2, n2 = blocks.pop()
            y1, w1, n1 = blocks.pop()
            blocks.append([(y1 * w1 + y2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    ys = [y for y, _, n in blocks for _ in range(int(n))]
    return [[x, y, w] for (x, _, w), y in zip(points, ys, strict=True)]


# --- choosing ----------------------------------------------------------------------------------


def cross_validated(method: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`method`'s probabilities for every val image from its fit on the other folds
    (CV_FOLDS seeded folds)."""
    folds = torch.randperm(len(labels), generator=torch.Generator().manual_seed(CV_SEED))
    held_out = torch.empty(logits.shape, dtype=torch.float32)
    for fold in torch.tensor_split(folds, CV_FOLDS):
        keep = torch.ones(len(labels), dtype=torch.bool)
        keep[fold] = False
        held_out[fold] = fit_calibrator(method, logits[keep], labels[keep]).probs(logits[fold])
    return held_out


def choose_calibrator(logits: torch.Tensor, labels: torch.Tensor) -> tuple[Calibrator, dict]:
    """The calibrator with the lowest cross-validated ECE on val among those whose
    cross-validated NLL is not measurably worse than temperature scaling's (by more than
    one standard error of the per-image difference), refitted on all of val; and the
    comparison that chose it ({"candidates": {method: figures}, "reason": text})."""
    labels = labels.long()
    held_out = {m: cross_validated(m, logits, labels) for m in METHODS}
    losses = {m: _per_image_nll(p, labels) for m, p in held_out.items()}
    scores = {}
    for method, probs in held_out.items():
        excess = losses[method] - losses["temperature"]
        scores[method] = {
            **calibration_metrics(probs, labels),
            "nll_vs_temperature": float(excess.mean()),
            "nll_vs_temperature_se": float(excess.std() / math.sqrt(len(excess))),
        }
    eligible = [
        m
        for m, s in scores.items()
        if s["nll_vs_temperature"] <= s["nll_vs_temperature_se"] or m == "temperature"
    ]
    best = min(eligible, key=lambda m: (scores[m]["ece"], METHODS.index(m)))
    others = ", ".join(
        f"{m} {scores[m]['ece']:.2%} / {scores[m]['nll']:.4f}" for m in METHODS if m != best
    )
    reason = (
        f"{best}: the lowest {CV_FOLDS}-fold cross-validated ECE on val among the methods "
        "whose NLL is not measurably worse than temperature scaling's: ECE / NLL "
        f"{scores[best]['ece']:.2%} / {scores[best]['nll']:.4f} (others: {others})"
    )
    return fit_calibrator(best, logits, labels), {"candidates": scores, "reason": reason}


def _per_image_nll(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    picked = probs.double()[torch.arange(len(labels)), labels]
    return -picked.clamp_min(1e-12).log()
