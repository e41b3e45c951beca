"""The Gradio demo: pick a shipped model, upload an image, see the top-5 classes; and, on the
same port, the inference API for programs (serving/api.py: Open Inference Protocol v2,
/classify, health, metrics).

    python -m serving.app [--artifacts artifacts] [--host 127.0.0.1] [--port 7860]
                          [--auth user:password] [--share] [--max-upload-mb 10]
                          [--max-in-flight 16] [--max-queue 64]

`toolkit serve` passes its arguments to `main` (the options are declared in
serving/options.py). It prints the URL it listens on, and warns when the app is reachable
from other machines (--host beyond loopback) without --auth.
Only onnxruntime, Gradio, Pillow, numpy, starlette, prometheus-client and orjson are imported
(the serving image has no torch). The page's predict function is public too,
`api_name="predict"`: image first, optional model name second (default: the most accurate
model), a gr.Label value (top label plus {label, confidence} pairs) out.
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.components.label import LabelConfidence, LabelData

from serving.api import DEFAULT_MAX_IN_FLIGHT, InferenceApi
from serving.card import latency_markdown
from serving.catalog import load_catalog
from serving.classifier import ArtifactError
from serving.handlers import TOP_K, DemoHandlers
from serving.options import (  # noqa: F401 - the command line's helpers, re-exported
    AUTH_ENV,
    DEFAULT_MAX_QUEUE,
    DEFAULT_MAX_UPLOAD_MB,
    exposure_warning,
    is_loopback,
    parse_args,
    parse_auth,
)

log = logging.getLogger(__name__)

# onnxruntime sessions are thread-safe and each call is milliseconds: a few at once keep
# concurrent clients from queueing behind each other without oversubscribing the CPU.
PREDICT_CONCURRENCY = 4
# Gradio copies every upload, and every image a handler returns, into its cache, and without
# delete_cache never removes them: a long-running demo would fill its disk. Every hour, delete
# what is older than a day (and everything the app made when it stops). The page's initial
# images are exempt (Gradio keeps a component's own value), and an image handed out again is
# re-touched or re-copied, so only a page left open for a day can lose a picture.
CACHE_SWEEP = (3600, 86400)  # (every, older than), seconds
# 32-pixel images blown up smoothly look like fog, and at their own size like a dot: scale the
# upload to fill its box and show every image's real pixels.
CSS = (
    "#image-input img { width: 100%; height: 100%; object-fit: contain; }\n"
    "#image-input img, #examples img, #failures img { image-rendering: pixelated; }"
)


@dataclass(frozen=True)
class Demo:
    """The page and what `launch` must enforce around it: the upload cap and the only files
    the server may hand out; and the inference API served beside it."""

    blocks: gr.Blocks
    max_upload_bytes: int
    allowed_paths: list[str]
    api: InferenceApi


# --- the Blocks ---------------------------------------------------------------------------------


class Verdict(gr.Label):
    """gr.Label whose value may carry its own heading: "not sure" above the top-k bars.

    gr.Label heads every {class: probability} value with its top class; handlers.classify
    returns {"label", "confidences": [{"label", "confidence"}]} (the shape gr.Label sends
    to the page anyway), and this keeps its label. A template of gr.Label: the page draws it
    with Label's own frontend.
    """

    is_template = True

    def postprocess(self, value):
        if isinstance(value, dict) and isinstance(value.get("confidences"), list):
            confidences = [LabelConfidence(**c) for c in value["confidences"]]
            return LabelData(label=value["label"], confidences=confidences)
        return super().postprocess(value)


@dataclass
class Widgets:
    """The components events connect, as built by `_layout`."""

    picker: gr.Dropdown
    image: gr.Image
    button: gr.Button
    label: gr.Label
    latency: gr.Markdown
    timing: gr.State
    examples: gr.Gallery
    failures: gr.Gallery
    card: gr.Markdown
    matrix: gr.Image
    reliability: gr.Image


def build_demo(
    artifacts_dir: str | Path,
    *,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    providers: list[str] | None = None,
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> Demo:
    """The web app for every model under `artifacts_dir`; ArtifactError names a bad file.

    Launch it with `launch(demo, ...)`, which applies the upload cap and the narrow set of
    servable files the Demo carries, and serves the API beside the page.
    """
    catalog = load_catalog(artifacts_dir, providers)
    max_bytes = int(max_upload_mb * 1e6)
    handlers = DemoHandlers(catalog, max_bytes)
    with gr.Blocks(
        title="toolkit · image classifier", analytics_enabled=False, delete_cache=CACHE_SWEEP
    ) as blocks:
        widgets = _layout(handlers, max_upload_mb)
        _wire(widgets, handlers)
    # A bounded line for the page too: past it a visitor hears "queue full" at once.
    blocks.queue(max_size=max_queue)
    api = InferenceApi(catalog, max_upload_bytes=max_bytes, max_in_flight=max_in_flight)
    return Demo(blocks, max_bytes, catalog.servable_paths(), api)


def _layout(handlers: DemoHandlers, max_upload_mb: float) -> Widgets:
    """Picker, upload and answer on top; examples, known failures and model card in tabs."""
    catalog = handlers.catalog
    card, matrix, reliability, failures, examples = handlers.show_model(catalog.default)
    gr.Markdown(
        "## Image classifier\nUpload a picture (or paste one, or use the webcam): the chosen "
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
            label = Verdict(num_top_classes=TOP_K, label=f"Top-{TOP_K}", elem_id="prediction")
            latency = gr.Markdown(elem_id="latency")
    with gr.Tabs():
        with gr.Tab("Examples"):
            example_gallery = _gallery(
                examples, "Real test images: click one to classify it", "examples"
            )
        with gr.Tab("Known failures"):
            failure_gallery = _gallery(
                failures,
                "Test images this model gets wrong (true → predicted, confidence): click one "
                "to run it",
                "failures",
            )
        with gr.Tab("Model card"):
            card_md = gr.Markdown(card, elem_id="model-card")
            matrix_img = gr.Image(
                matrix,
                label="Confusion matrix (test split)",
                interactive=False,
                buttons=["download", "fullscreen"],
            )
            reliability_img = gr.Image(
                reliability,
                label="Reliability: accuracy against confidence (test split), raw and calibrated",
                interactive=False,
                buttons=["download", "fullscreen"],
            )
    return Widgets(
        picker,
        image,
        button,
        label,
        latency,
        gr.State(),
        example_gallery,
        failure_gallery,
        card_md,
        matrix_img,
        reliability_img,
    )


def _gallery(value: list, label: str, elem_id: str) -> gr.Gallery:
    # No preview: a click should run the image, not just enlarge it.
    return gr.Gallery(
        value,
        label=label,
        columns=8,
        height="auto",
        allow_preview=False,
        interactive=False,
        elem_id=elem_id,
    )


def _wire(w: Widgets, handlers: DemoHandlers) -> None:
    """Events. Only `predict` is public API; everything else is the page's own plumbing."""
    show_latency = {
        "fn": latency_markdown,
        "inputs": w.timing,
        "outputs": w.latency,
        "api_visibility": "private",
        "queue": False,
    }
    answer = [w.label, w.timing]
    gr.on(
        [w.image.upload, w.button.click],
        handlers.predict,
        [w.image, w.picker],
        answer,
        api_name="predict",
        preprocess=False,  # handlers.predict decodes the upload itself, with clear errors
        concurrency_limit=PREDICT_CONCURRENCY,
    ).then(**show_latency)
    w.image.clear(lambda: (None, None), None, answer, api_visibility="private").then(**show_latency)
    w.picker.change(
        handlers.show_model,
        w.picker,
        [w.card, w.matrix, w.reliability, w.failures, w.examples],
        api_visibility="private",
    ).then(
        handlers.reclassify,
        [w.image, w.picker],
        answer,
        preprocess=False,
        api_visibility="private",
    ).then(**show_latency)
    for gallery, fn in ((w.failures, handlers.run_failure), (w.examples, handlers.run_example)):
        gallery.select(fn, w.picker, [w.image, *answer], api_visibility="private").then(
            **show_latency
        )


def launch(
    demo: Demo,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    share: bool = False,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
) -> str:
    """Start the server with the safety settings of `build_demo`; returns the local URL.

    Gradio is built on FastAPI: the API's routes go into the very app that serves the page
    (one process, one port), matched before Gradio's own, with BodyLimit capping every request
    body (Gradio caps uploaded files only) and the API's metrics around it.
    """
    _, url, share_url = demo.blocks.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=share,  # explicit, so $GRADIO_SHARE cannot publish the demo by surprise
        allowed_paths=demo.allowed_paths,
        max_file_size=demo.max_upload_bytes,
        app_kwargs=demo.api.app_kwargs(auth),
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


def main(argv: list[str] | None = None, prog: str = "python -m serving.app") -> None:
    """Parse options, load the artifacts (exit 2 naming a bad file), serve until stopped."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving").setLevel(logging.INFO)  # ours, not every library's requests
    try:
        demo = build_demo(
            args.artifacts,
            max_upload_mb=args.max_upload_mb,
            max_in_flight=args.max_in_flight,
            max_queue=args.max_queue,
        )
    except ArtifactError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    warning = exposure_warning(args.host, args.auth)
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    # `docker stop` and Kubernetes send SIGTERM; as PID 1 in a container an unhandled SIGTERM
    # is ignored, so the server would sit out the grace period until SIGKILL. Treat it as
    # Ctrl-C, from before the server answers: block_thread closes the server and returns, and
    # one that lands before block_thread runs closes it here.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # quiet: Gradio's own banner tells people to edit launch(), which a CLI user cannot do.
        url = launch(
            demo,
            host=args.host,
            port=args.port,
            auth=args.auth,
            share=args.share,
            prevent_thread_lock=True,
            quiet=True,
        )
        print(f"Serving on {url} (Ctrl-C to stop)", flush=True)
        demo.blocks.block_thread()
    except KeyboardInterrupt:
        demo.blocks.close()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    main()
