"""The Gradio page: pick a shipped model, upload an image, see the top-5 classes; examples,
known failures and the model card in tabs. serving.app serves it beside the inference API.

The page's predict function is public too, `api_name="predict"`: image first, optional model
name second (default: the most accurate model), a gr.Label value (top label plus
{label, confidence} pairs) out.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr
from gradio.components.label import LabelConfidence, LabelData

from serving.answer import TOP_K
from serving.page.card import latency_markdown
from serving.page.handlers import DemoHandlers

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


def build_page(handlers: DemoHandlers, max_upload_mb: float, max_queue: int) -> gr.Blocks:
    """The page's Blocks, its events wired to `handlers`, with a bounded queue."""
    with gr.Blocks(
        title="toolkit · image classifier", analytics_enabled=False, delete_cache=CACHE_SWEEP
    ) as blocks:
        widgets = _layout(handlers, max_upload_mb)
        _wire(widgets, handlers)
    # A bounded line for the page too: past it a visitor hears "queue full" at once.
    blocks.queue(max_size=max_queue)
    return blocks


class Verdict(gr.Label):
    """gr.Label whose value may carry its own heading: "not sure" above the top-k bars.

    gr.Label heads every {class: probability} value with its top class; answer.classify
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
