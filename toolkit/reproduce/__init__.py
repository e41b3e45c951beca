"""Reproduce: the seed experiment tables, the plan (experiments × recipes as run folders),
the runner (train, evaluate, export, resumably) and the report with its notes and figures."""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "experiments": ("EXPERIMENTS", "Experiment", "Reference", "select_experiments"),
    "plan": ("RECIPE_CHOICES", "PlannedRun", "build_plan", "plan_lines", "run_state"),
    "report": ("write_report",),
    "runner": ("Outcome", "execute", "reproduce"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
