"""The app's event functions, as plain Python: tested without a server.

Uploads arrive raw (the events use `preprocess=False`, so Gradio never decodes a stranger's
file itself); every problem with one becomes a gr.Error whose message says what was wrong.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from serving.answer import classify
from serving.catalog import Catalog, ServedModel, example_caption
from serving.page.card import card_markdown
from serving.uploads import ImageError

log = logging.getLogger(__name__)


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
            # Leave the outputs alone: a gallery click may already have filled them, and
            # clearing them here would race with it.
            return gr.skip(), gr.skip()
        return self.predict(image, model)

    def show_model(self, key: str) -> tuple[str, str, str | None, list, list]:
        """Model card, confusion matrix, reliability diagram, failure gallery and dataset
        examples for `key`."""
        served = self.model(key)
        failures = [(str(f.path), f.caption) for f in served.failures]
        examples = [(str(p), example_caption(p)) for p in self.examples(served)]
        reliability = served.reliability_diagram
        return (
            card_markdown(served),
            str(served.confusion_matrix),
            str(reliability) if reliability else None,
            failures,
            examples,
        )

    def examples(self, served: ServedModel) -> list[Path]:
        return self.catalog.examples.get(served.dataset, [])

    def run_failure(self, model: str, evt: gr.SelectData) -> tuple[str, dict, dict]:
        """A click on a known failure: show that image and classify it now."""
        served = self.model(model)
        failure = served.failures[evt.index]
        return (
            str(failure.path),
            *self.classify_shown(served, failure.path, f"failure #{failure.index}"),
        )

    def run_example(self, model: str, evt: gr.SelectData) -> tuple[str, dict, dict]:
        """A click on an example image: show it and classify it."""
        served = self.model(model)
        path = self.examples(served)[evt.index]
        return (str(path), *self.classify_shown(served, path, path.name))

    @staticmethod
    def classify_shown(served: ServedModel, path: Path, name: str) -> tuple[dict, dict]:
        """Classify a gallery image, read from disk now (only the ONNX sessions are loaded at
        startup): a file damaged or removed since then fails this click, naming the file."""
        try:
            return classify(served, path, name)
        except (ImageError, OSError) as exc:
            log.warning("gallery image %s unreadable: %s", path, exc)
            message = html.escape(
                f"'{path}' changed since the server started ({exc}); restart the app after "
                "replacing artifacts",
                quote=False,
            )
            raise gr.Error(
                message, title=f"Cannot run {served.key}'s image", print_exception=False
            ) from None
