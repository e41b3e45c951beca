"""Using an exported model, torch-free: `toolkit predict` and `toolkit serve` (registered by
toolkit.cli)."""

from __future__ import annotations

from pathlib import Path

import typer

from toolkit.cli.output import err_console, friendly_errors

# `toolkit serve` hands every argument, --help included, to the server's own parser.
SERVE_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True},
    "add_help_option": False,
}


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


def serve_cmd(ctx: typer.Context):
    """Serve the exported models in a Gradio web app (onnxruntime, no torch); see --help."""
    from serving.app import main as serve_main

    # The server declares its own options (serving/app.py, also `python -m serving.app`).
    serve_main(ctx.args, prog="toolkit serve")
