"""One image's answer, the same through both doors: the page's predict and the API's
/classify decode the upload with the same checks (serving.uploads), run the model and say
its top-k classes, or "not sure" below the model's confidence threshold."""

from __future__ import annotations

from pathlib import Path

from serving.catalog import ServedModel
from serving.uploads import open_upload

# Classes in every answer (the API's /classify may ask for others with top_k).
TOP_K = 5
NOT_SURE = "not sure"


def classify(
    model: ServedModel, source: bytes | Path, name: str, k: int = TOP_K
) -> tuple[dict, dict]:
    """Decode + classify one image -> (a gr.Label value, latency facts).

    The label is the top class, or "not sure" when its (calibrated) probability is below the
    model's confidence threshold; the top-k classes are there either way. The page and the
    API's /classify both answer with this.
    """
    image = open_upload(source, name)
    classifier = model.classifier
    probs, timing = classifier.timed_predict(image)
    timing["providers"] = classifier.providers[0]
    timing["model"] = model.key
    top = classifier.top_k(probs, k)
    sure = classifier.is_sure(probs)
    if not sure:
        timing["not_sure"] = {
            "top": max(top.values()),
            "threshold": classifier.confidence_threshold,
        }
    label = {
        "label": next(iter(top)) if sure else NOT_SURE,
        "confidences": [{"label": k, "confidence": v} for k, v in top.items()],
    }
    return label, timing
