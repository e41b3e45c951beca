"""INT8 inside an `If`: the branches of a selective TTA graph (toolkit.tta), quantized too.

onnxruntime's static quantizer does not enter subgraphs: it quantizes the main graph and
leaves an If's branches in fp32, each keeping fp32 copies of the weights it reads, so the
INT8 file of a selective graph came out larger than the fp32 one (speedrun: 9.9 against
8.7 MB) and its unsure images ran in fp32. Here each branch that computes something is cut
out as a model of its own, whose inputs are the values it reads from the graph around it;
it is calibrated on those values as the fp32 graph computes them for the calibration images
(only batches that take the branch), quantized the same way, and spliced back under
prefixed names (a branch may not redefine an outer name). The shipped speedrun, batch 1 on
real val images (benchmarks/tta_serving.md): 0.56 ms against 1.42 in fp32, 4.1 MB against
8.7, 90.14 % test against 90.22.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import numpy as np
import onnx
from onnx import shape_inference

from toolkit.errors import ToolkitError
from toolkit.export.bench import CPU, make_session
from toolkit.export.onnx_graph import INPUT_NAME

log = logging.getLogger(__name__)

PREFIX = "branch/"  # what the spliced branch's own names start with
# (model, calibration feeds) -> its static INT8 copy; toolkit.export.quantize supplies it.
Quantizer = Callable[[onnx.ModelProto, list[dict]], onnx.ModelProto]


def names_read(node: onnx.NodeProto) -> set[str]:
    """Every name `node` reads: its inputs and what its subgraphs read from outside them."""
    names = set(node.input)
    for graph in subgraphs(node):
        names |= read_from_outside(graph)
    return names - {""}  # "" marks an optional input left out


def read_from_outside(graph: onnx.GraphProto) -> set[str]:
    """The names `graph` (a subgraph) reads from the graph around it."""
    inside = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    inside |= {name for n in graph.node for name in n.output}
    return {name for inner in graph.node for name in names_read(inner)} - inside


def subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    graphs = []
    for attribute in node.attribute:
        if attribute.HasField("g"):
            graphs.append(attribute.g)
        graphs.extend(attribute.graphs)
    return graphs


def quantize_branches(
    fp32: onnx.ModelProto,
    quantized: onnx.ModelProto,
    calibration: np.ndarray,
    batch: int,
    quantize: Quantizer,
) -> onnx.ModelProto:
    """`quantized` (the main graph of `fp32` in INT8) with the If branches that hold a Conv
    quantized too, in place; a branch that cannot be (no calibration batch takes it, a value
    it reads gone from the quantized graph, the quantizer refuses it) stays fp32, with a log
    line saying why."""
    made = {name for node in quantized.graph.node for name in node.output}
    made |= {v.name for v in quantized.graph.input}
    inferred = shape_inference.infer_shapes(fp32).graph  # the types of what branches read
    typed = {v.name: v for v in [*inferred.value_info, *inferred.input, *inferred.output]}
    for node in (n for n in fp32.graph.node if n.op_type == "If"):
        target = next(
            (n for n in quantized.graph.node if (n.op_type, n.input[0]) == ("If", node.input[0])),
            None,
        )
        if target is None:
            log.info("INT8: %s is not in the quantized graph; its branches stay fp32", node.name)
            continue
        for attribute in node.attribute:
            if not any(n.op_type == "Conv" for n in attribute.g.node):
                continue  # e.g. the branch that passes the plain logits on
            branch, reads = _as_model(fp32, attribute.g, typed)
            if not set(reads) <= made:
                log.info("INT8: %s's %s stays fp32 (reads %s)", node.name, attribute.name, reads)
                continue
            feeds = _feeds(fp32, typed, node.input[0], reads, calibration, batch)
            if not feeds:
                log.info("INT8: no calibration batch takes %s's %s", node.name, attribute.name)
                continue
            try:
                _splice(target, attribute.name, quantize(branch, feeds), reads)
            except ToolkitError as exc:  # the quantizer refused the branch: it stays fp32
                log.info("INT8: %s's %s stays fp32: %s", node.name, attribute.name, exc)
    read = {name for node in quantized.graph.node for name in names_read(node)}
    read |= {v.name for v in quantized.graph.output}
    kept = [t for t in quantized.graph.initializer if t.name in read]  # fp32 copies go
    del quantized.graph.initializer[:]
    quantized.graph.initializer.extend(kept)
    return quantized


def _as_model(
    model: onnx.ModelProto, branch: onnx.GraphProto, typed: dict[str, onnx.ValueInfoProto]
) -> tuple[onnx.ModelProto, list[str]]:
    """`branch` as a model of its own: the outer values it reads become its inputs (typed as
    `typed` says), the outer weights it reads its initializers. Also those input names."""
    weights = {t.name: t for t in model.graph.initializer}
    outside = sorted(read_from_outside(branch))
    reads = [name for name in outside if name not in weights]
    graph = onnx.helper.make_graph(
        list(branch.node),
        branch.name,
        [typed[name] for name in reads],
        list(branch.output),
        [weights[name] for name in outside if name in weights] + list(branch.initializer),
    )
    standalone = onnx.helper.make_model(
        graph, opset_imports=model.opset_import, ir_version=model.ir_version
    )
    return standalone, reads


def _feeds(
    model: onnx.ModelProto,
    typed: dict[str, onnx.ValueInfoProto],
    condition: str,
    reads: list[str],
    images: np.ndarray,
    batch: int,
) -> list[dict]:
    """The values the branch reads, as the fp32 graph computes them for each batch of
    `images` whose If takes the branch (its condition true)."""
    probe = copy.deepcopy(model)
    given = {o.name for o in probe.graph.output} | {v.name for v in probe.graph.input}
    probe.graph.output.extend(
        typed[name] for name in [condition, *reads] if name in typed and name not in given
    )
    session = make_session(probe.SerializeToString(), CPU, 1)
    names = [o.name for o in session.get_outputs()]
    feeds = []
    for start in range(0, len(images), batch):
        chunk = {INPUT_NAME: images[start : start + batch]}
        computed = {**dict(zip(names, session.run(None, chunk), strict=True)), **chunk}
        if np.asarray(computed[condition]).any():
            feeds.append({name: computed[name] for name in reads})
    return feeds


def _splice(
    node: onnx.NodeProto, attribute: str, branch: onnx.ModelProto, reads: list[str]
) -> None:
    """`branch`'s graph into `node`'s `attribute`: its inputs become the outer names they
    came from, every other name gets PREFIX, its outputs keep theirs."""
    graph = branch.graph
    keep = set(reads) | {o.name for o in graph.output} | {""}

    def renamed(name: str) -> str:
        return name if name in keep else PREFIX + name

    for inner in graph.node:
        inner.name = PREFIX + inner.name
        inner.input[:] = [renamed(name) for name in inner.input]
        inner.output[:] = [renamed(name) for name in inner.output]
    for tensor in graph.initializer:
        tensor.name = renamed(tensor.name)
    for value in graph.value_info:
        value.name = renamed(value.name)
    spliced = onnx.helper.make_graph(
        list(graph.node),
        graph.name,
        [],
        list(graph.output),
        list(graph.initializer),
        value_info=list(graph.value_info),
    )
    next(a for a in node.attribute if a.name == attribute).g.CopyFrom(spliced)
