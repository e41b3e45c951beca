"""`toolkit reproduce`: every seed experiment of a dataset, trained, evaluated, exported, reported.

    plan (experiments × recipes) ─► OUT/runs/<experiment>-<recipe>/   normal run folders:
        fit ─► evaluate_run(split="test") ─► export_run                 (each step resumable)
    ─► OUT/report.md, OUT/results.csv, OUT/*.png                        (reproduce.report)

The experiment tables and the reference's reported figures (../shared/SEED_EXPERIMENTS.md)
are data in `toolkit.reproduce.experiments`. A second call skips finished runs, continues an
interrupted one exactly (`resume`) and only evaluates or exports what is missing or stale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data import DataBundle, DataOptions, load_data
from toolkit.evaluate.evaluation import evaluate_run
from toolkit.export.bench import Timing
from toolkit.export.exporter import export_run
from toolkit.reproduce.plan import PlannedRun, RunState, build_plan, check_same_config, run_state
from toolkit.reproduce.report import write_report
from toolkit.train.config import TrainConfig
from toolkit.train.trainer import fit, resume

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What one `execute` call did, by run name."""

    trained: list[str] = field(default_factory=list)
    resumed: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)  # only evaluated and/or exported now
    skipped: list[str] = field(default_factory=list)
    interrupted: str | None = None
    report: Path | None = None


class _Data:
    """The plan's data, decoded once and only when some run needs it (all runs share it)."""

    def __init__(self) -> None:
        self.bundle: DataBundle | None = None

    def get(self, config: TrainConfig) -> DataBundle:
        if self.bundle is None:
            self.bundle = load_data(config.data, seed=config.seed)
        return self.bundle


def _train(run: PlannedRun, state: RunState, data: _Data, tag: str) -> bool:
    """Train or continue `run`; False when the user interrupted it."""
    bundle = data.get(run.config)
    if state.epochs_done:
        log.info("%s: resuming at epoch %d/%d", tag, state.epochs_done + 1, state.epochs)
        result = resume(run.run_dir, data=bundle)
    else:
        log.info("%s: training %d epochs (%s recipe)", tag, run.config.epochs, run.recipe)
        result = fit(run.config, run_dir=run.run_dir, data=bundle)
    return not result.interrupted


def execute(plan: Sequence[PlannedRun], out: Path, *, timing: Timing | None = None) -> Outcome:
    """Train, evaluate (test split, once) and export every planned run, then write the report.

    Finished runs are skipped, interrupted ones resumed. A Ctrl-C during training stops the
    plan there (the report covers what is finished); the same call continues it. `timing`
    (toolkit.export.Timing) is passed to export_run for its latency measurements.
    """
    outcome, data = Outcome(), _Data()
    for n, run in enumerate(plan, 1):
        tag = f"[{n}/{len(plan)}] {run.name}"
        state = run_state(run)
        if state.epochs_done:
            check_same_config(run)
        if state.finished:
            log.info("%s: finished, skipping", tag)
            outcome.skipped.append(run.name)
            continue
        fresh = not state.trained  # a newly trained best.pt needs a new evaluation and export
        if fresh:
            if not _train(run, state, data, tag):
                outcome.interrupted = run.name
                break
            (outcome.resumed if state.epochs_done else outcome.trained).append(run.name)
        else:
            outcome.completed.append(run.name)
        if fresh or not state.evaluated:
            bundle = data.get(run.config)
            evaluate_run(run.run_dir, split="test", device=run.config.device, data=bundle)
        if fresh or not state.exported:
            # A model trained with TTA is served with it (speedrun): its views in the graph.
            export_run(run.run_dir, timing=timing, tta=bool(run.config.tta))
    outcome.report = write_report(plan, Path(out))
    return outcome


def reproduce(
    dataset: str = "cifar10",
    recipe: str = "both",
    out: Path | None = None,
    data: DataOptions | None = None,
    *,
    epochs: int | None = None,
    device: str = "auto",
    only: Sequence[str] | None = None,
    timing: Timing | None = None,
) -> Outcome:
    """Plan and run every experiment of `dataset` into `out` (default reports/<dataset>);
    see build_plan and execute."""
    out = Path(out) if out is not None else Path("reports") / dataset
    plan = build_plan(dataset, recipe, out, data, epochs=epochs, device=device, only=only)
    return execute(plan, out, timing=timing)
