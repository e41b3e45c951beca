"""An Open Inference Protocol infer request, checked, and its response (oip.py beside it has
what the protocol says about a model, and the two extensions spoken).

`parse_infer` turns a body (JSON, or JSON followed by binary tensors) into an N×3×H×W float32
batch and the outputs wanted, or raises RequestError naming what is wrong: every size a
request declares is checked before anything of that size is allocated, and the values must be
finite RGB in [0, 1]. `encode_response` writes the answer, tensors in JSON or binary, or the
classification extension's "<value>:<index>:<label>" strings.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from serving.api.oip import VERSION, ModelSpec, RequestError, dims, quote


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool
    classification: int  # top-k labels instead of the tensor; 0: the tensor itself


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    images: np.ndarray  # N×3×H×W float32 in [0, 1]
    outputs: list[RequestedOutput]


def parse_infer(body: bytes, header_length: str | None, spec: ModelSpec) -> InferRequest:
    """An infer request's body (JSON, or JSON + binary tensors) -> a checked InferRequest."""
    text, binary = split_body(body, header_length)
    request = parse_json_object(text)
    params = _object(request.get("parameters"), "the request's 'parameters'")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(f"'id' must be a string, not {quote(request_id)}")
    return InferRequest(
        id=request_id,
        images=read_images(request.get("inputs"), binary, spec),
        outputs=requested_outputs(request.get("outputs"), params, spec),
    )


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """(JSON, binary tensors) by the Inference-Header-Content-Length header, if any."""
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise RequestError(
            f"Inference-Header-Content-Length must be a byte count, not {header_length[:40]!r}"
        ) from None
    if not 0 < length <= len(body):
        raise RequestError(
            f"Inference-Header-Content-Length {length} does not fit the {len(body)}-byte body"
        )
    return body[:length], body[length:]


def parse_json_object(text: bytes) -> dict:
    # orjson: ten times faster than the json module on a tensor's numbers (a 32×32 image is
    # 3,072 of them, 0.1 ms instead of 1 ms), and strict: NaN, Infinity and nesting deeper
    # than 1,024 levels are invalid JSON, refused here.
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError as exc:  # also bad UTF-8
        raise RequestError(
            f"the request body is not valid JSON ({str(exc)[:200]})", kind="json"
        ) from None
    if not isinstance(value, dict):
        raise RequestError(
            f"the request body must be a JSON object with 'inputs', not {quote(value)}",
            kind="json",
        )
    return value


def read_images(inputs: Any, binary: bytes, spec: ModelSpec) -> np.ndarray:
    """The one input tensor -> N×3×H×W float32, after checking name, datatype, shape (before
    anything of that size exists), the data's length, and that every value is in [0, 1]."""
    wanted = spec.input
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise RequestError(
            f"'inputs' must be a list of one tensor, {wanted.name!r} ({wanted.datatype}, "
            f"shape {dims(wanted.shape)}), not {quote(inputs)}",
            kind="input",
        )
    tensor = inputs[0]
    name = tensor.get("name")
    if name != wanted.name:
        raise RequestError(
            f"input {quote(name)} is not an input of {spec.key}; it takes {wanted.name!r}",
            kind="input_name",
        )
    if tensor.get("datatype") != wanted.datatype:
        raise RequestError(
            f"input {name!r} must be {wanted.datatype}, not {quote(tensor.get('datatype'))}",
            kind="datatype",
        )
    shape = check_shape(tensor.get("shape"), spec)
    count = math.prod(shape)
    size = _object(tensor.get("parameters"), f"input {name!r}'s 'parameters'").get(
        "binary_data_size"
    )
    if size is not None:
        values = binary_values(size, binary, count, name)
    elif binary:
        raise RequestError(
            f"the body has {len(binary)} bytes after its JSON but input {name!r} declares no "
            "parameters.binary_data_size",
            kind="binary",
        )
    else:
        values = json_values(tensor.get("data"), count, name)
    check_pixels(values, name)
    return values.reshape(shape)


def check_shape(shape: Any, spec: ModelSpec) -> list[int]:
    wanted = spec.input
    if not (
        isinstance(shape, list)
        and all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
    ):
        raise RequestError(f"'shape' must be a list of integers, not {quote(shape)}", kind="shape")
    if len(shape) != len(wanted.shape):
        raise RequestError(
            f"shape {quote(shape)} has rank {len(shape)}; input {wanted.name!r} takes rank "
            f"{len(wanted.shape)}, {dims(wanted.shape)}",
            kind="shape",
        )
    if shape[1:] != wanted.shape[1:]:
        raise RequestError(
            f"shape {quote(shape)} does not fit input {wanted.name!r}, which takes "
            f"{dims(wanted.shape)}",
            kind="shape",
        )
    batch = shape[0]
    if spec.fixed_batch is not None and batch != spec.fixed_batch:
        raise RequestError(
            f"{spec.key} was exported for batches of exactly {spec.fixed_batch}, not {batch}",
            kind="batch",
        )
    if batch < 1:
        raise RequestError(f"shape {quote(shape)} holds no image; the batch must be at least 1")
    if batch > spec.max_batch:
        raise RequestError(
            f"a batch of {batch} images is over this server's max_batch_size of "
            f"{spec.max_batch}; split the request",
            kind="batch",
        )
    return shape


def binary_values(size: Any, binary: bytes, count: int, name: str) -> np.ndarray:
    expected = count * 4  # FP32
    if not isinstance(size, int) or isinstance(size, bool) or size != expected:
        raise RequestError(
            f"input {name!r} declares binary_data_size {quote(size)}; its shape needs "
            f"{expected} bytes ({count} FP32 values)",
            kind="binary",
        )
    if len(binary) != size:
        raise RequestError(
            f"input {name!r} declares {size} bytes of binary data; the body carries "
            f"{len(binary)} after its JSON",
            kind="binary",
        )
    return np.frombuffer(binary, dtype="<f4")


def json_values(data: Any, count: int, name: str) -> np.ndarray:
    """'data', flat or nested in row-major order, as `count` numbers (strings, booleans and
    nulls are refused, not converted)."""
    if data is None:
        raise RequestError(
            f"input {name!r} has no 'data' (nor parameters.binary_data_size)", kind="data"
        )
    try:
        values = np.asarray(data)
    except ValueError:  # ragged nesting
        raise RequestError(
            f"input {name!r}'s 'data' is ragged, not a tensor", kind="data"
        ) from None
    if values.dtype.kind not in "fiu":
        raise RequestError(f"input {name!r}'s 'data' must hold only numbers", kind="data")
    if values.size != count:
        raise RequestError(
            f"input {name!r} has {values.size} values; its shape needs {count}", kind="data"
        )
    return values.astype(np.float32).ravel()


def check_pixels(values: np.ndarray, name: str) -> None:
    """Finite values in [0, 1]: what the model was trained on. A batch of raw 0..255 bytes or
    of already-normalised values would be answered with confident nonsense."""
    finite = np.isfinite(values)
    if not finite.all():
        first = int(np.flatnonzero(~finite)[0])
        raise RequestError(
            f"input {name!r} holds NaN or infinite values (the first at flat index {first})",
            kind="nan",
        )
    low, high = float(values.min()), float(values.max())
    if low < 0.0 or high > 1.0:
        raise RequestError(
            f"input {name!r} has values from {low:g} to {high:g}; it takes RGB scaled to "
            "[0, 1] (divide 8-bit pixels by 255; the model normalises by itself)",
            kind="range",
        )


def requested_outputs(outputs: Any, params: dict, spec: ModelSpec) -> list[RequestedOutput]:
    """What to answer with: every output when the request names none (as Triton does)."""
    binary_default = params.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise RequestError("parameters.binary_data_output must be true or false")
    if outputs is None or outputs == []:
        return [RequestedOutput(name, binary_default, 0) for name in spec.output_names]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise RequestError(f"'outputs' must be a list of objects, not {quote(outputs)}")
    chosen: list[RequestedOutput] = []
    for output in outputs:
        name = output.get("name")
        if name not in spec.output_names:
            raise RequestError(
                f"output {quote(name)} is not an output of {spec.key}; it has "
                f"{', '.join(map(repr, spec.output_names))}",
                kind="output_name",
            )
        if any(c.name == name for c in chosen):
            raise RequestError(f"output {name!r} is requested twice", kind="output_name")
        options = _object(output.get("parameters"), f"output {name!r}'s 'parameters'")
        binary = options.get("binary_data", binary_default)
        k = options.get("classification", 0)
        if not isinstance(binary, bool):
            raise RequestError(f"output {name!r}: binary_data must be true or false")
        if not (isinstance(k, int) and not isinstance(k, bool) and 0 <= k <= len(spec.classes)):
            raise RequestError(
                f"output {name!r}: classification must be a count from 1 to "
                f"{len(spec.classes)}, not {quote(k)}",
                kind="classification",
            )
        chosen.append(RequestedOutput(name, binary, k))
    return chosen


# --- the response --------------------------------------------------------------------------


def encode_response(
    model_name: str, request: InferRequest, results: dict[str, np.ndarray], classes: Sequence[str]
) -> tuple[bytes, int | None]:
    """(body, JSON length when binary tensors follow it, else None)."""
    outputs, blobs = [], []
    for wanted in request.outputs:
        values = results[wanted.name]
        if wanted.classification:
            labels = classification(values, wanted.classification, classes)
            entry = {"name": wanted.name, "datatype": "BYTES", "shape": list(labels.shape)}
            blob = serialize_bytes(labels) if wanted.binary else None
            data = labels.ravel().tolist()
        else:
            entry = {"name": wanted.name, "datatype": "FP32", "shape": list(values.shape)}
            blob = values.astype("<f4").tobytes() if wanted.binary else None
            data = values.ravel().tolist()
        if blob is None:
            entry["data"] = data
        else:
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": VERSION}
    if request.id is not None:
        response["id"] = request.id
    response["outputs"] = outputs
    text = orjson.dumps(response)
    if not blobs:
        return text, None
    return text + b"".join(blobs), len(text)


def classification(values: np.ndarray, k: int, classes: Sequence[str]) -> np.ndarray:
    """N×classes values -> N×k strings "<value>:<index>:<label>", highest first (ties: the
    lower index first)."""
    order = np.argsort(-values, axis=1, kind="stable")[:, :k]
    rows = [
        [f"{row[i]:f}:{i}:{classes[i]}" for i in top]
        for row, top in zip(values, order, strict=True)
    ]
    return np.array(rows, dtype=object)


def serialize_bytes(strings: np.ndarray) -> bytes:
    """BYTES tensor, binary form: each element's length (4 bytes, little-endian), then it."""
    parts = []
    for text in strings.ravel():
        data = str(text).encode()
        parts.append(struct.pack("<I", len(data)) + data)
    return b"".join(parts)


def _object(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(f"{what} must be a JSON object, not {quote(value)}")
    return value
