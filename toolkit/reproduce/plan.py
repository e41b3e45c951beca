"""The reproduce plan: every (experiment, recipe) of a dataset as a run folder with its fully
resolved config, the `toolkit train` command that trains it, and how far it has got.

Every planned run is a plain `toolkit train` run (`--dry-run` prints the command lines), so
anything in the report can be regenerated from its folder.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from toolkit.data import DataOptions
from toolkit.errors import ToolkitError
from toolkit.reproduce.experiments import Experiment, select_experiments
from toolkit.run.folder import read_json, read_metrics
from toolkit.run.state import best_row, current_evaluation, current_export
from toolkit.train.config import TrainConfig
from toolkit.train.fit_data import fit_to_data

RECIPE_CHOICES = ("seed", "default", "both")
_CACHE_ONLY = ("data_root", "download")  # data options that do not change the images


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
        data,
        recipe,
        model_options=experiment.options,
        epochs=epochs,
        l2=experiment.l2,
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
    """Every (experiment, recipe) of `dataset` as a planned run under OUT/runs/ (the recipes
    each experiment runs under: see Experiment.recipes).

    `epochs` overrides every recipe's epoch count, so seed and default get the same budget;
    None keeps each recipe's own (300 for the seed recipe: the reference's budget).
    `only` keeps the named experiments (see toolkit.reproduce.experiments).
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
        if r in exp.recipes
    ]


def train_command(run: PlannedRun) -> str:
    """A copy-pasteable `toolkit train ...` line that builds the same config as `run`."""
    c = run.config
    return shlex.join(
        ["toolkit", "train", c.model, *c.command_flags(), "--run-dir", str(run.run_dir)]
    )


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


def run_state(run: PlannedRun) -> RunState:
    """Read the state of `run` from its folder (nothing is loaded but small files)."""
    history = read_metrics(run.run_dir)
    best = best_row(history)
    epoch = best["epoch"] if best else 0
    config_file = run.run_dir / "config.json"
    stored = read_json(config_file) if config_file.is_file() else {}
    fingerprint = stored.get("dataset_info", {}).get("fingerprint")
    return RunState(
        epochs_done=len(history),
        # What the run set out to do: its recipe may have been fitted to the data.
        epochs=stored.get("epochs", run.config.epochs),
        best_epoch=epoch,
        # A stale evaluation or export (of an earlier best.pt, or other data) counts as missing.
        evaluated=bool(fingerprint) and bool(current_evaluation(run.run_dir, epoch, fingerprint)),
        exported=bool(fingerprint) and bool(current_export(run.run_dir, epoch, fingerprint)),
    )


def check_same_config(run: PlannedRun) -> None:
    """Refuse to resume or skip a run folder that was trained with other options."""
    path = run.run_dir / "config.json"
    if not path.is_file():
        return
    stored, config = read_json(path), run.config
    if "sizes" in stored:  # the plan, as fitting it to that run's data changed it
        config = fit_to_data(config, stored["sizes"]["train"])
    planned = asdict(config)
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
