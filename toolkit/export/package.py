"""Copy what the serving app needs from a finished run into an artifacts folder.

    artifacts/<dataset>-<model>/
        model.onnx  model.json  export-report.json     from RUN/export/
        metrics.json  confusion_matrix.png             from RUN/eval/
        reliability_diagram.png                        from RUN/eval/
        failures.json  failures/<index>.png            from RUN/eval/ (known failure examples)
    artifacts/examples/<dataset>/<class>_<n>.png       a few real test images per dataset

The serving app reads only this layout, so it never needs torch or the run folder. With
variant="int8" the export's model.int8.onnx is packaged as the folder's model.onnx, and its
model.json carries the INT8 model's own test accuracy (the export measured it), its own
calibration (metrics.json's calibration too) and "precision": "int8", so the model card shows
the INT8 model's agreement with torch and its own probabilities' figures.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from toolkit.atomic import atomic_folder, atomic_write_json, remove_stale_temp
from toolkit.errors import ToolkitError
from toolkit.export.onnx_graph import calibration_metadata
from toolkit.export.quantize import INT8_FILE
from toolkit.run.folder import read_json

EXPORT_FILES = ("model.onnx", "model.json", "export-report.json")
EVAL_FILES = ("metrics.json", "confusion_matrix.png", "reliability_diagram.png", "failures.json")


def package_run(
    run_dir: Path, artifacts_dir: Path, name: str | None = None, variant: str | None = None
) -> Path:
    """Copy RUN/export and RUN/eval outputs into artifacts_dir/name; returns that folder.
    `variant` "int8" ships the export's INT8 model instead of the fp32 one (by default in
    <dataset>-<model>-int8, beside the fp32 one)."""
    run_dir, artifacts_dir = Path(run_dir), Path(artifacts_dir)
    if variant not in (None, "int8"):
        raise ValueError(f"unknown variant {variant!r}: None or 'int8'")
    sources = [run_dir / "export" / f for f in EXPORT_FILES]
    if variant:
        sources.append(run_dir / "export" / INT8_FILE)
    sources += [run_dir / "eval" / f for f in EVAL_FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    export = f"`toolkit export {run_dir}{' --int8' if variant else ''}`"
    report = run_dir / "export" / "export-report.json"
    # The report says what the export made: an INT8 file beside a report without one is left
    # from an earlier export.
    if variant and report.is_file() and not isinstance(read_json(report).get("int8"), dict):
        raise ToolkitError(f"'{run_dir}' was exported without an INT8 model; run {export}")
    if missing:
        raise ToolkitError(
            f"cannot package '{run_dir}': missing {', '.join(missing)}; run "
            f"`toolkit evaluate {run_dir}` and {export} first"
        )
    _check_export_is_whole(run_dir / "export")
    if name is None:
        meta = read_json(run_dir / "export" / "model.json")
        name = f"{meta['dataset']}-{meta['model']}" + (f"-{variant}" if variant else "")
    target = artifacts_dir / name
    remove_stale_temp(artifacts_dir, name)  # what a killed package of this model left behind
    # Filled beside the target and swapped in whole, so a half-copied folder is never served.
    with atomic_folder(target) as staging:
        for path in sources:
            shutil.copy2(path, staging / path.name)
        if variant:
            _swap_in_int8(staging)
        failures = run_dir / "eval" / "failures"
        if failures.is_dir():
            shutil.copytree(failures, staging / "failures")
    return target


def _swap_in_int8(folder: Path) -> None:
    """The INT8 model becomes the folder's model.onnx, described by its own accuracy."""
    int8 = read_json(folder / "export-report.json")["int8"]  # package_run checked it is there
    (folder / INT8_FILE).replace(folder / "model.onnx")
    meta = read_json(folder / "model.json")
    meta = {**meta, "test_accuracy": int8["accuracy"], "precision": "int8"}
    # Its own calibrator (toolkit.export.quantize): the card's figures are the INT8 model's.
    own = int8.get("calibration")
    if own:
        meta.update(calibration_metadata(own["fitted"]))
        metrics = read_json(folder / "metrics.json")
        atomic_write_json(folder / "metrics.json", {**metrics, "calibration": own["test"]})
    atomic_write_json(folder / "model.json", meta)


def _check_export_is_whole(export_dir: Path) -> None:
    """model.onnx must be the model its report verified: an export interrupted, or a file
    edited or copied in since, would ship figures that describe another model."""
    report = read_json(export_dir / "export-report.json")
    digest = hashlib.sha256((export_dir / "model.onnx").read_bytes()).hexdigest()
    expected = report.get("onnx_sha256") if isinstance(report, dict) else None
    if digest != expected:
        raise ToolkitError(
            f"'{export_dir / 'model.onnx'}' is not the model that export-report.json "
            f"describes (changed since, or an interrupted export); run "
            f"`toolkit export {export_dir.parent}` again"
        )
