"""The `toolkit` command: thin verbs that parse options and call the library.

One module per stretch of the flow, each command a plain function registered below:

    models.py   models                              what can be trained
    train.py    train, evaluate, compare, reproduce training and its results
    export.py   export, bench, package              from a run to what is served
    audit.py    audit                               the data check
    serve.py    predict, serve                      using an exported model, torch-free

with options.py (Typer flags derived from the declared options) and output.py (consoles,
tables, one-line errors). Errors a user can cause arrive as ToolkitError and leave as one red
line with exit code 2.
"""

from __future__ import annotations

import atexit
import gc
import logging

import typer

from toolkit.cli.audit import audit_cmd
from toolkit.cli.export import bench_cmd, export_cmd, package_cmd
from toolkit.cli.models import models_cmd
from toolkit.cli.options import BareValueGroup
from toolkit.cli.serve import SERVE_SETTINGS, predict_cmd, serve_cmd
from toolkit.cli.train import compare_cmd, evaluate_cmd, reproduce_cmd, train_cmd

# A command's objects die with its process: frozen at exit, they are spared the interpreter's
# last garbage collections, which take about a second once torch's compiler stack is loaded
# (every training run loads it: torch's optimizers import it). atexit handlers and the logs'
# flushing still run.
atexit.register(gc.freeze)

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


# In the order --help lists them: the flow, from what can be trained to serving it.
app.command("models")(models_cmd)
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)
app.command("compare")(compare_cmd)
app.command("reproduce")(reproduce_cmd)
app.command("export")(export_cmd)
app.command("bench")(bench_cmd)
app.command("package")(package_cmd)
app.command("audit")(audit_cmd)
app.command("predict")(predict_cmd)
app.command("serve", **SERVE_SETTINGS)(serve_cmd)
