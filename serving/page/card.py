"""What the page says about a model and a prediction: the model card and the latency line."""

from __future__ import annotations

from typing import Any

from serving.catalog import ServedModel


def latency_markdown(timing: dict | None) -> str:
    """The lines under the answer: why it is "not sure", if it is; total time, its split,
    which model on which provider."""
    if not timing:
        return ""
    total = timing["preprocess_ms"] + timing["model_ms"]
    line = (
        f"**Latency** {total:.1f} ms (preprocess {timing['preprocess_ms']:.1f} ms · "
        f"model {timing['model_ms']:.1f} ms) · `{timing['model']}` on {timing['providers']}"
    )
    doubt = timing.get("not_sure")
    if not doubt:
        return line
    return (
        f"**Not sure**: the top class has {doubt['top']:.0%}, below this model's threshold of "
        f"{doubt['threshold']:.0%} (see the model card); the top-5 are shown anyway.\n\n{line}"
    )


def card_markdown(model: ServedModel) -> str:
    """The model card: what it is, how big, how accurate, and the export report's figures."""
    info = model.info
    acc = model.test_accuracy
    options = " ".join(f"{k}={v}" for k, v in (info.get("model_options") or {}).items())
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
        *tta_rows(info, model.metrics),
        *tta_choice_rows(info, model.precision),
        *calibration_rows(info, model.metrics),
        *audit_rows(model.metrics, model.failures),
        ("input", input_row(model.classifier.resize)),
        ("toolkit", str(info.get("toolkit_version", "?"))),
    ]
    unsure_passes = 0
    if info.get("tta") and info.get("tta_below") is not None:  # the plain pass, then the views
        unsure_passes = 1 + int(_section(model.metrics, "tta").get("views", 0))
    rows += report_rows(model.report, int8=model.precision == "int8", unsure_passes=unsure_passes)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    classes = ", ".join(model.classifier.classes)
    return (
        f"### {model.dataset} · {model.model}\n\n| property | value |\n|---|---|\n{table}\n\n"
        f"Classes: {classes}"
    )


def input_row(resize) -> str:
    """The input size, and how an upload is brought to it when that is not the default."""
    height, width = resize.size
    text = f"{width}×{height} px RGB (width × height)"
    if resize.crop_fraction != 1.0:
        text += f", centred {resize.crop_fraction:.1%} of each side kept"
    if resize.interpolation != "bilinear":
        text += f", {resize.interpolation} resize"
    return text


def audit_rows(metrics: dict, failures: list) -> list[tuple[str, str]]:
    """What a data audit of the test split found (toolkit audit, read by toolkit evaluate):
    the accuracy without the images it flagged, and the known failures whose label it
    doubts. Evaluations from before audits existed say nothing."""
    if "audit" not in metrics:
        return []
    audit = metrics["audit"] or {}
    if audit.get("audit") is None:
        return [("data audit", "none run on this data")]
    try:
        excluded = audit["excluded"]
        accuracy = audit["accuracy"].get("tta") or audit["accuracy"]["plain"]
        text = (
            f"{excluded['leaked_from_train']:,} test images repeat a training image and "
            f"{excluded['label_doubted']:,} labels look wrong; "
            f"{_percent(accuracy['without_flagged'])} accuracy without them"
        )
    except (KeyError, TypeError, AttributeError, ValueError):  # a hand-edited metrics.json
        return []
    doubted = sum(1 for f in failures if f.label_doubt)
    if doubted:
        text += f"; {doubted} of the known failures are likely label errors"
    return [("data audit", text)]


def tta_rows(info: dict, metrics: dict) -> list[tuple[str, str]]:
    """A model with test-time augmentation in its graph says so: its accuracy is the average
    over the views, and one prediction costs that many forward passes (selective: only for
    the images it is unsure of)."""
    if not info.get("tta"):
        return []
    tta = _section(metrics, "tta")
    views = tta.get("views", "several")
    without = tta.get("accuracy_without")
    kinds = "mirror and 1-px shifts" if info["tta"] >= 2 else "mirror"
    text = f"{views} views ({kinds}) averaged inside the graph"
    below, share = info.get("tta_below"), tta.get("with_views")
    if below is not None:  # selective: the others take one pass
        text += f", only for an image whose plain top-1 probability is below {below:g}"
        if isinstance(share, (int, float)):
            text += f" ({share:.0%} of the test images)"
    if isinstance(without, (int, float)):
        text += f"; {without:.2%} test accuracy without them"
    return [("test-time augmentation", text)]


def tta_choice_rows(info: dict, precision: str) -> list[tuple[str, str]]:
    """Why the graph runs the views it runs, when its folder records the choice
    (benchmarks/tta_serving --write): each variant measured in this precision, its val
    accuracy and batch-1 time, this graph among them, and what the rule picks."""
    choice = info.get("tta_choice")
    if not isinstance(choice, dict):
        return []
    try:
        measured = "; ".join(
            f"{row['variant']}{' **(this graph)**' if row['variant'] == choice['served'] else ''}"
            f": {row['val_accuracy']:.2%} val, {row['batch1_ms']:.1f} ms"
            for row in choice["rows"]
            if row["precision"] == precision
        )
        text = (
            f"{measured} (ms: {choice['timing']}, {choice['cpu']}). Rule: {choice['rule']} → "
            f"{choice['chosen']}"
        )
    except (KeyError, TypeError, ValueError):  # a hand-edited model.json
        return []
    return [("TTA variants", text)] if measured else []


def calibration_rows(info: dict, metrics: dict) -> list[tuple[str, str]]:
    """What the probabilities mean: the calibration method and what it computes, and the
    "not sure" threshold with what it kept on the test split (from the packaged evaluation,
    when it has them). Models exported before there were several methods have a
    temperature only."""
    if info.get("calibrated_on") is None:
        return [("probabilities", "softmax of the logits, not calibrated")]
    method = info.get("calibration_method") or "temperature"
    computed = info.get("calibration_description") or f"softmax(logits / {info['temperature']:.3f})"
    rows = [
        (
            "probabilities",
            f"calibrated by {method}, fitted and chosen on the val split: {computed}",
        )
    ]
    evaluated = _section(metrics, "calibration")
    test, raw = _section(evaluated, "calibrated"), _section(evaluated, "raw")
    if isinstance(test.get("ece"), (int, float)) and isinstance(raw.get("ece"), (int, float)):
        rows.append(("calibration error (ECE, test)", f"{raw['ece']:.2%} raw → {test['ece']:.2%}"))
    threshold = info.get("confidence_threshold")
    if threshold is None:
        rows.append(("not sure", "never: no threshold reaches the target on val"))
        return rows
    kept = _section(evaluated, "selective")
    text = (
        f"below {threshold:.1%} top-1 probability (target {info['confidence_target']:.0%} accuracy)"
    )
    if isinstance(kept.get("accuracy"), (int, float)):
        text += (
            f"; on test it answered {kept['coverage']:.1%} of the images, "
            f"{kept['accuracy']:.2%} of them right"
        )
    rows.append(("not sure", text))
    return rows


def report_rows(report: dict, int8: bool = False, unsure_passes: int = 0) -> list[tuple[str, str]]:
    """The export report's headline figures, whichever of them this report has (`int8`: the
    served file is the report's INT8 model, so its own agreement with torch is shown;
    `unsure_passes`: a selective TTA graph's passes for an image it is unsure of, whose MACs
    the report's count, of the plain pass, leaves out)."""
    rows = []
    stats = _section(report, "stats")
    macs = stats.get("macs_per_image")
    if isinstance(macs, (int, float)):
        text = _number(macs)
        if unsure_passes and isinstance(macs, int):
            text += f" for an image it is sure of, {macs * unsure_passes:,} for one it is not"
        rows.append(("MACs per image", text))
    if int8:
        check = _section(report, "int8")
        if isinstance(check.get("top1_agreement_vs_torch"), (int, float)):
            rows.append(("INT8 ONNX = torch top-1", _percent(check["top1_agreement_vs_torch"])))
    else:
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
            text = f"{row['p50_ms']:.2f} ms"
            if isinstance(row.get("mean_ms"), (int, float)):  # a selective graph: they differ
                text += f" (mean {row['mean_ms']:.2f} ms over real images)"
            rows.append((f"latency p50 ({where})", text))
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
    if isinstance(value, (int, float)) and value == value:  # NaN (a run without val) is n/a
        return f"{value:.2%}"
    return "n/a"
