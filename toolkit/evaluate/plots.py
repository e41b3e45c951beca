"""The evaluation figures, rendered to PNG bytes so callers can write them atomically.

Figures are built on `matplotlib.figure.Figure` with the Agg canvas directly, never through
pyplot: no global figure registry to leak, no GUI backend picked up from the environment,
and safe to call from a server thread.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

DPI = 120


def figure_png(fig: Figure) -> bytes:
    """Render a figure to PNG bytes."""
    FigureCanvasAgg(fig)  # attaches itself to `fig`
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def image_png(chw: np.ndarray) -> bytes:
    """A uint8 C×H×W image (1 or 3 channels) as PNG bytes, at its own resolution."""
    hwc = np.ascontiguousarray(np.asarray(chw, dtype=np.uint8).transpose(1, 2, 0))
    image = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def confusion_matrix_png(matrix: np.ndarray, classes: Sequence[str], title: str = "") -> bytes:
    """Counts in every cell, class names on both axes; rows are true, columns predicted.

    Cells are coloured by the row-normalised rate, so a small class's errors are as visible
    as a large one's, while the text keeps the raw counts.
    """
    matrix = np.asarray(matrix)
    k = len(classes)
    support = matrix.sum(axis=1, keepdims=True)
    rates = np.divide(matrix, support, out=np.zeros(matrix.shape, dtype=float), where=support > 0)
    side = max(4.0, 0.65 * k + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    ax = fig.add_subplot()
    im = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    fontsize = 9 if k <= 12 else 7
    for i in range(k):
        for j in range(k):
            # White text on dark cells, black on light ones, so every count stays legible.
            colour = "white" if rates[i, j] > 0.5 else "black"
            ax.text(
                j,
                i,
                str(int(matrix[i, j])),
                ha="center",
                va="center",
                color=colour,
                fontsize=fontsize,
            )
    return figure_png(fig)


def message_png(text: str) -> bytes:
    """A small picture holding one line of text, where a figure has nothing to show."""
    fig = Figure(figsize=(4, 1.5))
    fig.text(0.5, 0.5, text, ha="center", va="center")
    return figure_png(fig)


def failures_png(images: Sequence[np.ndarray], titles: Sequence[str], columns: int = 4) -> bytes:
    """A grid of uint8 C×H×W images with one title each; a note when there are none."""
    if not images:
        return message_png("no misclassified images")
    columns = min(columns, len(images))
    rows = math.ceil(len(images) / columns)
    fig = Figure(figsize=(2.2 * columns, 2.4 * rows))
    for n, (chw, title) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(rows, columns, n + 1)
        hwc = np.asarray(chw).transpose(1, 2, 0)
        # Nearest-neighbour: a 32×32 image blown up smoothly looks sharper than the model saw it.
        ax.imshow(hwc[..., 0] if hwc.shape[-1] == 1 else hwc, cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    return figure_png(fig)


def curves_png(history: Sequence[dict], best_epoch: int | None = None, title: str = "") -> bytes:
    """Loss and accuracy per epoch, train against val, with the best epoch marked."""
    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(10, 4))
    for n, metric in enumerate(("loss", "acc")):
        ax = fig.add_subplot(1, 2, n + 1)
        for split, style in (("train", "-o"), ("val", "-s")):
            ax.plot(
                epochs,
                [row[f"{split}_{metric}"] for row in history],
                style,
                markersize=3,
                label=split,
            )
        if best_epoch is not None:
            ax.axvline(
                best_epoch,
                color="grey",
                linestyle="--",
                linewidth=1,
                label=f"best.pt (epoch {best_epoch})",
            )
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("accuracy" if metric == "acc" else "cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)


def reliability_png(curves: dict[str, list[dict]], title: str = "") -> bytes:
    """Reliability diagram: accuracy against confidence per bin, one line per set of
    probabilities (`curves`: name -> calibration.reliability_bins rows), the diagonal being
    perfect calibration; beside it, how many predictions fall in each bin."""
    fig = Figure(figsize=(10, 4.2))
    ax, counts = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect")
    width = 1 / len(next(iter(curves.values()))) / (len(curves) + 1)
    for n, (name, rows) in enumerate(curves.items()):
        filled = [r for r in rows if r["count"]]
        ax.plot(
            [r["confidence"] for r in filled],
            [r["accuracy"] for r in filled],
            "-o",
            markersize=4,
            label=name,
        )
        counts.bar(
            [r["low"] + (n + 0.5) * width for r in rows],
            [r["count"] for r in rows],
            width=width,
            label=name,
        )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    counts.set_xlim(0, 1)
    counts.set_xlabel("confidence (top-1 probability)")
    counts.set_ylabel("predictions")
    counts.grid(alpha=0.3)
    counts.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)
