"""The `toolkit` command: thin verbs that parse options and call the library.

Errors a user can cause arrive as ToolkitError and leave as one red line with exit code 2.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from toolkit.cli_audit import audit_cmd
from toolkit.cli_options import BareValueGroup, with_declared_options
from toolkit.cli_output import (
    console,
    err_console,
    friendly_errors,
    refuse_options_besides,
    summary_table,
    table,
)
from toolkit.data.specs import DataOptions
from toolkit.errors import ToolkitError
from toolkit.options import declared, given_values
from toolkit.train.config import ModelOptions, TrainConfig

app = typer.Typer(
    cls=BareValueGroup,
    help="Train, honestly evaluate, export to ONNX and serve small image classifiers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log library details.")):
    # Log records go through rich so they print above live progress bars, not through them.
    from rich import get_console
    from rich.logging import RichHandler

    handler = RichHandler(console=get_console(), show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s")
    logging.getLogger("toolkit").setLevel(logging.DEBUG if verbose else logging.INFO)


# --- models ----------------------------------------------------------------------------------


@app.command("models")
@friendly_errors
def models_cmd(
    image_size: int = typer.Option(32, help="Input size used for the parameter counts."),
    num_classes: int = typer.Option(10),
    backbones: bool = typer.Option(
        False, help="Also measure a curated table of CPU-friendly timm backbones (~20 s)."
    ),
    backbone_size: int = typer.Option(64, help="Input size of the backbones' MACs."),
):
    """List the registered models (parameters, options, input rule); --backbones adds
    CPU-friendly timm backbones (any timm architecture trains as timm/<name>)."""
    from toolkit.models import MODELS, count_parameters, create_model
    from toolkit.models.registry import count_macs

    rows = []
    for name, entry in MODELS.items():
        params = count_parameters(create_model(name, num_classes, image_size))
        rows.append(
            {
                "name": name,
                "params": params,
                "options": " ".join("--" + o.replace("_", "-") for o in entry.options),
                "input": entry.input_rule,
                "description": entry.description,
            }
        )
    console.print(table(f"models ({num_classes} classes, {image_size}x{image_size})", rows))
    if not backbones:
        console.print("and any timm architecture as timm/<name>: `toolkit models --backbones`")
        return
    from toolkit.models.timm_backbones import CURATED

    size = (backbone_size, backbone_size)
    measured = []
    for arch in CURATED:
        net = create_model(f"timm/{arch}", num_classes, size)
        macs = count_macs(net, size)
        measured.append(
            {"name": f"timm/{arch}", "params": count_parameters(net), "MMACs": f"{macs / 1e6:.1f}"}
        )
    title = f"timm backbones ({num_classes} classes, MACs at {backbone_size}x{backbone_size})"
    console.print(table(title, measured))


# --- train -----------------------------------------------------------------------------------


@app.command("train")
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


# --- evaluate / compare ----------------------------------------------------------------------


@app.command("evaluate")
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


@app.command("compare")
@friendly_errors
def compare_cmd(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare."),
    out: Path = typer.Option(None, help="Write comparison.md and comparison.csv here."),
):
    """Compare runs: params, checkpoint size, epochs, train time, best val acc, test acc."""
    from toolkit.evaluate import compare_runs

    rows = compare_runs(runs, out_dir=out)
    console.print(table("comparison", rows))


# --- reproduce -------------------------------------------------------------------------------


@app.command("reproduce")
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


# --- export / bench --------------------------------------------------------------------------


@app.command("export")
@friendly_errors
def export_cmd(
    run: Path = typer.Argument(None, help="Run folder (default: the latest under runs/)."),
    out: Path = typer.Option(None, help="Output folder (default RUN/export)."),
    int8: bool = typer.Option(False, "--int8", help="Also write a static INT8 (QDQ) model."),
    fp16: bool = typer.Option(False, "--fp16", help="Also write an fp16 model (GPU use)."),
    triton: Path = typer.Option(None, help="Also lay out a Triton model repository here."),
    opset: int = typer.Option(
        None, help="ONNX opset, 15 up to the newest torch.onnx writes (default 17)."
    ),
    tta: bool = typer.Option(
        False, "--tta", help="Average the run's test-time augmentation views inside the graph."
    ),
):
    """Export RUN/best.pt to ONNX, verify parity on the test split, measure size and latency."""
    from toolkit.export import export_run, print_report
    from toolkit.run.folder import resolve_run

    report = export_run(
        resolve_run(run), out, int8=int8, fp16=fp16, triton_dir=triton, opset=opset, tta=tta
    )
    print_report(report, console)


@app.command("bench")
@friendly_errors
def bench_cmd(paths: list[Path] = typer.Argument(..., help="model.onnx files (or folders).")):
    """Latency / throughput table for exported ONNX models."""
    from toolkit.export import bench_models, print_bench

    print_bench(bench_models(paths), console)


@app.command("package")
@friendly_errors
def package_cmd(
    run: Path = typer.Argument(None, help="Evaluated and exported run (default: the latest)."),
    artifacts: Path = typer.Option(Path("artifacts"), help="Artifacts folder the app serves."),
    name: str = typer.Option(None, help="Folder name (default <dataset>-<model>)."),
):
    """Copy a run's ONNX model, card and known failures into the artifacts the app serves."""
    from toolkit.export import package_run
    from toolkit.run.folder import resolve_run

    target = package_run(resolve_run(run), artifacts, name)
    console.print(f"packaged into {target}; serve with: toolkit serve --artifacts {artifacts}")


# --- audit -----------------------------------------------------------------------------------

app.command("audit")(audit_cmd)


# --- predict ---------------------------------------------------------------------------------


@app.command("predict")
@friendly_errors
def predict_cmd(
    sources: list[str] = typer.Argument(None, help="Image files, folders (recursive), globs."),
    model: str = typer.Option(
        None, help="artifacts/NAME, a run folder or a .onnx (default: the best under artifacts/)."
    ),
    top_k: int = typer.Option(5, help="Classes shown per image (at most the model's)."),
    out: Path = typer.Option(None, help="Write the rows to this .csv or .jsonl, not stdout."),
    batch_size: int = typer.Option(256, help="Images per onnxruntime batch."),
):
    """Classify image files with an exported model (onnxruntime, no torch); exit 1 if any
    file was skipped. In class folders named like the model's classes, print the accuracy."""
    from toolkit.predict import check_output, format_row, load_model, predict, summary
    from toolkit.predict import write_predictions as write

    if out is not None:
        check_output(out)
    classifier = load_model(model)
    rows = predict(sources or [], classifier, top_k, batch_size, progress=True)
    skipped = [r for r in rows if not r.ok]
    if out is None:
        typer.echo("".join(format_row(r) + "\n" for r in rows if r.ok), nl=False)
    else:
        write(out, rows, min(top_k, len(classifier.classes)))
    for r in skipped:
        err_console.print(
            f"skipped {r.path}: {r.error}", markup=False, highlight=False, soft_wrap=True
        )
    err_console.print(summary(rows, classifier, out), markup=False, highlight=False, soft_wrap=True)
    if skipped:
        raise typer.Exit(1)


# --- serve -----------------------------------------------------------------------------------


@app.command(
    "serve",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def serve_cmd(ctx: typer.Context):
    """Serve the exported models in a Gradio web app (onnxruntime, no torch); see --help."""
    from serving.app import main as serve_main

    # The server declares its own options (serving/app.py, also `python -m serving.app`).
    serve_main(ctx.args, prog="toolkit serve")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
