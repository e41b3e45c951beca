"""The figures of the reproduce report: rendered to PNG bytes (Agg canvas, no pyplot), then
written atomically beside report.md by `write_figures`.

Runs are told apart the same way in every figure: one colour per experiment, one marker or
line style per recipe.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image

from toolkit.atomic import atomic_write_bytes
from toolkit.evaluate import plots
from toolkit.evaluate.plots import figure_png
from toolkit.run.folder import read_json
from toolkit.run.state import EVAL_DIRS

MARKERS = {"default": "o", "seed": "s"}
LINES = {"default": "-", "seed": "--"}
FAILURES_SHOWN = 10


def colours(experiments: Sequence[str]) -> dict[str, tuple]:
    """A stable colour per experiment name, in order of first appearance."""
    names = list(dict.fromkeys(experiments))
    cmap = colormaps["tab10" if len(names) <= 10 else "tab20"]
    return {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def _recipe_legend(ax, recipes: Sequence[str], kind: str) -> None:
    marker = kind == "marker"
    handles = [
        Line2D(
            [],
            [],
            color="grey",
            marker=MARKERS[r] if marker else None,
            linestyle="none" if marker else LINES[r],
            label=f"{r} recipe",
        )
        for r in dict.fromkeys(recipes)
    ]
    ax.legend(handles=handles, loc="lower right", fontsize=8)


def tradeoff_png(rows: Sequence[dict]) -> bytes:
    """Test accuracy against parameters and against train wall time, one point per run.

    This is the assignment's comparison of every model with the fully connected baseline.
    """
    fig = Figure(figsize=(12, 4.8))
    palette = colours([r["experiment"] for r in rows])
    for n, (key, xlabel) in enumerate(
        (("params", "parameters (log scale)"), ("train_seconds", "train wall time, s (log)"))
    ):
        ax = fig.add_subplot(1, 2, n + 1)
        for r in rows:
            x, y = r[key], r["test_acc"]
            ax.scatter(x, y, marker=MARKERS[r["recipe"]], color=palette[r["experiment"]], s=45)
            ax.annotate(
                r["experiment"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points"
            )
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        _recipe_legend(ax, [r["recipe"] for r in rows], "marker")
    fig.suptitle("test accuracy vs model size and training time")
    fig.tight_layout()
    return figure_png(fig)


def val_curves_png(curves: Sequence[dict]) -> bytes:
    """Validation accuracy of every run, per epoch and per cumulative train second.

    `curves`: {"experiment", "recipe", "history" (metrics.csv rows), "reference" (or None)}.
    The reference's figure is drawn as a dotted line in the experiment's colour.
    """
    fig = Figure(figsize=(12, 5))
    palette = colours([c["experiment"] for c in curves])
    axes = [fig.add_subplot(1, 2, n + 1) for n in range(2)]
    for c in curves:
        epochs = [row["epoch"] for row in c["history"]]
        seconds = np.cumsum([row["seconds"] for row in c["history"]])
        val = [row["val_acc"] for row in c["history"]]
        style = dict(
            color=palette[c["experiment"]],
            linestyle=LINES[c["recipe"]],
            linewidth=1.4,
            marker=MARKERS[c["recipe"]],
            markersize=3,  # a run of one epoch is a point, not a line
        )
        axes[0].plot(epochs, val, label=f"{c['experiment']} ({c['recipe']})", **style)
        axes[1].plot(seconds, val, **style)
    for name, reference in {c["experiment"]: c["reference"] for c in curves}.items():
        if reference is not None:
            for ax in axes:
                ax.axhline(reference, color=palette[name], linestyle=":", linewidth=0.9)
    axes[0].set_xlabel("epoch")
    axes[1].set_xlabel("cumulative train wall time, s (log)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    _recipe_legend(axes[1], [c["recipe"] for c in curves], "line")
    fig.suptitle("validation accuracy (dotted: the reference's reported figure)")
    fig.tight_layout()
    return figure_png(fig)


def confusion_grid_png(items: Sequence[dict], columns: int = 4) -> bytes:
    """Row-normalised confusion matrices side by side.

    `items`: {"title", "classes", "matrix"} (counts, rows true, columns predicted).
    """
    if not items:
        return plots.message_png("no evaluated runs")
    columns = min(columns, len(items))
    rows = math.ceil(len(items) / columns)
    fig = Figure(figsize=(3.4 * columns, 3.6 * rows))
    for n, item in enumerate(items):
        ax = fig.add_subplot(rows, columns, n + 1)
        matrix = np.asarray(item["matrix"], dtype=float)
        support = matrix.sum(axis=1, keepdims=True)
        # Rates, not counts: runs on different split sizes stay comparable at a glance.
        rates = np.divide(matrix, support, out=np.zeros_like(matrix), where=support > 0)
        ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0)
        k = len(item["classes"])
        ax.set_xticks(range(k), labels=item["classes"], rotation=90, fontsize=6)
        ax.set_yticks(range(k), labels=item["classes"], fontsize=6)
        ax.set_title(item["title"], fontsize=8)
        if n % columns == 0:
            ax.set_ylabel("true", fontsize=7)
        ax.set_xlabel("predicted", fontsize=7)
    fig.tight_layout()
    return figure_png(fig)


# --- the report's figure files ---------------------------------------------------------------


def _read_confusion(path: Path) -> tuple[list[str], list[list[int]]]:
    """eval/confusion_matrix.csv (header: corner cell + classes; rows: class + counts)."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    return header[1:], [[int(v) for v in row[1:]] for row in rows]


def _gallery(row: dict, out: Path) -> str:
    """OUT/failures/<run>.png: the most confident mistake per true class, from RUN/eval/."""
    eval_dir = Path(row["run"]) / EVAL_DIRS["test"]
    entries, seen = [], set()
    for entry in read_json(eval_dir / "failures.json"):  # by confidence within each class
        if entry["true"] not in seen and len(entries) < FAILURES_SHOWN:
            seen.add(entry["true"])
            entries.append(entry)
    chw = [
        np.asarray(Image.open(eval_dir / e["file"]).convert("RGB")).transpose(2, 0, 1)
        for e in entries
    ]
    titles = [f"{e['true']} → {e['predicted']} ({e['confidence']:.2f})" for e in entries]
    name = f"failures/{Path(row['run']).name}.png"
    atomic_write_bytes(out / name, plots.failures_png(chw, titles, columns=5))
    return name


def write_figures(rows: Sequence[dict], out: Path) -> list[str]:
    """Write every figure of the report under `out`; the Markdown lines that show them.

    `rows` are toolkit.reproduce.report.summarise rows (with "history").
    """
    curves = [
        {**{k: r[k] for k in ("experiment", "recipe", "history")}, "reference": r["reference_acc"]}
        for r in rows
    ]
    atomic_write_bytes(out / "tradeoff.png", tradeoff_png(rows))
    atomic_write_bytes(out / "val_curves.png", val_curves_png(curves))
    matrices = []
    for r in rows:
        classes, matrix = _read_confusion(
            Path(r["run"]) / EVAL_DIRS["test"] / "confusion_matrix.csv"
        )
        title = f"{r['experiment']} ({r['recipe']}) · test {100 * r['test_acc']:.2f} %"
        matrices.append({"title": title, "classes": classes, "matrix": matrix})
    atomic_write_bytes(out / "confusion_matrices.png", confusion_grid_png(matrices))
    lines = ["## Validation curves", "", "![](val_curves.png)", ""]
    lines += ["## Confusion matrices (test split)", "", "![](confusion_matrices.png)", ""]
    lines += ["## Failure galleries (test split, most confident mistake per class)", ""]
    for r in rows:
        lines += [f"### {r['model']} ({r['recipe']})", "", f"![]({_gallery(r, out)})", ""]
    # A gallery of a run this plan no longer reports would otherwise linger beside the new ones.
    keep = {f"{Path(r['run']).name}.png" for r in rows}
    for stale in (out / "failures").glob("*.png"):
        if stale.name not in keep:
            stale.unlink()
    return lines
