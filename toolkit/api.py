"""The toolkit from Python (a notebook, a script): each command line step as one function.

    from toolkit.api import audit, train, evaluate, export, predict

    checked = audit("my_images")                             # toolkit audit my_images
    run = train("lenet5", data_dir="my_images", epochs=10)  # toolkit train lenet5 --data-dir ...
    report = evaluate(run)                                   # toolkit evaluate RUN
    exported = export(run)                                   # toolkit export RUN
    rows = predict(["photos/"], model=run)                   # toolkit predict photos/ --model RUN

Each is a thin call into the code the CLI runs, with the same options by the same names
(`--l2 0.01` is `l2=0.01`), the same files written and the same errors (ToolkitError, whose
message names the fix). A run is passed on as what `train` returned or as its folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

if TYPE_CHECKING:  # importing this module loads no torch: predict() needs none
    from toolkit.train.trainer import RunResult

Run = Union["RunResult", str, Path]


def audit(data_dir: str | Path | None = None, **options):
    """Audit a class-folder tree (or `splits=`, `dataset=`): duplicates across splits, label
    errors, outliers, odd and unreadable images; `options` are `toolkit audit`'s flags by
    field name (out=..., model=..., folds=..., write_splits=...). Returns the AuditResult:
    its `folder` (issues.csv, summary.json, report.html), `summary` and `findings`."""
    from toolkit.audit import AuditOptions, audit_data
    from toolkit.data import DataOptions
    from toolkit.options import declared

    audit_fields = {o.name for o in declared(AuditOptions)}
    data = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    data = {k: v for k, v in data.items() if k not in audit_fields}
    if data_dir is not None:
        data["data_dir"] = str(Path(data_dir).resolve())
    given = {k: str(v) if isinstance(v, Path) else v for k, v in options.items()}
    chosen = AuditOptions(**{k: v for k, v in given.items() if k in audit_fields})
    return audit_data(DataOptions(**data), chosen)


def train(model: str, run_dir: str | Path | None = None, **options) -> RunResult:
    """Train `model` (see `toolkit models`); `options` are `toolkit train`'s flags by field
    name: data_dir=..., epochs=..., l2=..., init_from=... The summary holds `run_dir`."""
    from toolkit.train.config import TrainConfig
    from toolkit.train.trainer import fit

    return fit(TrainConfig.from_options(model, **options), run_dir=run_dir)


def resume(run: Run) -> RunResult:
    """Continue an interrupted run exactly, with its own options."""
    from toolkit.train.trainer import resume as resume_run

    return resume_run(run_folder(run))


def evaluate(run: Run, split: str = "test", device: str = "auto") -> dict:
    """Evaluate the run's best.pt on `split` (writes RUN/eval/); the metrics summary."""
    from toolkit.evaluate import evaluate_run

    return evaluate_run(run_folder(run), split=split, device=device)


def export(run: Run, out_dir: str | Path | None = None, **options) -> dict:
    """Export the run to verified ONNX (writes RUN/export/ or `out_dir`); the export report.
    `options`: int8, fp16, triton_dir, opset, as `toolkit export` takes them."""
    from toolkit.export import export_run

    return export_run(run_folder(run), Path(out_dir) if out_dir else None, **options)


def predict(sources: Sequence[str | Path], model: Run | None = None, **options) -> list:
    """Classify image files, folders (recursively) and globs with an exported model (a run,
    an artifacts folder or a .onnx file; default: the best shipped model); one Prediction per
    file, a skipped one with its `error` set (`.ok` is False). `options`: top_k, batch_size,
    as `toolkit predict` takes them."""
    from toolkit.predict import predict as predict_images

    chosen = run_folder(model) if model is not None else None
    return predict_images([str(s) for s in sources], model=chosen, **options)


def run_folder(run: Run) -> Path:
    """A run's folder, from what `train` returned or from its path."""
    return Path(getattr(run, "run_dir", run))
