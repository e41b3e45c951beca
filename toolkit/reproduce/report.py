"""The reproduce report: OUT/report.md, OUT/results.csv and the PNGs beside them.

Everything is read back from the run folders (config.json, metrics.csv, eval/, export/), so
the report can be regenerated at any time and never shows a number its runs do not hold.
Only finished runs (trained, evaluated and exported on their current best.pt) are reported;
the others are listed with what they still need.
"""

from __future__ import annotations

import logging
import platform
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

import torch

from toolkit.atomic import atomic_write_text
from toolkit.export.bench import CPU, cpu_info
from toolkit.reproduce import figures, notes
from toolkit.reproduce.notes import duration, kb, md_table, pct
from toolkit.reproduce.plan import PlannedRun, run_state
from toolkit.run.folder import read_json, read_metrics, write_csv_rows
from toolkit.run.state import EVAL_DIRS, EVAL_RECORD, EXPORT_DIR, EXPORT_REPORT

log = logging.getLogger(__name__)

RESULT_COLUMNS = (
    "experiment", "model", "recipe", "run", "params", "checkpoint_bytes", "onnx_bytes",
    "epochs", "train_seconds", "img_per_s", "best_val_acc", "best_epoch", "final_train_acc",
    "final_val_acc", "test_acc", "test_images", "onnx_bs1_ms", "reference_acc",
    "reference_reached_epoch", "reference_reached_seconds",
)  # fmt: skip
ONNX_FORMAT = "onnx fp32"  # the `format` of the fp32 model's rows in export-report.json


# --- one run's numbers -----------------------------------------------------------------------


def first_reaching(history: Sequence[dict], target: float | None) -> tuple[int, float] | None:
    """(epoch, cumulative train seconds) when val acc first reaches `target`, else None."""
    if target is None:
        return None
    seconds = 0.0
    for row in history:
        seconds += row["seconds"]
        if row["val_acc"] >= target:
            return row["epoch"], seconds
    return None


def onnx_latency_ms(export_report: dict) -> float | None:
    """p50 latency of the fp32 ONNX model at batch 1 on onnxruntime's CPU provider."""
    for row in export_report.get("latency", []):
        if row.get("format") == ONNX_FORMAT and row.get("runtime") == CPU and row["batch"] == 1:
            return float(row["p50_ms"])
    return None


def summarise(run: PlannedRun) -> dict | None:
    """The results row of a finished run (RESULT_COLUMNS plus its history), else None."""
    state = run_state(run)
    if not state.finished:
        return None
    folder, exp = run.run_dir, run.experiment
    history = read_metrics(folder)
    config = read_json(folder / "config.json")
    test = read_json(folder / EVAL_DIRS["test"] / EVAL_RECORD)
    seconds = sum(r["seconds"] for r in history)
    best = next(r for r in history if r["epoch"] == state.best_epoch)
    reached = first_reaching(history, exp.reference.accuracy)
    row = {
        "experiment": exp.name,
        "model": exp.label(),
        "recipe": run.recipe,
        "run": str(folder),
        "params": int(config["num_params"]),
        "checkpoint_bytes": (folder / "best.pt").stat().st_size,
        "onnx_bytes": (folder / EXPORT_DIR / "model.onnx").stat().st_size,
        "epochs": len(history),
        "train_seconds": seconds,
        # Images over seconds, not a mean of per-epoch rates: long epochs weigh more.
        "img_per_s": sum(r["img_per_s"] * r["seconds"] for r in history) / max(seconds, 1e-9),
        "best_val_acc": best["val_acc"],
        "best_epoch": state.best_epoch,
        "final_train_acc": history[-1]["train_acc"],
        "final_val_acc": history[-1]["val_acc"],
        # TTA is part of the model when the run has it: the accuracy the export serves.
        "test_acc": float((test.get("tta") or {}).get("accuracy", test["accuracy"])),
        "test_images": int(test["n"]),
        "onnx_bs1_ms": onnx_latency_ms(read_json(folder / EXPORT_DIR / EXPORT_REPORT)),
        "reference_acc": exp.reference.accuracy,
        "reference_reached_epoch": reached[0] if reached else None,
        "reference_reached_seconds": reached[1] if reached else None,
    }
    return {**row, "history": history, "config": config, "planned": run}


# --- sections --------------------------------------------------------------------------------


def _devices(rows: Sequence[dict]) -> str:
    """The devices and precisions the runs trained with, as each config.json recorded them."""
    found = set()
    for r in rows:
        # "engine" holds what --device/--amp auto resolved to; older runs only have the option.
        engine = r["config"].get("engine", {})
        device = engine.get("device", r["config"]["device"])
        amp = engine.get("amp")
        found.add(device if amp is None else f"{device}, {'fp32' if amp == 'off' else amp}")
    return "; ".join(sorted(found)) or "unknown"


def _header(plan: Sequence[PlannedRun], rows: Sequence[dict]) -> list[str]:
    data = plan[0].config.data
    source = data.data_dir or data.splits or "the official download"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    budgets = sorted({f"{r.recipe} {r.config.epochs}" for r in plan})
    return [
        f"# Seed experiments on {data.dataset}, reproduced",
        "",
        f"Generated by `toolkit reproduce` on {datetime.now():%Y-%m-%d %H:%M}. "
        f"Data: {source}. Epochs per run: {', '.join(budgets)}.",
        "",
        f"Hardware: runs trained on **{_devices(rows)}**; this machine: {cpu_info()['model']} "
        f"({torch.get_num_threads()} torch threads), GPU: {gpu}; Python "
        f"{platform.python_version()}, torch {torch.__version__}. Wall times depend on it.",
        "",
    ]


def _results(rows: Sequence[dict]) -> list[str]:
    header = (
        "experiment", "recipe", "params", "best.pt (KB)", "ONNX (KB)", "epochs", "train time",
        "img/s", "best val", "**test**", "ONNX bs1 (ms)", "reference", "test − ref",
    )  # fmt: skip
    body = []
    for r in rows:
        ref, bs1 = r["reference_acc"], r["onnx_bs1_ms"]
        delta = "—" if ref is None else f"{100 * (r['test_acc'] - ref):+.2f}"
        body.append(
            [
                r["model"], r["recipe"], f"{r['params']:,}", kb(r["checkpoint_bytes"]),
                kb(r["onnx_bytes"]), str(r["epochs"]), duration(r["train_seconds"]),
                f"{r['img_per_s']:,.0f}", pct(r["best_val_acc"]), f"**{pct(r['test_acc'])}**",
                "—" if bs1 is None else f"{bs1:.3f}", r["planned"].experiment.reference.text(),
                delta,
            ]
        )  # fmt: skip
    return ["## Results", "", *md_table(header, body), "", "![](tradeoff.png)", ""]


def _unfinished(plan: Sequence[PlannedRun], rows: Sequence[dict]) -> list[str]:
    done = {r["run"] for r in rows}
    missing = [p for p in plan if str(p.run_dir) not in done]
    if not missing:
        return []
    lines = ["## Not finished", "", "Run the same `toolkit reproduce` command again to continue:"]
    return [*lines, "", *[f"- {p.name}: {run_state(p).describe()}" for p in missing], ""]


# --- the report ------------------------------------------------------------------------------


def write_report(plan: Sequence[PlannedRun], out: Path) -> Path:
    """Write OUT/report.md, OUT/results.csv and the figures for the finished runs of `plan`."""
    out = Path(out)
    summaries = [summarise(run) for run in plan]
    # Table order: experiment order of the seed table, then recipe.
    order = {name: i for i, name in enumerate(dict.fromkeys(p.experiment.name for p in plan))}
    rows = sorted(
        (s for s in summaries if s is not None),
        key=lambda r: (order[r["experiment"]], r["recipe"]),
    )
    table = [["" if r[c] is None else r[c] for c in RESULT_COLUMNS] for r in rows]
    write_csv_rows(out / "results.csv", RESULT_COLUMNS, table)
    lines = _header(plan, rows)
    if rows:
        dataset = plan[0].config.data.dataset
        lines += notes.splits(rows, dataset) + _results(rows) + notes.time_to_reference(rows)
        lines += ["## Notes", "", *notes.overfitting(rows), *notes.regularisation(rows)]
        lines += notes.against_reference(rows) + figures.write_figures(rows, out)
    else:
        lines += ["No run has finished yet.", ""]
    lines += _unfinished(plan, rows)
    atomic_write_text(out / "report.md", "\n".join(lines))
    log.info("report of %d/%d runs written to %s", len(rows), len(plan), out / "report.md")
    return out / "report.md"
