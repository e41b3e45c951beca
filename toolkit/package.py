"""Copy what the serving app needs from a finished run into an artifacts folder.

    artifacts/<dataset>-<model>/
        model.onnx  model.json  export-report.json     from RUN/export/
        metrics.json  confusion_matrix.png             from RUN/eval/
        failures.json  failures/<index>.png            from RUN/eval/ (known failure examples)
    artifacts/examples/<dataset>/<class>_<n>.png       a few real test images per dataset

The serving app reads only this layout, so it never needs torch or the run folder.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from toolkit.errors import ToolkitError

EXPORT_FILES = ("model.onnx", "model.json", "export-report.json")
EVAL_FILES = ("metrics.json", "confusion_matrix.png", "failures.json")


def package_run(run_dir: Path, artifacts_dir: Path, name: str | None = None) -> Path:
    """Copy RUN/export and RUN/eval outputs into artifacts_dir/name; returns that folder."""
    run_dir, artifacts_dir = Path(run_dir), Path(artifacts_dir)
    sources = [run_dir / "export" / f for f in EXPORT_FILES]
    sources += [run_dir / "eval" / f for f in EVAL_FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise ToolkitError(
            f"cannot package '{run_dir}': missing {', '.join(missing)}; run "
            f"`toolkit evaluate {run_dir}` and `toolkit export {run_dir}` first"
        )
    if name is None:
        import json

        meta = json.loads((run_dir / "export" / "model.json").read_text())
        name = f"{meta['dataset']}-{meta['model']}"
    target = artifacts_dir / name
    staging = artifacts_dir / f".{name}.staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for path in sources:
        shutil.copy2(path, staging / path.name)
    failures = run_dir / "eval" / "failures"
    if failures.is_dir():
        shutil.copytree(failures, staging / "failures")
    # Swap in one step so a half-copied folder is never served.
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return target
