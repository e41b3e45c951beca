"""Evaluation: a run's best.pt on its own test (or val) split, written to RUN/eval/ (metrics,
calibration and reliability diagram, classification report, confusion matrix, per-class
table, failure gallery, curves); the run's calibration (a temperature and a "not sure"
threshold fitted on val); and the comparison table across runs."""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "calibrate": ("calibrate_run",),
    "compare": ("compare_runs",),
    "evaluation": ("evaluate_run",),
    "metrics": ("compute_metrics", "select_failures"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
