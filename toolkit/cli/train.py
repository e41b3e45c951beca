"""Training and its results: `toolkit train`, `evaluate`, `compare` and `reproduce`
(registered by toolkit.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.cli.options import with_declared_options
from toolkit.cli.output import (
    console,
    friendly_errors,
    refuse_options_besides,
    summary_table,
    table,
)
from toolkit.data.specs import DataOptions
from toolkit.errors import ToolkitError
from toolkit.options import declared, given_values
from toolkit.train.config import ModelOptions, TrainConfig


@friendly_errors
@with_declared_options(declared(DataOptions), declared(TrainConfig), declared(ModelOptions))
def train_cmd(
    ctx: typer.Context,
    model: str = typer.Argument(None, help="Model name (see `toolkit models`)."),
    run_dir: Path = typer.Option(None, help="Run folder (default runs/<dataset>-<model>-<time>)."),
    resume: Path = typer.Option(None, help="Continue the run in this folder exactly."),
    **flags,
):
    """Train MODEL into a run folder (config, metrics, TensorBoard, best.pt, last.pt)."""
    from toolkit.train.trainer import fit
    from toolkit.train.trainer import resume as resume_run

    if resume is not None:
        refuse_options_besides(ctx, "resume", why="--resume continues a run with its own options")
        result = resume_run(resume)
    else:
        if model is None:
            raise ToolkitError(
                "name a model to train, e.g. `toolkit train net` (see `toolkit models`)"
            )
        result = fit(TrainConfig.from_options(model, **flags), run_dir=run_dir)
    if not result.is_main:  # under torchrun only rank 0 reports
        return
    console.print(
        summary_table(
            "run summary",
            {
                "run": str(result.run_dir),
                "best val acc": result.best_val_acc,
                "best epoch": result.best_epoch,
                "epochs": result.epochs_done,
                "train time (s)": result.train_seconds,
                "params": result.num_params,
                "checkpoint (KB)": result.checkpoint_bytes / 1024,
            },
        )
    )
    if result.interrupted:
        console.print(
            f"interrupted; continue with: toolkit train --resume {result.run_dir}", soft_wrap=True
        )
        raise typer.Exit(130)
    _say_if_learned_nothing(result.learned_nothing, "on val")
    console.print(f"next: toolkit evaluate {result.run_dir}", soft_wrap=True)


def _say_if_learned_nothing(verdict: str | None, where: str) -> None:
    if verdict:
        message = f"no sign this model learned anything: {where} {verdict}"
        console.print(f"[bold red]{message}[/bold red]")


@friendly_errors
def evaluate_cmd(
    run: Path = typer.Argument(None, help="Run folder (default: the latest under runs/)."),
    split: str = typer.Option("test", help="test or val."),
    device: str = typer.Option("auto"),
):
    """Evaluate RUN/best.pt: report, confusion matrix, failure gallery, curves -> RUN/eval/."""
    from toolkit.evaluate import evaluate_run
    from toolkit.run.folder import resolve_run

    summary = evaluate_run(resolve_run(run), split=split, device=device)
    c = summary["calibration"]
    raw, calibrated, selective = c["raw"], c["calibrated"], c["selective"]
    threshold = selective["threshold"]
    console.print(
        summary_table(
            "evaluation",
            {
                "run": summary["run"],
                "split": summary["split"],
                "images": summary["n"],
                "accuracy": summary["accuracy"],
                "top-5 accuracy": summary["top5_accuracy"] or "— (5 classes or fewer)",
                **_tta_row(summary.get("tta")),
                **_audit_rows(summary["audit"]),
                "loss": summary["loss"],
                "macro F1": summary["macro_f1"],
                "calibration (fitted on val)": c.get("description") or c["method"],
                "ECE raw → calibrated": f"{raw['ece']:.2%} → {calibrated['ece']:.2%}",
                "not sure below": "never" if threshold is None else f"{threshold:.3f}",
                f"kept (target {selective['target_accuracy']:.0%})": _kept(selective),
            },
        )
    )
    _say_if_learned_nothing(summary["learned_nothing"], f"on {summary['split']}")
    if summary["data"]["split_is_carved"]:
        console.print(
            f"[yellow]the {summary['split']} images were held out from train (the data has no "
            f"{summary['split']} split); say so when quoting this accuracy[/yellow]"
        )
    console.print(f"reports written to {summary['eval_dir']}")


def _audit_rows(audit: dict) -> dict:
    """The accuracy without the images a data audit flagged, or that none was run."""
    if audit["audit"] is None:
        return {"data audit": audit["note"]}
    excluded = audit["excluded"]
    without = {
        f"accuracy{' with TTA' if name == 'tta' else ''} without flagged": a["without_flagged"]
        for name, a in audit["accuracy"].items()
    }
    return {
        "data audit": audit["audit"],
        "flagged (excluded below)": f"{excluded['total']:,} ({excluded['leaked_from_train']:,} "
        f"repeat a train image, {excluded['label_doubted']:,} doubtful labels)",
        **without,
    }


def _tta_row(tta: dict | None) -> dict:
    if not tta or not tta.get("level"):
        return {}
    return {f"accuracy with TTA ({tta['views']} views)": tta["accuracy"]}


def _kept(selective: dict) -> str:
    if selective["accuracy"] is None:
        return "none"
    return f"{selective['coverage']:.1%} of the images, {selective['accuracy']:.2%} accurate"


@friendly_errors
def compare_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare."),
    out: Path = typer.Option(None, help="Write comparison.md and comparison.csv here."),
):
    """Compare runs: params, checkpoint size, epochs, train time, best val acc, test acc."""
    from toolkit.evaluate import compare_runs

    rows = compare_runs(runs, out_dir=out)
    console.print(table("comparison", rows))


@friendly_errors
@with_declared_options(declared(DataOptions))
def reproduce_cmd(
    recipe: str = typer.Option("both", help="seed, default or both (both: time-to-reference)."),
    epochs: int = typer.Option(None, help="Epochs of every run (default: each recipe's own)."),
    out: Path = typer.Option(None, help="Report folder (default reports/<dataset>)."),
    only: list[str] = typer.Option(None, help="Only these experiments (repeat the option)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, train nothing."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    **flags,
):
    """Every seed experiment of DATASET: train, evaluate, export, then OUT/report.md."""
    import csv

    from toolkit.reproduce import build_plan, execute, plan_lines

    data = DataOptions(**given_values(declared(DataOptions), flags))
    out = out or Path("reports") / data.dataset
    plan = build_plan(data.dataset, recipe, out, data, epochs=epochs, device=device, only=only)
    if dry_run:
        for line in plan_lines(plan):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
        return
    outcome = execute(plan, out)
    with open(out / "results.csv", newline="") as f:
        rows = [
            {k: float(v) if k.endswith("acc") and v else v for k, v in r.items()}
            for r in csv.DictReader(f)
        ]
    columns = ["experiment", "recipe", "epochs", "best_val_acc", "test_acc", "reference_acc"]
    console.print(table("reproduce results", rows, columns))
    console.print(f"report: {outcome.report}", highlight=False, soft_wrap=True)
    if outcome.interrupted:
        console.print(f"interrupted in {outcome.interrupted}; run the same command to continue")
        raise typer.Exit(130)
