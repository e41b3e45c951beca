"""The export report and `toolkit bench` rows as rich tables (what the CLI prints)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from toolkit.export.bench import cpu_info

MODEL_COLUMNS = (
    ("model", "model"),
    ("format", "format"),
    ("size_mb", "size (MB)"),
    ("params", "params"),
    ("macs", "MACs/img"),
    ("accuracy", "test acc"),
    ("file", "file"),
)
LATENCY_COLUMNS = (
    ("model", "model"),
    ("format", "format"),
    ("runtime", "runtime"),
    ("batch", "batch"),
    ("p50_ms", "p50 (ms)"),
    ("p95_ms", "p95 (ms)"),
    ("mean_ms", "mean (ms)"),
    ("img_per_s", "img/s"),
)


def bench_table(rows: list[dict], title: str, columns: tuple[tuple[str, str], ...]) -> Table:
    """An Ultralytics-style table of `rows`, one line each, `columns` as (key, header)."""
    table = Table(title=title)
    for key, header in columns:
        left = key in ("model", "format", "runtime", "file")
        table.add_column(header, justify="left" if left else "right")
    for row in rows:
        table.add_row(*[_cell(key, row.get(key)) for key, _ in columns])
    return table


def print_bench(rows: list[dict], console: Console) -> None:
    """bench_models' rows as two tables: what each model is, then how fast it runs."""
    if not rows:
        console.print("no models to show")
        return
    files = list({row["file"]: row for row in rows}.values())
    console.print(bench_table(files, "models", MODEL_COLUMNS))
    threads = "/".join(map(str, sorted({row["threads"] for row in rows})))
    console.print(
        bench_table(rows, f"latency ({threads} threads, {cpu_info()['model']})", LATENCY_COLUMNS)
    )


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "size_mb":
        return f"{value:.3f}"
    if key == "macs":
        return f"{value / 1e6:,.2f} M"
    if key == "accuracy":
        return f"{value:.4f}"
    if key in ("p50_ms", "p95_ms", "mean_ms"):
        return f"{value:.3f}"
    if key == "img_per_s":
        return f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


EXPORT_LATENCY_COLUMNS = (
    ("format", "format"),
    ("runtime", "runtime"),
    ("accuracy", "acc"),
    ("batch", "batch"),
    ("p50_ms", "p50 (ms)"),
    ("p95_ms", "p95 (ms)"),
    ("mean_ms", "mean (ms)"),
    ("img_per_s", "img/s"),
)


def _calibration_text(meta: dict) -> str:
    if meta.get("calibrated_on") is None:
        return "not calibrated (no val split): softmax(logits)"
    threshold = meta.get("confidence_threshold")
    not_sure = "never" if threshold is None else f"below {threshold:.3f}"
    calibrated = (
        meta.get("calibration_description") or f"softmax(logits / {meta['temperature']:.3f})"
    )
    return (
        f'{calibrated}, fitted on val; "not sure" '
        f"{not_sure} (target {meta['confidence_target']:.0%} accuracy)"
    )


def print_report(report: dict, console: Console) -> None:
    """The export summary, the latency table and the INT8/Triton notes, as rich output."""
    v, s = report["verification"], report["stats"]
    selective = report["metadata"].get("tta_below") is not None
    summary = Table(title=f"export of {report['run']}", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    for what, value in (
        (
            "model",
            f"{report['metadata']['model']} ({report['metadata']['dataset']}), "
            f"opset {report['opset']}",
        ),
        (
            "size",
            f"{s['size_mb']:.3f} MB, {s['params']:,} params, "
            f"{s['macs_per_image'] / 1e6:,.2f} M MACs/image"
            # count_macs counts the main graph: a selective graph's views are in its If
            + (" it is sure of (the others also run the views)" if selective else ""),
        ),
        (
            "parity",
            f"{v['top1_agreement']:.2%} top-1 agreement on {v['images']:,} "
            f"{v['split']} images, max |Δlogit| {v['max_abs_logit_diff']:.2e}",
        ),
        ("accuracy", f"torch {v['torch_accuracy']:.4f}, onnx {v['onnx_accuracy']:.4f}"),
        ("probabilities", _calibration_text(report["metadata"])),
    ):
        summary.add_row(what, value)
    console.print(summary)
    threads = report["threads"]
    console.print(
        bench_table(
            report["latency"],
            f"latency ({threads['torch']} threads, {report['cpu']['model']}; accuracy on "
            f"{v['split']})",
            EXPORT_LATENCY_COLUMNS,
        )
    )
    if "int8" in report:
        q = report["int8"]
        console.print(
            f"INT8: accuracy {q['accuracy']:.4f} ({100 * q['accuracy_delta']:+.2f} "
            f"points vs fp32), {q['size_mb']:.3f} MB. {q['note']}",
            highlight=False,
        )
    if "fp16" in report:
        h = report["fp16"]
        console.print(
            f"fp16 (CUDA): accuracy {h['accuracy']:.4f} "
            f"({100 * h['accuracy_delta']:+.2f} points vs fp32)",
            highlight=False,
        )
    if "triton" in report:
        console.print(
            f"Triton model repository: {report['triton']['repository']} "
            f"(model '{report['triton']['model_name']}')",
            highlight=False,
        )
    console.print(f"written to {report['export_dir']}", highlight=False)
