"""The Gradio demo: pick a shipped model, upload an image, see the top-5 classes.

    python -m serving.app [--artifacts artifacts] [--host 127.0.0.1] [--port 7860]
                          [--auth user:password] [--share] [--max-upload-mb 10]

`toolkit serve` calls `main` with the same options. Only onnxruntime, Gradio, Pillow and numpy
are imported (the serving image has no torch). The predict function is the public API,
`api_name="predict"`: image first, optional model name second (default: the most accurate
model), a gr.Label value (top label plus {label, confidence} pairs) out.
"""

from __future__ import annotations

import argparse
import base64
import html
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from serving.catalog import Catalog, ServedModel, example_caption, load_catalog
from serving.classifier import ArtifactError
from serving.images import ImageError, open_upload

log = logging.getLogger(__name__)

AUTH_ENV = "TOOLKIT_AUTH"
DEFAULT_MAX_UPLOAD_MB = 10.0
TOP_K = 5
# onnxruntime sessions are thread-safe and each call is milliseconds: a few at once keep
# concurrent clients from queueing behind each other without oversubscribing the CPU.
PREDICT_CONCURRENCY = 4
# 32-pixel images blown up smoothly look like fog; show their real pixels.
CSS = "#image-input img, #examples img, #failures img { image-rendering: pixelated; }"


@dataclass(frozen=True)
class ServingConfig:
    """What `launch` needs besides the Blocks: the upload cap and the servable files."""

    max_upload_bytes: int
    allowed_paths: list[str]


# --- request handling (plain functions, tested without a server) ------------------------------


def upload_bytes(payload: Any, max_bytes: int) -> tuple[bytes, str]:
    """An image input's raw value (FileData dict, path or data: URL) -> (file bytes, name)."""
    if not payload:
        raise ImageError("no image given; upload a picture first")
    if isinstance(payload, (str, Path)):
        payload = {"path": str(payload)}
    name = f"'{payload['orig_name']}'" if payload.get("orig_name") else "the upload"
    path, url = payload.get("path"), payload.get("url") or ""
    if path:
        size = Path(path).stat().st_size
        if size > max_bytes:  # Gradio's own cap stops browsers; this one stops everything else
            raise ImageError(_too_big(name, size, max_bytes))
        return Path(path).read_bytes(), name
    if url.startswith("data:"):
        data = base64.b64decode(url.partition(",")[2], validate=False)
        if len(data) > max_bytes:
            raise ImageError(_too_big(name, len(data), max_bytes))
        return data, name
    raise ImageError("the image did not reach the server; upload it again")


def _too_big(name: str, size: int, max_bytes: int) -> str:
    return f"{name} is {size / 1e6:.1f} MB; the upload limit is {max_bytes / 1e6:.1f} MB"


def classify(model: ServedModel, source: bytes | Path, name: str) -> tuple[dict, dict]:
    """Decode + classify one image -> (top-k {class: probability}, latency facts)."""
    image = open_upload(source, name)
    probs, timing = model.classifier.timed_predict(image)
    timing["providers"] = model.classifier.providers[0]
    timing["model"] = model.key
    return model.classifier.top_k(probs, TOP_K), timing


def latency_markdown(timing: dict | None) -> str:
    if not timing:
        return ""
    total = timing["preprocess_ms"] + timing["model_ms"]
    return (
        f"**Latency** {total:.1f} ms (preprocess {timing['preprocess_ms']:.1f} ms · "
        f"model {timing['model_ms']:.1f} ms) · `{timing['model']}` on {timing['providers']}"
    )


def card_markdown(model: ServedModel) -> str:
    """The model card: what it is, how big, how accurate, and the export report's figures."""
    info = model.info
    acc = model.test_accuracy
    options = info.get("model_options") or {}
    rows = [
        ("dataset", f"{model.dataset} ({len(model.classifier.classes)} classes)"),
        ("model", model.model + (f" {options}" if options else "")),
        ("parameters", _number(info.get("num_params"))),
        ("ONNX size", f"{model.size_bytes / 1e6:.2f} MB"),
        (
            "test accuracy",
            "n/a" if acc is None else f"{acc:.2%} ({_number(model.metrics.get('n'))} images)",
        ),
        ("val accuracy", _percent(info.get("val_accuracy"))),
        ("input", "×".join(str(s) for s in model.classifier.input_size) + " RGB"),
        ("toolkit", str(info.get("toolkit_version", "?"))),
    ]
    rows += report_rows(model.report)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    classes = ", ".join(model.classifier.classes)
    return (
        f"### {model.dataset} · {model.model}\n\n| property | value |\n|---|---|\n{table}\n\n"
        f"Classes: {classes}"
    )


def report_rows(report: dict) -> list[tuple[str, str]]:
    """The export report's headline figures, whichever of them this report has."""
    rows = []
    stats = _section(report, "stats")
    if isinstance(stats.get("macs_per_image"), (int, float)):
        rows.append(("MACs per image", _number(stats["macs_per_image"])))
    check = _section(report, "verification")
    if isinstance(check.get("top1_agreement"), (int, float)):
        rows.append(("ONNX = torch top-1", _percent(check["top1_agreement"])))
    if isinstance(check.get("max_abs_prob_diff"), (int, float)):
        rows.append(("max Δ prob vs torch", f"{check['max_abs_prob_diff']:.1e}"))
    latency = report.get("latency")
    for row in latency if isinstance(latency, list) else []:
        if (
            isinstance(row, dict)
            and str(row.get("format", "")).startswith("onnx")
            and isinstance(row.get("p50_ms"), (int, float))
        ):
            where = f"{row.get('format')}, {row.get('runtime', '?')}, batch {row.get('batch', '?')}"
            rows.append((f"latency p50 ({where})", f"{row['p50_ms']:.2f} ms"))
    if report.get("opset") is not None:
        rows.append(("ONNX opset", str(report["opset"])))
    return rows


def _section(report: dict, key: str) -> dict:
    value = report.get(key)
    return value if isinstance(value, dict) else {}


def _number(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return str(value)


def _percent(value: Any) -> str:
    return f"{value:.2%}" if isinstance(value, (int, float)) else "n/a"


# --- the Blocks ---------------------------------------------------------------------------------


class DemoHandlers:
    """The event functions, bound to one catalog and upload cap."""

    def __init__(self, catalog: Catalog, max_upload_bytes: int):
        self.catalog = catalog
        self.max_upload_bytes = max_upload_bytes

    def model(self, key: str | None) -> ServedModel:
        try:
            return self.catalog.get(key)
        except KeyError as exc:
            raise gr.Error(html.escape(exc.args[0], quote=False), print_exception=False) from None

    def predict(self, image: Any, model: str | None = None) -> tuple[dict, dict]:
        """Classify an image with a served model (default: the most accurate one)."""
        served = self.model(model)
        try:
            data, name = upload_bytes(image, self.max_upload_bytes)
            return classify(served, data, name)
        except ImageError as exc:
            log.info("rejected upload: %s", exc)
            # The message quotes the user's file name, and gr.Error renders HTML: escape it.
            message = html.escape(str(exc), quote=False)
            raise gr.Error(
                message, title="Cannot classify this image", print_exception=False
            ) from None

    def reclassify(self, image: Any, model: str | None) -> tuple[Any, Any]:
        """After a model switch: classify the image on screen again, if there is one."""
        if not image:
            return None, None
        return self.predict(image, model)

    def show_model(self, key: str) -> tuple[str, str, list, list]:
        """Model card, confusion matrix, failure gallery and dataset examples for `key`."""
        served = self.model(key)
        failures = [(str(f.path), f.caption) for f in served.failures]
        examples = [(str(p), example_caption(p)) for p in self.examples(served)]
        return card_markdown(served), str(served.confusion_matrix), failures, examples

    def examples(self, served: ServedModel) -> list[Path]:
        return self.catalog.examples.get(served.dataset, [])

    def run_failure(self, model: str, evt: gr.SelectData) -> tuple[str, dict, dict]:
        """A click on a known failure: show that image and classify it now."""
        served = self.model(model)
        failure = served.failures[evt.index]
        return (str(failure.path), *classify(served, failure.path, f"failure #{failure.index}"))

    def run_example(self, model: str, evt: gr.SelectData) -> tuple[str, dict, dict]:
        """A click on an example image: show it and classify it."""
        served = self.model(model)
        path = self.examples(served)[evt.index]
        return (str(path), *classify(served, path, path.name))


def build_demo(
    artifacts_dir: str | Path,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    providers: list[str] | None = None,
) -> gr.Blocks:
    """The web app for every model under `artifacts_dir`; ArtifactError names a bad file.

    Launch it with `launch(demo, ...)`, which applies the upload cap and the narrow set of
    servable files kept in `demo.serving_config`.
    """
    catalog = load_catalog(artifacts_dir, providers)
    max_bytes = int(max_upload_mb * 1e6)
    handlers = DemoHandlers(catalog, max_bytes)
    card, matrix, failures, examples = handlers.show_model(catalog.default)
    with gr.Blocks(title="toolkit · image classifier", analytics_enabled=False) as demo:
        gr.Markdown(
            "## Image classifier\nUpload a picture (or paste / use the webcam): the chosen "
            f"model returns its top-{TOP_K} classes. Served with onnxruntime, "
            f"{len(catalog.models)} model(s) from `{catalog.root.name}/`."
        )
        with gr.Row():
            with gr.Column():
                picker = gr.Dropdown(
                    choices=[(m.label, m.key) for m in catalog.models.values()],
                    value=catalog.default,
                    label="Model (dataset · model · test accuracy · size)",
                    elem_id="model-picker",
                )
                image = gr.Image(
                    type="filepath",
                    sources=["upload", "clipboard", "webcam"],
                    label=f"Image (up to {max_upload_mb:g} MB)",
                    height=300,
                    elem_id="image-input",
                )
                button = gr.Button("Classify", variant="primary", elem_id="classify")
            with gr.Column():
                label = gr.Label(num_top_classes=TOP_K, label="Top-5", elem_id="prediction")
                latency_md = gr.Markdown(elem_id="latency")
        timing = gr.State()
        with gr.Tabs():
            with gr.Tab("Examples"):
                example_gallery = gr.Gallery(
                    examples,
                    label="Real test images: click one to classify it",
                    columns=8,
                    allow_preview=False,
                    interactive=False,
                    elem_id="examples",
                )
            with gr.Tab("Known failures"):
                failure_gallery = gr.Gallery(
                    failures,
                    label="Test images this model gets wrong (true → predicted, confidence): "
                    "click one to run it",
                    columns=8,
                    allow_preview=False,
                    interactive=False,
                    elem_id="failures",
                )
            with gr.Tab("Model card"):
                card_md = gr.Markdown(card, elem_id="model-card")
                matrix_img = gr.Image(
                    matrix,
                    label="Confusion matrix (test split)",
                    interactive=False,
                    buttons=["download", "fullscreen"],
                )

        show = {
            "fn": latency_markdown,
            "inputs": timing,
            "outputs": latency_md,
            "api_visibility": "private",
            "queue": False,
        }
        gr.on(
            [image.upload, button.click],
            handlers.predict,
            [image, picker],
            [label, timing],
            api_name="predict",
            preprocess=False,
            concurrency_limit=PREDICT_CONCURRENCY,
        ).then(**show)
        image.clear(lambda: (None, None), None, [label, timing], api_visibility="private").then(
            **show
        )
        picker.change(
            handlers.show_model,
            picker,
            [card_md, matrix_img, failure_gallery, example_gallery],
            api_visibility="private",
        ).then(
            handlers.reclassify,
            [image, picker],
            [label, timing],
            preprocess=False,
            api_visibility="private",
        ).then(**show)
        for gallery, fn in (
            (failure_gallery, handlers.run_failure),
            (example_gallery, handlers.run_example),
        ):
            gallery.select(fn, picker, [image, label, timing], api_visibility="private").then(
                **show
            )
    demo.serving_config = ServingConfig(max_bytes, catalog.servable_paths())
    return demo


def launch(
    demo: gr.Blocks,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> str:
    """Start the server with the safety settings of `build_demo`; returns the local URL."""
    config: ServingConfig = demo.serving_config
    _, url, share_url = demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=share,  # explicit, so $GRADIO_SHARE cannot publish the demo by surprise
        allowed_paths=config.allowed_paths,
        max_file_size=config.max_upload_bytes,
        enable_monitoring=False,
        ssr_mode=False,
        mcp_server=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        css=CSS,
    )
    if share_url:
        log.warning("public share link (anyone with it can use the app): %s", share_url)
    return url


# --- command line ----------------------------------------------------------------------------


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:password' -> (user, password); the password may itself contain ':'."""
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not (user and sep and password):
        raise ValueError("--auth must look like user:password")
    return user, password


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m serving.app", description="Serve exported image classifiers."
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=Path("artifacts"),
        help="folder of <dataset>-<model>/ model folders (default: artifacts)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to bind (default 127.0.0.1; 0.0.0.0: every one)",
    )
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument(
        "--auth", default=None, help=f"user:password required to use the app (or ${AUTH_ENV})"
    )
    parser.add_argument(
        "--share", action="store_true", help="ask Gradio for a public share link (off by default)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest accepted upload (default {DEFAULT_MAX_UPLOAD_MB:g} MB)",
    )
    args = parser.parse_args(argv)
    try:
        args.auth = parse_auth(args.auth or os.environ.get(AUTH_ENV))
    except ValueError as exc:
        parser.error(str(exc))
    if args.max_upload_mb <= 0:
        parser.error("--max-upload-mb must be positive")
    return args


def main(argv: list[str] | None = None) -> None:
    """Parse options, load the artifacts (exit 2 naming a bad file), serve until stopped."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        demo = build_demo(args.artifacts, max_upload_mb=args.max_upload_mb)
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    launch(demo, host=args.host, port=args.port, auth=args.auth, share=args.share)


if __name__ == "__main__":
    main()
