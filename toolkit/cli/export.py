"""From a run to what is served: `toolkit export`, `bench` and `package` (registered by
toolkit.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.cli.output import console, friendly_errors


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


@friendly_errors
def bench_cmd(paths: list[Path] = typer.Argument(..., help="model.onnx files (or folders).")):
    """Latency / throughput table for exported ONNX models."""
    from toolkit.export import bench_models, print_bench

    print_bench(bench_models(paths), console)


@friendly_errors
def package_cmd(
    run: Path = typer.Argument(None, help="Evaluated and exported run (default: the latest)."),
    artifacts: Path = typer.Option(Path("artifacts"), help="Artifacts folder the app serves."),
    name: str = typer.Option(
        None, help="Folder name (default <dataset>-<model>, with --int8 <dataset>-<model>-int8)."
    ),
    int8: bool = typer.Option(
        False, "--int8", help="Package the export's INT8 model (toolkit export --int8) instead."
    ),
):
    """Copy a run's ONNX model, card and known failures into the artifacts the app serves."""
    from toolkit.export import package_run
    from toolkit.run.folder import resolve_run

    target = package_run(resolve_run(run), artifacts, name, variant="int8" if int8 else None)
    console.print(f"packaged into {target}; serve with: toolkit serve --artifacts {artifacts}")
