"""The Open Inference Protocol ("v2", KServe and Triton's REST protocol) for our classifiers,
without a web framework: what a model says about itself (metadata, Triton-style config), the
error every refusal raises; oip_infer.py beside it reads infer requests and writes responses.

Each model takes one input, `image`: FP32, N×3×H×W, RGB in [0, 1] (exactly what model.onnx and
the Triton repository of `toolkit export --triton` take), and returns the graph's outputs
(`logits`, `probs`). Two extensions are spoken, as tritonclient uses them:

- binary tensor data: a body of JSON followed by raw little-endian tensors, the JSON's length
  in the `Inference-Header-Content-Length` header; `parameters.binary_data_size` on an input,
  `parameters.binary_data` on an output (or `binary_data_output` on the request) to get one
  back that way;
- classification: `parameters.classification: k` on an output answers, instead of the tensor,
  BYTES of shape N×k holding "<value>:<index>:<label>", the k highest values first.

Anything a request can get wrong raises RequestError with a message that names the problem.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from serving.classifier import OnnxClassifier

# The largest batch one request may carry: the max_batch_size of the Triton configuration
# toolkit writes (tests/test_oip_triton.py checks they agree), so a client that works here
# works there.
MAX_BATCH_SIZE = 64
VERSION = "1"  # the Triton repository holds each model as version 1
PLATFORM = "onnxruntime_onnx"
EXTENSIONS = ["classification", "binary_tensor_data"]
HEADER_LENGTH = "inference-header-content-length"
# Our graphs take and give float32 (OnnxClassifier runs a float32 image through each at start).
DATATYPES = {"tensor(float)": "FP32"}
TRITON_TYPES = {"FP32": "TYPE_FP32"}
# A JSON float as clients write one ("0.5294117647058824, "): sizes the infer body cap.
JSON_BYTES_PER_VALUE = 24


class RequestError(ValueError):
    """A request the server will not answer: the message says why (the client reads it), the
    HTTP `status` and the metrics' error `kind` say how; `headers` go with the answer."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "bad_request",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.headers = headers or {}


def triton_name(meta: dict[str, Any]) -> str:
    """The model's name in a `toolkit export --triton` repository (a folder name, so only
    [A-Za-z0-9_-]), from its metadata: `cifar10_resnet10` for `cifar10-resnet10`, with
    `_int8` (or `_fp16`) for a converted model. toolkit/export/triton.py names the
    repository's models with it, so the two servers agree by construction."""
    precision = meta.get("precision")
    suffix = f"_{precision}" if precision and precision != "fp32" else ""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", f"{meta['dataset']}_{meta['model']}{suffix}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: list[int]  # -1 for the batch dimension when it is dynamic

    def metadata(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": self.shape}


@dataclass(frozen=True)
class ModelSpec:
    """One served model as the protocol describes it; built from the ONNX session itself."""

    key: str
    names: tuple[str, ...]  # the catalog key first, then the Triton repository's name
    input: TensorSpec
    outputs: tuple[TensorSpec, ...]
    classes: tuple[str, ...]
    max_batch: int
    fixed_batch: int | None  # a model exported for one batch size takes only that one
    parameters: dict[str, Any]

    @classmethod
    def of(cls, key: str, classifier: OnnxClassifier) -> ModelSpec:
        session = classifier.session
        (graph_input,) = session.get_inputs()
        fixed = classifier.batch_limit
        batch = fixed or -1
        meta = classifier.metadata
        return cls(
            key=key,
            names=tuple(dict.fromkeys([key, triton_name(meta)])),
            input=TensorSpec(graph_input.name, "FP32", [batch, 3, *classifier.input_size]),
            outputs=tuple(
                TensorSpec(o.name, DATATYPES.get(o.type, o.type), [batch, len(classifier.classes)])
                for o in session.get_outputs()
            ),
            classes=tuple(classifier.classes),
            max_batch=min(fixed or MAX_BATCH_SIZE, MAX_BATCH_SIZE),
            fixed_batch=fixed,
            parameters={
                "dataset": meta["dataset"],
                "model": meta["model"],
                "input": "RGB in [0, 1], N×3×H×W; the normalisation is inside the model",
                "temperature": classifier.temperature,
                # What "probs" is beyond the temperature (older models: temperature alone).
                "calibration_method": meta.get("calibration_method", "temperature"),
                "confidence_threshold": classifier.confidence_threshold,
            },
        )

    @property
    def output_names(self) -> list[str]:
        return [o.name for o in self.outputs]

    def metadata(self, name: str) -> dict:
        """GET /v2/models/{name}: the protocol's fields, plus what a client needs to read the
        answer (the classes, the batch limit, every name the model answers to)."""
        return {
            "name": name,
            "versions": [VERSION],
            "platform": PLATFORM,
            "inputs": [self.input.metadata()],
            "outputs": [o.metadata() for o in self.outputs],
            "parameters": {
                **self.parameters,
                "names": list(self.names),
                "classes": list(self.classes),
                "max_batch_size": self.max_batch,
            },
        }

    def config(self, name: str) -> dict:
        """GET /v2/models/{name}/config: the model configuration Triton would report for the
        repository `toolkit export --triton` writes (dims without the batch dimension)."""

        def entry(tensor: TensorSpec) -> dict:
            return {
                "name": tensor.name,
                "data_type": TRITON_TYPES.get(tensor.datatype, tensor.datatype),
                "dims": tensor.shape[1:],
            }

        return {
            "name": name,
            "platform": PLATFORM,
            "max_batch_size": self.max_batch,
            "input": [{**entry(self.input), "format": "FORMAT_NCHW"}],
            "output": [entry(o) for o in self.outputs],
        }

    def body_limit(self) -> int:
        """The largest infer body a full batch can need: JSON numbers, the bulkier form."""
        return self.max_batch * math.prod(self.input.shape[1:]) * JSON_BYTES_PER_VALUE


def server_metadata(version: str) -> dict:
    return {"name": "toolkit", "version": version, "extensions": EXTENSIONS}


def dims(shape: list[int]) -> str:
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def quote(value: Any) -> str:
    """A client's value quoted in a message, cut short: the message must stay small, and
    quoting a huge or deeply nested value must cost nothing. Short flat lists are shown."""
    if isinstance(value, (list, dict)):
        flat = all(isinstance(v, (str, int, float, bool, type(None))) for v in value)
        if isinstance(value, dict) or len(value) > 8 or not flat:
            kind = "list" if isinstance(value, list) else "object"
            return f"a {kind} of {len(value)} item{'' if len(value) == 1 else 's'}"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):  # a value orjson read but json cannot write back
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."
