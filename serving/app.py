"""The server: one process, one port, two doors onto the same models. The Gradio page for
people (serving/page/) and the inference API for programs (serving/api/: Open Inference
Protocol v2, /classify, health, metrics), both over one catalog of ONNX models (the core at
serving/'s top level: preprocess, uploads, classifier, catalog, answer).

    python -m serving.app [--artifacts artifacts] [--host 127.0.0.1] [--port 7860]
                          [--auth user:password] [--share] [--max-upload-mb 10]
                          [--max-in-flight 16] [--max-queue 64]

`toolkit serve` passes its arguments to `main` (the options are declared in
serving/options.py). It prints the URL it listens on, and warns when the app is reachable
from other machines (--host beyond loopback) without --auth.
Only onnxruntime, Gradio, Pillow, numpy, starlette, prometheus-client and orjson are imported
(the serving image has no torch).
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from serving.api import DEFAULT_MAX_IN_FLIGHT, InferenceApi
from serving.catalog import load_catalog
from serving.classifier import ArtifactError
from serving.options import DEFAULT_MAX_QUEUE, DEFAULT_MAX_UPLOAD_MB, exposure_warning, parse_args
from serving.page import CSS, DemoHandlers, build_page

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Demo:
    """The page and what `launch` must enforce around it: the upload cap and the only files
    the server may hand out; and the inference API served beside it."""

    blocks: gr.Blocks
    max_upload_bytes: int
    allowed_paths: list[str]
    api: InferenceApi


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
    blocks = build_page(DemoHandlers(catalog, max_bytes), max_upload_mb, max_queue)
    api = InferenceApi(catalog, max_upload_bytes=max_bytes, max_in_flight=max_in_flight)
    return Demo(blocks, max_bytes, catalog.servable_paths(), api)


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
