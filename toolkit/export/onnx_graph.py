"""A checkpoint's classifier as an ONNX graph that carries its own metadata.

The graph takes what ToTensor gives (RGB, float32 in [0, 1], N×3×H×W with a dynamic batch)
and returns ``logits`` and ``probs``; mean/std are constants *inside* it, so no client can
normalise twice or not at all. The facts a client needs (classes, input size, the
preprocessing rules) travel in ``metadata_props``, strings only, JSON for anything that is
not a plain string, which Netron and ``onnxruntime.get_modelmeta()`` both show.

Exported with torch's dynamo exporter (torch.export); see torch_to_onnx for the opset and IR
version handling and what it refuses.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch import nn

from serving.classifier import parse_metadata
from toolkit.data.specs import parse_size
from toolkit.errors import ToolkitError, error_summary, first_line
from toolkit.evaluate.calibrators import Calibrator
from toolkit.export.opset import EXPORT_OPSET, convert_opset
from toolkit.run.checkpoint import Checkpoint
from toolkit.version import __version__

# What export-report.json names as the exporter (torch_to_onnx).
EXPORTER = "torch.onnx dynamo exporter (torch.export), opset 18, onnx version converter"
INPUT_NAME = "image"
OUTPUT_NAMES = ("logits", "probs")
# A failing torch.export logs a multi-line warning with the traced graph and print()s the
# partial graph to stderr, once per capture strategy; the ToolkitError says what matters.
_QUIET_LOGGERS = (
    "torch.onnx",
    "onnxscript",
    "torch.export",
    "torch._dynamo",
    "torch.fx.experimental.symbolic_shapes",
)


class ExportHead(nn.Module):
    """classifier -> (logits, calibrated probabilities): what the ONNX graph computes, also
    timed in torch. The calibrator (toolkit.evaluate.calibrators) only calibrates the
    probabilities: logits, and so every top-1 prediction, stay the classifier's; the default
    (T = 1) is a plain softmax, without a division."""

    def __init__(self, classifier: nn.Module, calibrator: Calibrator = Calibrator()):
        super().__init__()
        self.classifier = classifier
        self.calibrator = CalibratorHead(calibrator)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.classifier(image)
        return logits, self.calibrator(logits)


class CalibratorHead(nn.Module):
    """logits -> calibrated probabilities, alone: the graph toolkit.export.recalibrate puts
    behind an exported classifier's logits."""

    def __init__(self, calibrator: Calibrator):
        super().__init__()
        self.calibrator = calibrator

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        return self.calibrator.probs(logits)


@contextlib.contextmanager
def _quiet_exporter():
    """No output from an export, passing or failing (verbose=False stops only the
    "[torch.onnx] ..." progress lines)."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """torch.onnx wraps the real error in a generic "step n/3 ... Next steps" text."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def torch_to_onnx(
    head: nn.Module,
    input_shape: tuple[int, ...],
    opset: int,
    names: tuple[str, tuple[str, ...]] = (INPUT_NAME, OUTPUT_NAMES),
) -> onnx.ModelProto:
    """`head` (eval mode) as an ONNX model with a dynamic batch dimension, at `opset`; its
    input and outputs are called `names` (the classifier's image -> logits, probs).

    The torch.export-based exporter (torch.onnx.export(dynamo=True)) traces the model, its
    optimizer folds constants and every BatchNorm that follows a Conv or Linear, and onnx's
    version converter takes the opset-18 graph to `opset`. ~1 s per export (the TorchScript
    exporter took 0.01-0.1 s), +2 s for the first one in a process.
    """
    head = head.eval()
    example = torch.rand(2, *input_shape)
    with _quiet_exporter():
        try:
            program = torch.onnx.export(
                head,
                (example,),
                dynamo=True,
                input_names=[names[0]],
                output_names=list(names[1]),
                # Positional (independent of forward()'s argument name); the Dim's name is the
                # dim_param of the input and both outputs.
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=EXPORT_OPSET,
                optimize=True,
                verbose=False,
            )
        except Exception as exc:  # torch.export cannot trace it, or an op has no ONNX function
            cause = _root_cause(exc)
            raise ToolkitError(
                f"ONNX export failed: {type(cause).__name__}: {error_summary(cause, 300)}"
            ) from exc
    model = program.model_proto  # built on each access: read it once
    # torch.onnx silently applies torch.export's suggested fixes: a forward that only works at
    # the example's batch size comes back with a fixed batch of 2 rather than an error.
    for value in (*model.graph.input, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].dim_param != "batch":
            raise ToolkitError(
                f"ONNX export lost the dynamic batch dimension: '{value.name}' has shape "
                f"{[d.dim_param or d.dim_value for d in dims]}, so the model only works at the "
                "example's batch size; make its forward batch-size independent "
                "(x.flatten(1), not x.view(2, -1))"
            )
    if opset != EXPORT_OPSET:
        model = convert_opset(model, opset)
    written = {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise ToolkitError(f"ONNX export wrote opset {sorted(written)}, not {opset}")
    # The exporter writes IR version 10 whatever the opset, which onnxruntime < 1.18 refuses;
    # its only IR-10 content is a note per optimised node in metadata_props.
    for node in model.graph.node:
        del node.metadata_props[:]
    model.ir_version = onnx.helper.find_min_ir_version_for(
        list(model.opset_import), ignore_unknown=True
    )
    return model


def export_classifier(
    head: nn.Module, input_shape: tuple[int, int, int], meta: dict[str, Any], opset: int
) -> onnx.ModelProto:
    """The checked ONNX model of `head`, carrying `meta` in its metadata_props."""
    model = torch_to_onnx(head, input_shape, opset)
    attach_metadata(model, meta)
    check_model(model)
    return model


def build_metadata(
    ckpt: Checkpoint, num_params: int, test_accuracy: float | None, calibration: dict
) -> dict:
    """The facts a client needs, as real JSON values (model.json); one source: the checkpoint
    and its calibration (toolkit.evaluate.calibrate).

    `test_accuracy` is that of `toolkit evaluate` on this very checkpoint, or None.
    """
    model, ds = ckpt.model, ckpt.dataset
    size = parse_size(model["input_size"])
    meta: dict[str, Any] = {
        "classes": list(ds["classes"]),
        "mean": [float(v) for v in ds["mean"]],
        "std": [float(v) for v in ds["std"]],
        "input_size": list(size),  # [height, width]
        "dataset": ds["name"],
        "model": model["name"],
        "model_options": dict(model["options"]),
        "num_params": int(num_params),
        # None without a val split (--val-fraction 0), where the run records NaN: the
        # metadata is JSON, which has no NaN.
        "val_accuracy": None if math.isnan(ckpt.best_val_acc) else float(ckpt.best_val_acc),
        "toolkit_version": __version__,
        "preprocessing": ckpt.resize.rules(),
        **calibration_metadata(calibration),
    }
    if test_accuracy is not None:
        meta["test_accuracy"] = float(test_accuracy)
    return meta


def calibration_metadata(calibration: dict) -> dict[str, Any]:
    """What the metadata says about a calibration record (toolkit.evaluate.calibrate)."""
    calibrator = Calibrator.from_record(calibration)
    selective = calibration["selective"]
    return {
        # "probs" is the calibrator's function of the logits (toolkit.evaluate.calibrators),
        # fitted on val; "temperature" is its first step (1.0 and no val: not calibrated).
        "temperature": float(calibrator.temperature),
        "calibrated_on": calibration["fitted_on"],
        "calibration_method": calibrator.method,
        "calibration_description": calibrator.describe(),
        "calibrator": calibrator.record(),
        # Below this top-1 probability the predictions kept fall short of the target
        # accuracy on val: the app says "not sure" (None: it never does).
        "confidence_threshold": selective["threshold"],
        "confidence_target": selective["target_accuracy"],
    }


def metadata_props(meta: dict[str, Any]) -> dict[str, str]:
    """ONNX metadata values are strings: plain strings stay, everything else becomes JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def attach_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    """Replace the model's metadata_props with `meta` and name the graph after the model."""
    del model.metadata_props[:]
    for key, value in metadata_props(meta).items():
        model.metadata_props.add(key=key, value=value)
    model.producer_name = "toolkit"
    model.producer_version = __version__
    model.doc_string = (
        f"{meta['model']} trained on {meta['dataset']}: input '{INPUT_NAME}' float32 "
        f"N×3×{meta['input_size'][0]}×{meta['input_size'][1]} RGB in [0, 1] (normalisation "
        f"is inside the graph); outputs 'logits' and 'probs' N×{len(meta['classes'])}"
    )
    model.graph.name = f"{meta['dataset']}-{meta['model']}"


def read_metadata(model: onnx.ModelProto) -> dict[str, Any]:
    """metadata_props back to real values, read exactly as the server reads them."""
    return parse_metadata({prop.key: prop.value for prop in model.metadata_props})


def check_model(model: onnx.ModelProto, what: str = "the exported model") -> None:
    """onnx.checker with full shape inference; a failure is a ToolkitError naming `what`."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ToolkitError(f"{what} fails onnx.checker: {first_line(exc, 300)}") from exc


def load_onnx(path: Path) -> onnx.ModelProto:
    """Read and check an .onnx file; a missing, truncated or foreign file is a ToolkitError."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"ONNX model '{path}' not found")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError, external data missing...
        raise ToolkitError(
            f"'{path}' is not a readable ONNX model ({first_line(exc, 300)}); "
            "export it again with `toolkit export`"
        ) from exc
    if not model.graph.node:
        raise ToolkitError(f"'{path}' is not an ONNX model (empty graph); export it again")
    check_model(model, f"'{path}'")
    return model


# --- what a graph is and costs ---------------------------------------------------------------


def input_shape(model: onnx.ModelProto) -> tuple[int, ...]:
    """The per-image input shape (C, H, W) of the graph input `image`."""
    for value in model.graph.input:
        if value.name == INPUT_NAME:
            dims = value.type.tensor_type.shape.dim[1:]
            if dims and all(d.HasField("dim_value") for d in dims):
                return tuple(int(d.dim_value) for d in dims)
    raise ToolkitError(
        f"the model has no fixed-size input '{INPUT_NAME}'; was it exported by `toolkit export`?"
    )


def count_macs(model: onnx.ModelProto) -> int:
    """Multiply-accumulates per image of the Conv, Gemm and MatMul nodes.

    Shapes come from onnx shape inference with the batch fixed to 1, so the count works on any
    exported file (fp32, fp16, QDQ int8) without the torch model. Only the main graph counts:
    a selective TTA graph's views, inside an If, run only for the images it is unsure of.
    """
    shapes = _inferred_shapes(_batch_of_one(model))
    macs = 0
    for node in model.graph.node:
        out = shapes.get(node.output[0]) if node.output else None
        if node.op_type == "Conv" and out and node.input[1] in shapes:
            macs += math.prod(out) * math.prod(shapes[node.input[1]][1:])
        elif node.op_type == "Gemm" and out and node.input[0] in shapes:
            trans_a = any(a.name == "transA" and a.i for a in node.attribute)
            a_shape = shapes[node.input[0]]
            macs += math.prod(out) * (a_shape[0] if trans_a else a_shape[-1])
        elif node.op_type == "MatMul" and out and node.input[0] in shapes:
            macs += math.prod(out) * shapes[node.input[0]][-1]
    return int(macs)


def _batch_of_one(model: onnx.ModelProto) -> onnx.ModelProto:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    del fixed.graph.value_info[:]
    for value in (*fixed.graph.input, *fixed.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = 1
    return fixed


def _inferred_shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {init.name: list(init.dims) for init in inferred.graph.initializer}
    graph = inferred.graph
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [int(d.dim_value) for d in dims]
    return shapes


def count_initializer_params(model: onnx.ModelProto) -> int:
    """Elements of non-scalar float/int8 initializers: parameters of a file without metadata."""
    skip = {onnx.TensorProto.INT64}  # shape constants, not weights
    return sum(
        math.prod(i.dims) for i in model.graph.initializer if i.dims and i.data_type not in skip
    )


def precision(model: onnx.ModelProto) -> str:
    """fp32, fp16 or int8 (QDQ), from the graph itself."""
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node):
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return "fp32"
