"""`toolkit export`: RUN/best.pt -> a verified, self-describing ONNX model plus its numbers.

    best.pt ─► build_classifier ─► ONNX (+ metadata) ─► parity on the run's own test split
                                                      ─► size / params / MACs / latency
                                                      ─► (--int8, --fp16, --triton)
                                                      ─► RUN/export/: model.onnx, model.json,
                                                         export-report.json (written last)

Everything is built and verified in memory first and written only when it passed, each file
through a temporary name and a rename: a failed export leaves no new model.onnx behind.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
import torch
from rich.console import Console
from rich.table import Table

from toolkit import __version__
from toolkit.atomic import atomic_write_bytes, atomic_write_json
from toolkit.bench import (
    CPU,
    DEFAULT_TIMING,
    Timing,
    bench_models,
    bench_table,
    cpu_info,
    cuda_provider_usable,
    default_threads,
    make_session,
    measure_onnx,
    measure_torch,
    print_bench,
    runtimes,
)
from toolkit.data import DataBundle, Split
from toolkit.errors import ToolkitError
from toolkit.models import count_parameters
from toolkit.onnx_export import (
    ExportHead,
    build_metadata,
    check_opset,
    count_macs,
    export_classifier,
)
from toolkit.parity import (
    REQUIRED_AGREEMENT,
    compare,
    evaluation_split,
    onnx_outputs,
    require_parity,
    torch_outputs,
    verification_data,
)
from toolkit.quantize import (
    FP16_FILE,
    INT8_FILE,
    fp16_variant,
    int8_variant,
    report_shape,
    static_columns,
)
from toolkit.runs import build_classifier, check_writable, load_checkpoint
from toolkit.triton import write_triton_repo

__all__ = ["export_run", "print_report", "bench_models", "print_bench", "REQUIRED_AGREEMENT"]

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
METADATA_FILE, REPORT_FILE = "model.json", "export-report.json"


def export_run(
    run_dir: Path,
    out_dir: Path | None = None,
    *,
    int8: bool = False,
    fp16: bool = False,
    triton_dir: Path | None = None,
    opset: int | None = None,
    timing: Timing | None = None,
) -> dict:
    """Export RUN/best.pt to ONNX, verify it on the run's test split, measure it; the report.

    `timing` (how long latencies are measured) defaults to bench.DEFAULT_TIMING.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    timing = timing or DEFAULT_TIMING
    # Every check a user can fail comes before the slow work.
    opset = check_opset(opset)
    if fp16 and not cuda_provider_usable():
        raise ToolkitError(
            "--fp16 needs onnxruntime's CUDA provider on a visible GPU, and none "
            "is usable here; export without --fp16 (or on a GPU machine)"
        )
    ckpt = load_checkpoint(run_dir / "best.pt")
    check_writable(out_dir, "export folder", "--out")
    if triton_dir is not None:
        check_writable(Path(triton_dir), "Triton folder", "--triton")

    head = ExportHead(build_classifier(ckpt)).eval()
    meta = build_metadata(ckpt, run_dir, count_parameters(head.classifier.net))
    shape = (int(ckpt["model"]["in_channels"]), *meta["input_size"])
    model = export_classifier(head, shape, meta, opset)
    model_bytes = model.SerializeToString()

    data = verification_data(run_dir, ckpt)
    split, reference, verification = _verify(head, model_bytes, data, ckpt)
    report = _base_report(run_dir, out_dir, ckpt, meta, opset)
    report["verification"] = verification
    report["stats"] = {
        "size_mb": len(model_bytes) / 1e6,
        "params": meta["num_params"],
        "macs_per_image": count_macs(model),
        "input_shape": list(shape),
    }
    report["latency"] = _latency_rows(head, model_bytes, report, timing)
    files = {ONNX_FILE: model_bytes}
    if int8:
        files[INT8_FILE], report["int8"] = int8_variant(
            model, data, split, reference, report, timing
        )
    if fp16:
        files[FP16_FILE], report["fp16"] = fp16_variant(model, split, reference, report, timing)
    report["files"] = [*files, METADATA_FILE, REPORT_FILE]
    report["onnx_sha256"] = hashlib.sha256(model_bytes).hexdigest()
    if triton_dir is not None:
        report["triton"] = write_triton_repo(Path(triton_dir), model_bytes, meta)
    _write_outputs(out_dir, files, meta, report)
    log.info("exported %s to %s", run_dir, out_dir)
    return report


def _verify(
    head: torch.nn.Module, model_bytes: bytes, data: DataBundle, ckpt: dict
) -> tuple[Split, Any, dict]:
    """torch and onnxruntime on the whole evaluation split; raises when they disagree."""
    split_name, split = evaluation_split(data)
    threads = default_threads()
    reference = torch_outputs(head, split.images, threads, description=f"torch · {split_name}")
    session = make_session(model_bytes, CPU, threads)
    verification = {
        "split": split_name,
        "images": len(split),
        "data_fingerprint_matches": data.fingerprint == ckpt["dataset"]["fingerprint"],
        **compare(
            reference,
            onnx_outputs(session, split.images, description=f"onnx fp32 · {split_name}"),
            split.labels,
        ),
    }
    require_parity(verification)
    return split, reference, verification


def _latency_rows(head, model_bytes: bytes, report: dict, timing: Timing) -> list[dict]:
    """torch eager and every onnxruntime provider, at each batch size."""
    threads, shape = report["threads"]["torch"], report_shape(report)
    verification = report["verification"]
    onnx_static = static_columns(
        report, "onnx fp32", len(model_bytes), verification["onnx_accuracy"]
    )
    torch_static = {
        **onnx_static,
        "format": "torch eager",
        "size_mb": None,
        "accuracy": verification["torch_accuracy"],
    }
    rows = [{**torch_static, **r} for r in measure_torch(head, shape, threads, timing)]
    for runtime in report["runtimes"]:
        session = make_session(model_bytes, runtime, threads)
        rows += [
            {**onnx_static, **r} for r in measure_onnx(session, shape, runtime, threads, timing)
        ]
    return rows


def _base_report(run_dir: Path, out_dir: Path, ckpt: dict, meta: dict, opset: int) -> dict:
    threads = default_threads()
    return {
        "run": str(run_dir),
        "export_dir": str(out_dir),
        "created": datetime.now().isoformat(timespec="seconds"),
        "checkpoint": {
            "path": str(run_dir / "best.pt"),
            "epoch": ckpt["epoch"],
            "best_epoch": ckpt["best_epoch"],
        },
        "exporter": "torch.onnx TorchScript exporter (dynamo=False)",
        "opset": opset,
        "versions": {
            "toolkit": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "metadata": meta,
        "threads": {"torch": threads, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1},
        "cpu": cpu_info(),
        "runtimes": runtimes(),
    }


def _write_outputs(out_dir: Path, files: dict[str, bytes], meta: dict, report: dict) -> None:
    """Models first, then model.json, then the report, which thus marks a finished export.

    The old report goes first: an export killed half-way then leaves no report beside a mix
    of new and old files, and `package` refuses the folder instead of shipping the mix.
    (Replacing the folder whole would also remove files a user keeps in an --out folder.)
    """
    try:
        (out_dir / REPORT_FILE).unlink(missing_ok=True)
        for name, payload in files.items():
            atomic_write_bytes(out_dir / name, payload)
        atomic_write_json(out_dir / METADATA_FILE, meta)
        atomic_write_json(out_dir / REPORT_FILE, report)
    except OSError as exc:
        raise ToolkitError(
            f"cannot write the export to '{out_dir}': {exc.strerror or exc}"
        ) from exc


LATENCY_COLUMNS = (
    ("format", "format"),
    ("runtime", "runtime"),
    ("accuracy", "acc"),
    ("batch", "batch"),
    ("p50_ms", "p50 (ms)"),
    ("p95_ms", "p95 (ms)"),
    ("img_per_s", "img/s"),
)


def print_report(report: dict, console: Console) -> None:
    """The export summary, the latency table and the INT8/Triton notes, as rich output."""
    v, s = report["verification"], report["stats"]
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
            f"{s['macs_per_image'] / 1e6:,.2f} M MACs/image",
        ),
        (
            "parity",
            f"{v['top1_agreement']:.2%} top-1 agreement on {v['images']:,} "
            f"{v['split']} images, max |Δlogit| {v['max_abs_logit_diff']:.2e}",
        ),
        ("accuracy", f"torch {v['torch_accuracy']:.4f}, onnx {v['onnx_accuracy']:.4f}"),
    ):
        summary.add_row(what, value)
    console.print(summary)
    threads = report["threads"]
    console.print(
        bench_table(
            report["latency"],
            f"latency ({threads['torch']} threads, {report['cpu']['model']}; accuracy on "
            f"{v['split']})",
            LATENCY_COLUMNS,
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
