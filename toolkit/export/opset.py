"""Which ONNX opset an export writes, and the conversion from the exporter's own (18).

17 runs on every onnxruntime since 1.13 and every recent Triton (the IR version is lowered to
what the opset needs, see toolkit.export.onnx_graph.torch_to_onnx); nothing in these models
needs a newer operator.
"""

from __future__ import annotations

import onnx
import torch

from toolkit.errors import ToolkitError, first_line

DEFAULT_OPSET = 17
# The exporter's operator library (torchlib) writes opset 18; every other opset is a conversion
# by onnx's version converter, which has no down-adapter for BatchNormalization-15 (a BN after
# an activation, as in lenet5 --batch-norm, stays in the graph) nor for Sub-14 (every model).
EXPORT_OPSET = 18
MIN_OPSET = 15
# Selective TTA's graph holds an If whose branches onnx's version converter cannot take below
# the exporter's own opset (their reductions' axes are outer-scope constants).
SELECTIVE_TTA_OPSET = EXPORT_OPSET


def max_opset() -> int:
    """The newest opset both torch.onnx and the installed onnx can write."""
    try:
        from torch.onnx._constants import ONNX_MAX_OPSET as exporter_max
    except ImportError:  # a private constant: if it moves, stay on the exporter's own opset
        exporter_max = EXPORT_OPSET
    return min(int(exporter_max), onnx.defs.onnx_opset_version())


def check_opset(opset: int | None) -> int:
    """The opset to export with; one this installation cannot produce is a ToolkitError."""
    if opset is None:
        return min(DEFAULT_OPSET, max_opset())
    top = max_opset()
    if not MIN_OPSET <= opset <= top:
        raise ToolkitError(
            f"cannot export opset {opset}: torch {torch.__version__} with onnx "
            f"{onnx.__version__} writes opsets {MIN_OPSET}..{top}; pass --opset in that range "
            f"(default {DEFAULT_OPSET})"
        )
    return opset


def selective_opset(requested: int | None, default: int) -> int:
    """The opset of a selective-TTA export: the exporter's own unless one was asked for,
    which must then be at least that."""
    if requested is None:
        return max(default, SELECTIVE_TTA_OPSET)
    if requested < SELECTIVE_TTA_OPSET:
        raise ToolkitError(
            f"selective TTA (--tta-below) exports an If that opset {requested} cannot hold "
            f"here; pass --opset {SELECTIVE_TTA_OPSET} or more (or export without --tta)"
        )
    return requested


def convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """The exporter's opset-18 graph at `opset` (onnx's version converter)."""
    try:
        model = onnx.version_converter.convert_version(model, opset)
    except Exception as exc:  # no adapter for one of the graph's operators
        raise ToolkitError(
            f"cannot convert the exported graph to opset {opset}: {first_line(exc, 200)}; "
            f"pass another --opset in {MIN_OPSET}..{max_opset()} (default {DEFAULT_OPSET})"
        ) from exc
    _drop_converted_reduce_attribute(model)
    return model


def _drop_converted_reduce_attribute(model: onnx.ModelProto) -> None:
    """onnx's version converter takes a ReduceMean (and kin) below opset 18 (axes back to an
    attribute) but keeps its `noop_with_empty_axes`, an attribute only opset 18 has and
    onnx.checker then refuses (timm's global average pool). At 0, its default, it means
    nothing; at 1 there is no older equivalent."""
    for node in model.graph.node:
        if not node.op_type.startswith("Reduce"):
            continue
        for attribute in list(node.attribute):
            if attribute.name != "noop_with_empty_axes":
                continue
            if attribute.i:
                raise ToolkitError(f"{node.op_type} with noop_with_empty_axes=1 needs opset 18")
            node.attribute.remove(attribute)
