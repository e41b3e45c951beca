"""`toolkit export`: RUN/best.pt -> a verified, self-describing ONNX model plus its numbers.

    best.pt ─► classifier ─► ONNX (+ metadata) ─► parity on the run's own test split
                                                ─► size / params / MACs / latency
                                                ─► (--int8, --fp16, --triton)
                                                ─► RUN/export/: model.onnx, model.json,
                                                   export-report.json (written last)

Each step returns its values and the report is assembled once from them at the end. Every
model is built and verified in memory first and written only when it passed, each file
through a temporary name and a rename: a failed export leaves no new model.onnx behind.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime
from pathlib import Path

import onnx
import onnxruntime as ort
import torch

from toolkit.atomic import atomic_write_bytes, atomic_write_json
from toolkit.errors import ToolkitError
from toolkit.evaluate.calibrate import calibrate_run
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export.bench import (
    CPU,
    DEFAULT_TIMING,
    LATENCY_IMAGES,
    LatencyPlan,
    Timing,
    cpu_info,
    cuda_provider_usable,
    default_threads,
    make_session,
    measure_onnx,
    measure_torch,
    runtimes,
)
from toolkit.export.onnx_graph import (
    EXPORTER,
    ExportHead,
    build_metadata,
    count_macs,
    export_classifier,
)
from toolkit.export.opset import check_opset, selective_opset
from toolkit.export.parity import (
    check_parity,
    compare,
    evaluation_split,
    onnx_outputs,
    torch_outputs,
)
from toolkit.export.quantize import fp16_variant, int8_variant
from toolkit.export.triton import write_triton_repo
from toolkit.models import count_parameters
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import check_writable
from toolkit.run.state import EXPORT_DIR, EXPORT_REPORT, current_evaluation, load_run_data
from toolkit.tta import TTAClassifier
from toolkit.version import __version__

log = logging.getLogger(__name__)

ONNX_FILE, METADATA_FILE = "model.onnx", "model.json"


def export_run(
    run_dir: Path,
    out_dir: Path | None = None,
    *,
    int8: bool = False,
    fp16: bool = False,
    triton_dir: Path | None = None,
    opset: int | None = None,
    timing: Timing | None = None,
    tta: bool = False,
) -> dict:
    """Export RUN/best.pt to ONNX, verify it on the run's test split, measure it; the report.

    `timing` (how long latencies are measured) defaults to bench.DEFAULT_TIMING. `tta` puts
    the run's test-time augmentation (its --tta level, selective with --tta-below) inside the
    graph: the logits are the average over the views, as `toolkit evaluate` reports them.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / EXPORT_DIR
    # Every check a user can fail comes before the slow work.
    requested_opset, opset = opset, check_opset(opset)
    if fp16 and not cuda_provider_usable():
        raise ToolkitError(
            "--fp16 needs onnxruntime's CUDA provider on a visible GPU, and none "
            "is usable here; export without --fp16 (or on a GPU machine)"
        )
    ckpt = Checkpoint.load(run_dir / "best.pt")
    tta_level = int(ckpt.config.get("tta", 0)) if tta else 0
    if tta and not tta_level:
        raise ToolkitError(
            f"'{run_dir}' was trained with --tta 0: its evaluation has no TTA accuracy to "
            "serve; export without --tta"
        )
    below = float(ckpt.config.get("tta_below", 1.0)) if tta_level else 1.0
    if below < 1.0:
        opset = selective_opset(requested_opset, opset)
    check_writable(out_dir, "export folder", "--out")
    if triton_dir is not None:
        check_writable(Path(triton_dir), "Triton folder", "--triton")
    data = load_run_data(run_dir, ckpt)
    # Fitted on val, on the logits the graph serves: averaged over the TTA views with --tta.
    calibration = calibrate_run(run_dir, ckpt, data, device="cpu", tta=tta_level, below=below)

    classifier = ckpt.build_classifier()
    if tta_level:
        classifier = TTAClassifier(classifier, tta_level, below)
    head = ExportHead(classifier, Calibrator.from_record(calibration)).eval()
    test_accuracy = _test_accuracy(run_dir, ckpt, tta_level, below)
    meta = build_metadata(ckpt, count_parameters(head), test_accuracy, calibration)
    if tta_level:  # the logits are the average over these views (toolkit.tta)
        meta["tta"] = tta_level
    if below < 1.0:  # ... for the images whose plain top-1 probability is below this
        meta["tta_below"] = below
    shape = (int(ckpt.model["in_channels"]), *meta["input_size"])
    model = export_classifier(head, shape, meta, opset)
    model_bytes = model.SerializeToString()

    threads, cpu = default_threads(), cpu_info()
    split_name, split = evaluation_split(data)
    # With TTA every image is several in the graph: fewer per call keeps the memory the same.
    views = classifier.views if tta_level else 1
    reference = torch_outputs(
        head, split.images, threads, batch=1000 // views, description=f"torch · {split_name}"
    )
    session = make_session(model_bytes, CPU, threads)
    candidate = onnx_outputs(
        session, split.images, batch=500 // views, description=f"onnx fp32 · {split_name}"
    )
    verification = check_parity(compare(reference, candidate, split.labels), split_name, len(split))

    stats = {
        "size_mb": len(model_bytes) / 1e6,
        "params": meta["num_params"],
        "macs_per_image": count_macs(model),
        "input_shape": list(shape),
    }
    plan = LatencyPlan(
        threads=threads,
        input_shape=shape,
        timing=timing or DEFAULT_TIMING,
        model=meta["model"],
        params=stats["params"],
        macs=stats["macs_per_image"],
        images=split.images[:LATENCY_IMAGES].float().div(255).numpy(),
    )
    latency = _latency_rows(head, model_bytes, verification, plan)
    fp32 = {**verification, "latency": latency, "size_bytes": len(model_bytes)}
    variants = []
    if int8:
        train, val = data.train.images, data.val
        variants.append(int8_variant(model, train, val, split, reference, fp32, cpu, plan))
    if fp16:
        variants.append(fp16_variant(model, split, reference, fp32, plan))
    files = {ONNX_FILE: model_bytes, **{v.file: v.payload for v in variants}}

    report = {
        "run": str(run_dir),
        "export_dir": str(out_dir),
        "created": datetime.now().isoformat(timespec="seconds"),
        "checkpoint": {
            "path": str(run_dir / "best.pt"),
            "epoch": ckpt.epoch,
            "best_epoch": ckpt.best_epoch,
            "fingerprint": ckpt.fingerprint,
        },
        "exporter": EXPORTER,
        "opset": opset,
        "versions": {
            "toolkit": __version__,
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
        },
        "metadata": meta,
        "threads": {"torch": threads, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1},
        "cpu": cpu,
        "runtimes": runtimes(),
        "verification": verification,
        "stats": stats,
        "latency": latency + [row for v in variants for row in v.latency],
        **{v.name: v.section for v in variants},
        "files": [*files, METADATA_FILE, EXPORT_REPORT],
        "onnx_sha256": hashlib.sha256(model_bytes).hexdigest(),
    }
    if triton_dir is not None:
        report["triton"] = write_triton_repo(Path(triton_dir), model_bytes, meta)
    _write_outputs(out_dir, files, meta, report)
    log.info("exported %s to %s", run_dir, out_dir)
    return report


def _test_accuracy(
    run_dir: Path, ckpt: Checkpoint, tta: int = 0, below: float = 1.0
) -> float | None:
    """The test accuracy `toolkit evaluate` measured on this very best.pt, if it did (with
    the TTA the graph has, when it has some)."""
    record = current_evaluation(run_dir, ckpt.epoch, ckpt.fingerprint)
    if record is None:
        log.warning(
            "no evaluation of this best.pt on the test split; the model's metadata gets no "
            "test_accuracy (run `toolkit evaluate %s` first)",
            run_dir,
        )
        return None
    if not tta:
        return float(record["accuracy"])
    evaluated = record.get("tta") or {}
    accuracy = evaluated.get("accuracy")
    if evaluated.get("below", 1.0) != below:  # another TTA than the graph's
        accuracy = None
    if accuracy is None:
        log.warning(
            "the evaluation of %s has no TTA accuracy; run `toolkit evaluate` again", run_dir
        )
    return None if accuracy is None else float(accuracy)


def _latency_rows(head, model_bytes: bytes, verification: dict, plan: LatencyPlan) -> list:
    """torch eager and every onnxruntime provider, at each batch size."""
    shape, threads, timing, images = plan.input_shape, plan.threads, plan.timing, plan.images
    rows = plan.rows(
        "torch eager",
        None,
        verification["torch_accuracy"],
        measure_torch(head, shape, threads, timing, images=images),
    )
    for runtime in runtimes():
        session = make_session(model_bytes, runtime, threads)
        measured = measure_onnx(session, shape, runtime, threads, timing, images=images)
        rows += plan.rows("onnx fp32", len(model_bytes), verification["onnx_accuracy"], measured)
    return rows


def _write_outputs(out_dir: Path, files: dict[str, bytes], meta: dict, report: dict) -> None:
    """Models first, then model.json, then the report, which thus marks a finished export.

    The old report goes first: an export killed half-way then leaves no report beside a mix
    of new and old files, and `package` refuses the folder instead of shipping the mix.
    (Replacing the folder whole would also remove files a user keeps in an --out folder.)
    """
    try:
        (out_dir / EXPORT_REPORT).unlink(missing_ok=True)
        for name, payload in files.items():
            atomic_write_bytes(out_dir / name, payload)
        atomic_write_json(out_dir / METADATA_FILE, meta)
        atomic_write_json(out_dir / EXPORT_REPORT, report)
    except OSError as exc:
        raise ToolkitError(
            f"cannot write the export to '{out_dir}': {exc.strerror or exc}"
        ) from exc
