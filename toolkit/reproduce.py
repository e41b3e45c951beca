"""`toolkit reproduce`: every seed experiment of a dataset, trained, evaluated, exported, reported.

    plan (experiments × recipes) ─► OUT/runs/<experiment>-<recipe>/   normal run folders:
        fit ─► evaluate_run(split="test") ─► export_run                 (each step resumable)
    ─► OUT/report.md, OUT/results.csv, OUT/*.png                        (toolkit.report)

The experiment tables and the reference's reported figures (../shared/SEED_EXPERIMENTS.md)
are data in `toolkit.experiments`. Every run is a plain `toolkit train` run (`--dry-run`
prints the equivalent command lines), so anything in the report can be regenerated from its
folder. A second call skips finished runs, continues an interrupted one exactly
(`fit(resume=...)`) and only evaluates or exports what is missing or stale.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from toolkit import recipes
from toolkit.data import DataBundle, DataOptions, load_data
from toolkit.errors import ToolkitError
from toolkit.experiments import EXPERIMENTS, Experiment, select_experiments
from toolkit.runs import read_json, read_metrics
from toolkit.train import TrainConfig, fit

if TYPE_CHECKING:  # toolkit.bench pulls in onnxruntime; only the export step needs it
    from toolkit.bench import Timing

log = logging.getLogger(__name__)

RECIPE_CHOICES = ("seed", "default", "both")
_CACHE_ONLY = ("data_root", "download")  # data options that do not change the images
EVAL_METRICS = Path("eval") / "metrics.json"  # written last by evaluate_run
EXPORT_REPORT = Path("export") / "export-report.json"  # written last by export_run

__all__ = ["EXPERIMENTS", "RECIPE_CHOICES", "PlannedRun", "build_plan", "execute", "reproduce"]


# --- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One experiment under one recipe: its run folder and its fully resolved config."""

    experiment: Experiment
    recipe: str
    run_dir: Path
    config: TrainConfig

    @property
    def name(self) -> str:
        return self.run_dir.name

    def command(self) -> str:
        """The `toolkit train` command line that trains exactly this run."""
        return train_command(self)


def recipes_for(recipe: str) -> tuple[str, ...]:
    """The recipes a `--recipe` choice runs, default first.

    Default first: its runs are short, so an interrupted invocation already has a complete
    modern table, and the long seed runs come after.
    """
    if recipe not in RECIPE_CHOICES:
        raise ToolkitError(f"unknown recipe '{recipe}'; choose one of: {', '.join(RECIPE_CHOICES)}")
    return ("default", "seed") if recipe == "both" else (recipe,)


def make_config(
    experiment: Experiment, recipe: str, data: DataOptions, epochs: int | None, device: str
) -> TrainConfig:
    """The config `toolkit train` would build for this experiment (same resolution path)."""
    return TrainConfig.from_recipe(
        experiment.model,
        recipe,
        data,
        model_options=experiment.options,
        overrides={"epochs": epochs, "l2": experiment.l2},
        device=device,
    )


def build_plan(
    dataset: str,
    recipe: str,
    out: Path,
    data: DataOptions | None = None,
    *,
    epochs: int | None = None,
    device: str = "auto",
    only: Sequence[str] | None = None,
) -> list[PlannedRun]:
    """Every (experiment, recipe) of `dataset` as a planned run under OUT/runs/.

    `epochs` overrides every recipe's epoch count, so seed and default get the same budget;
    None keeps each recipe's own (300 for the seed recipe: the reference's budget).
    `only` keeps the named experiments (see toolkit.experiments).
    """
    experiments = select_experiments(dataset, only)
    chosen = recipes_for(recipe)
    if epochs is not None and epochs < 1:
        raise ToolkitError(f"--epochs must be at least 1, got {epochs}")
    # The dataset option decides which data the runs read; a caller's DataOptions only adds
    # where the files are.
    data = replace(data or DataOptions(), dataset=dataset)
    return [
        PlannedRun(
            experiment=exp,
            recipe=r,
            run_dir=Path(out) / "runs" / f"{exp.name}-{r}",
            config=make_config(exp, r, data, epochs, device),
        )
        for r in chosen
        for exp in experiments
    ]


def train_command(run: PlannedRun) -> str:
    """A copy-pasteable `toolkit train ...` line that builds the same config as `run`."""
    c, d = run.config, run.config.data
    args = ["toolkit", "train", c.model, "--dataset", d.dataset, "--recipe", c.recipe]
    args += ["--epochs", str(c.epochs), *run.experiment.flags()]
    for flag, value in (
        ("--data-dir", d.data_dir),
        ("--splits", d.splits),
        ("--data-root", d.data_root),
        ("--image-size", d.image_size),
    ):
        if value is not None:
            args += [flag, str(value)]
    if d.val_fraction != DataOptions().val_fraction:
        args += ["--val-fraction", str(d.val_fraction)]
    if d.bad_files != DataOptions().bad_files:
        args += ["--bad-files", d.bad_files]
    if not d.download:
        args.append("--no-download")
    if c.seed != recipes.COMMON["seed"]:
        args += ["--seed", str(c.seed)]
    args += ["--device", c.device, "--run-dir", str(run.run_dir)]
    return shlex.join(args)


# --- the state of a run folder ---------------------------------------------------------------


@dataclass(frozen=True)
class RunState:
    """How far a planned run has got: epochs in metrics.csv, and whether the evaluation and
    the export describe its current best.pt."""

    epochs_done: int
    epochs: int
    best_epoch: int
    evaluated: bool
    exported: bool

    @property
    def trained(self) -> bool:
        return self.epochs_done >= self.epochs

    @property
    def finished(self) -> bool:
        return self.trained and self.evaluated and self.exported

    def describe(self) -> str:
        """What a call would do with this run, in a few words."""
        if self.finished:
            return "finished"
        if self.trained:
            missing = [
                s for s, ok in (("evaluate", self.evaluated), ("export", self.exported)) if not ok
            ]
            return f"trained; to {' and '.join(missing)}"
        if self.epochs_done:
            return f"interrupted at {self.epochs_done}/{self.epochs} epochs; resumes"
        return "new"


def best_epoch(history: list[dict]) -> int:
    """The epoch best.pt holds: the first one with the highest val acc, chosen as fit does."""
    best_acc, epoch = 0.0, 0
    for row in history:
        if row["val_acc"] > best_acc:
            best_acc, epoch = row["val_acc"], row["epoch"]
    return epoch


def _describes_epoch(path: Path, epoch: int, *keys: str) -> bool:
    """Whether the JSON file at `path` exists and records `epoch` under the nested `keys`."""
    if not path.is_file():
        return False
    value = read_json(path)
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value == epoch


def run_state(run: PlannedRun) -> RunState:
    """Read the state of `run` from its folder (nothing is loaded but small files)."""
    history = read_metrics(run.run_dir)
    best = best_epoch(history)
    return RunState(
        epochs_done=len(history),
        epochs=run.config.epochs,
        best_epoch=best,
        # A stale evaluation or export (of an earlier best.pt) counts as missing.
        evaluated=_describes_epoch(run.run_dir / EVAL_METRICS, best, "checkpoint_epoch"),
        exported=_describes_epoch(run.run_dir / EXPORT_REPORT, best, "checkpoint", "epoch"),
    )


def check_same_config(run: PlannedRun) -> None:
    """Refuse to resume or skip a run folder that was trained with other options."""
    path = run.run_dir / "config.json"
    if not path.is_file():
        return
    stored, planned = read_json(path), asdict(run.config)
    # Folders written before a data option existed hold its default.
    stored["data"] = {**asdict(DataOptions()), **stored.get("data", {})}
    # Neither the device nor where the decoded cache lives changes what is trained (fit checks
    # the data's fingerprint on resume); every other option does.
    for config in (stored, planned):
        config["data"] = {k: v for k, v in config["data"].items() if k not in _CACHE_ONLY}
    differing = sorted(k for k in planned if k != "device" and stored.get(k) != planned[k])
    if differing:
        raise ToolkitError(
            f"'{run.run_dir}' was trained with other options ({', '.join(differing)} differ); "
            "pass another --out, or delete that run folder to retrain it"
        )


def plan_lines(plan: Sequence[PlannedRun]) -> list[str]:
    """The dry-run listing: per run a comment line (experiment, recipe, state), its command."""
    lines = []
    for n, run in enumerate(plan, 1):
        exp, state = run.experiment, run_state(run)
        status = state.describe()
        if state.epochs_done:
            try:
                check_same_config(run)
            except ToolkitError as exc:  # the real call would stop here: say so in the plan
                status = f"refused: {exc}"
        lines.append(
            f"# [{n}/{len(plan)}] {run.name}: {exp.label()}, {run.recipe} recipe, "
            f"{run.config.epochs} epochs, reference: {exp.reference.text()} ({status})"
        )
        lines.append(run.command())
    return lines


# --- running ---------------------------------------------------------------------------------


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
        result = fit(run.config, resume=run.run_dir, data=bundle)
    else:
        log.info("%s: training %d epochs (%s recipe)", tag, run.config.epochs, run.recipe)
        result = fit(run.config, run_dir=run.run_dir, data=bundle)
    return not result.interrupted


def _require_best_checkpoint(run: PlannedRun) -> None:
    # fit writes best.pt only when val accuracy rises above 0, so a run stuck at 0 has none.
    if not (run.run_dir / "best.pt").is_file():
        raise ToolkitError(
            f"{run.name}: val accuracy stayed at 0 in every epoch, so there is no best.pt to "
            "evaluate; check the data, or train longer (--epochs)"
        )


def execute(plan: Sequence[PlannedRun], out: Path, *, timing: Timing | None = None) -> Outcome:
    """Train, evaluate (test split, once) and export every planned run, then write the report.

    Finished runs are skipped, interrupted ones resumed. A Ctrl-C during training stops the
    plan there (the report covers what is finished); the same call continues it. `timing`
    (toolkit.bench.Timing) is passed to export_run for its latency measurements.
    """
    from toolkit.evaluate import evaluate_run
    from toolkit.export import export_run
    from toolkit.report import write_report  # report imports this module: import at call time

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
            _require_best_checkpoint(run)
        else:
            outcome.completed.append(run.name)
        if fresh or not state.evaluated:
            bundle = data.get(run.config)
            evaluate_run(run.run_dir, split="test", device=run.config.device, data=bundle)
        if fresh or not state.exported:
            export_run(run.run_dir, timing=timing)
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
