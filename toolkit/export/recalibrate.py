"""A new calibrator behind an exported model's logits, the classifier's part of the graph
left exactly as it is.

The shipped models (artifacts/) were exported from runs that are not kept; refitting their
calibration needs only their own logits on val, and this swap: the nodes from the image to
"logits" are copied unchanged (so the logits, and every top-1 prediction, are bit for bit
what they were), and "probs" becomes the new calibrator's function of them, exported from
the very torch code the calibrator was fitted and compared with (CalibratorHead).
"""

from __future__ import annotations

from typing import Any

import onnx

from toolkit.errors import ToolkitError
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export.branches import names_read
from toolkit.export.onnx_graph import (
    INPUT_NAME,
    OUTPUT_NAMES,
    CalibratorHead,
    attach_metadata,
    check_model,
    read_metadata,
    torch_to_onnx,
)

LOGITS, PROBS = OUTPUT_NAMES
PREFIX = "calibrator/"


def with_calibrator(
    model: onnx.ModelProto, calibrator: Calibrator, changes: dict[str, Any]
) -> onnx.ModelProto:
    """`model` with "probs" computed by `calibrator` and its metadata updated by `changes`."""
    body = _up_to_logits(model)
    classes = len(read_metadata(model)["classes"])
    opsets = {o.domain: o.version for o in model.opset_import}
    opset = opsets.get("", opsets.get("ai.onnx"))
    if opset is None:
        raise ToolkitError("the model has no ai.onnx opset; was it exported by `toolkit export`?")
    head = torch_to_onnx(CalibratorHead(calibrator).eval(), (classes,), opset, (LOGITS, (PROBS,)))
    head = onnx.compose.add_prefix(head, PREFIX)
    body.ir_version = head.ir_version = max(body.ir_version, head.ir_version)
    merged = onnx.compose.merge_models(
        body,
        head,
        io_map=[(LOGITS, PREFIX + LOGITS)],
        outputs=[LOGITS, PREFIX + PROBS],
    )
    for node in merged.graph.node:
        node.output[:] = [PROBS if name == PREFIX + PROBS else name for name in node.output]
    for value in merged.graph.output:
        if value.name == PREFIX + PROBS:
            value.name = PROBS
    attach_metadata(merged, {**read_metadata(model), **changes})
    check_model(merged, "the recalibrated model")
    return merged


def _up_to_logits(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph from the image to "logits" alone: the nodes "logits" needs, in their order.

    onnx.utils.Extractor does this for flat graphs, but it misses the names an If's branches
    read from the graph around them (a selective TTA graph, toolkit.export.tta), leaving the
    branches reading values no node makes any more.
    """
    graph = model.graph
    needed, kept = {LOGITS}, []
    for node in reversed(graph.node):  # topologically sorted: producers come earlier
        if needed.intersection(node.output):
            kept.append(node)
            needed |= names_read(node)
    body = onnx.helper.make_graph(
        nodes=kept[::-1],
        name=graph.name,
        inputs=[v for v in graph.input if v.name == INPUT_NAME or v.name in needed],
        outputs=[v for v in graph.output if v.name == LOGITS],
        initializer=[t for t in graph.initializer if t.name in needed],
        value_info=[v for v in graph.value_info if v.name in needed],
    )
    extracted = onnx.helper.make_model(
        body, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    extracted.functions.extend(model.functions)
    return extracted
