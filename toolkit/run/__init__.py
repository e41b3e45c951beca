"""The run folder, the unit of work: its layout and small files, the one checkpoint type,
resuming after a kill, and the run's state (best epoch, is eval/ current, its own data)."""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "checkpoint": ("Checkpoint",),
    "folder": (
        "DEFAULT_RUNS_ROOT",
        "METRIC_COLUMNS",
        "latest_run",
        "new_run_dir",
        "read_json",
        "read_metrics",
        "resolve_run",
        "write_csv_rows",
    ),
    "resume": ("load_resume_state", "repair_run_folder"),
    "state": (
        "EVAL_DIRS",
        "best_row",
        "check_run_data",
        "current_evaluation",
        "current_export",
        "load_run_data",
    ),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
