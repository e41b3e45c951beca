"""The Gradio demo: pick a shipped model, upload an image, see the top-5 classes.

    python -m serving.app [--artifacts artifacts] [--host 127.0.0.1] [--port 7860]
                          [--auth user:password] [--share] [--max-upload-mb 10]

`toolkit serve` passes its arguments to `main`: these options are declared once, here.
It prints the URL it listens on, and warns when the app is reachable from other machines
(--host beyond loopback) without --auth.
Only onnxruntime, Gradio, Pillow and numpy are imported (the serving image has no torch). The
predict function is the public API, `api_name="predict"`: image first, optional model name
second (default: the most accurate model), a gr.Label value (top label plus {label,
confidence} pairs) out.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.components.label import LabelConfidence, LabelData
from starlette.middleware import Middleware

from serving.card import latency_markdown
from serving.catalog import load_catalog
from serving.classifier import ArtifactError
from serving.handlers import TOP_K, DemoHandlers
from serving.limits import BodyLimit

log = logging.getLogger(__name__)

AUTH_ENV = "TOOLKIT_AUTH"
DEFAULT_MAX_UPLOAD_MB = 10.0
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
    the server may hand out."""

    blocks: gr.Blocks
    max_upload_bytes: int
    allowed_paths: list[str]


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
) -> Demo:
    """The web app for every model under `artifacts_dir`; ArtifactError names a bad file.

    Launch it with `launch(demo, ...)`, which applies the upload cap and the narrow set of
    servable files the Demo carries.
    """
    catalog = load_catalog(artifacts_dir, providers)
    max_bytes = int(max_upload_mb * 1e6)
    handlers = DemoHandlers(catalog, max_bytes)
    with gr.Blocks(
        title="toolkit · image classifier", analytics_enabled=False, delete_cache=CACHE_SWEEP
    ) as blocks:
        widgets = _layout(handlers, max_upload_mb)
        _wire(widgets, handlers)
    return Demo(blocks, max_bytes, catalog.servable_paths())


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
    """Start the server with the safety settings of `build_demo`; returns the local URL."""
    # Gradio caps uploaded files only; BodyLimit caps every other request body too.
    body_limit = Middleware(BodyLimit, max_upload_bytes=demo.max_upload_bytes)
    _, url, share_url = demo.blocks.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        share=share,  # explicit, so $GRADIO_SHARE cannot publish the demo by surprise
        allowed_paths=demo.allowed_paths,
        max_file_size=demo.max_upload_bytes,
        app_kwargs={"middleware": [body_limit]},
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


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:  # a host name may resolve to any interface: assume exposed
        return False


def exposure_warning(host: str, auth: tuple[str, str] | None) -> str | None:
    """What to tell the person starting a server that other machines can use without a
    password; None when it is bound to loopback or protected by --auth."""
    if auth or is_loopback(host):
        return None
    return (
        f"listening on {host}, reachable from other machines, without a password; "
        f"pass --auth user:password or set ${AUTH_ENV} unless a proxy in front checks access"
    )


def parse_args(argv: list[str] | None, prog: str = "python -m serving.app") -> argparse.Namespace:
    """The command line (argv=None: sys.argv); --auth falls back to $TOOLKIT_AUTH.

    The one declaration of the server's options: `toolkit serve` passes its arguments here.
    """
    parser = argparse.ArgumentParser(prog=prog, description="Serve exported image classifiers.")
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


def main(argv: list[str] | None = None, prog: str = "python -m serving.app") -> None:
    """Parse options, load the artifacts (exit 2 naming a bad file), serve until stopped."""
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("serving").setLevel(logging.INFO)  # ours, not every library's requests
    try:
        demo = build_demo(args.artifacts, max_upload_mb=args.max_upload_mb)
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
