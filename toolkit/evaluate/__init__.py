"""Evaluation: a run's best.pt on its own test (or val) split, written to RUN/eval/ (metrics,
classification report, confusion matrix, per-class table, failure gallery, curves), and the
comparison table across runs."""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "compare": ("compare_runs",),
    "evaluation": ("evaluate_run",),
    "metrics": ("compute_metrics", "select_failures"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
