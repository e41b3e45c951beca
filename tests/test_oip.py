"""The Open Inference Protocol without a server (serving/api/oip.py, serving/api/oip_infer.py):
what a shipped model says about itself, every way an infer request can be wrong (each refused
with its own message, before anything of the declared size exists), and responses that
tritonclient's own decoder reads back.

The hostile requests are listed once here (`PROTOCOL_CASES`); tests/test_oip_server.py sends
the same ones over HTTP.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.api.oip import MAX_BATCH_SIZE, ModelSpec, RequestError, quote, server_metadata
from serving.api.oip_infer import (
    InferRequest,
    RequestedOutput,
    classification,
    encode_response,
    parse_infer,
)
from serving.classifier import OnnxClassifier

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
MODEL = "cifar10-net"
PIXELS = 3 * 32 * 32


@pytest.fixture(scope="module")
def classifier() -> OnnxClassifier:
    return OnnxClassifier(ARTIFACTS / MODEL / "model.onnx")


@pytest.fixture(scope="module")
def spec(classifier) -> ModelSpec:
    return ModelSpec.of(MODEL, classifier)


def example_batch(names: tuple[str, ...] = ("cat_0", "ship_0", "frog_1")) -> np.ndarray:
    """Real 32×32 test images as the protocol carries them: N×3×32×32 float32 in [0, 1]."""
    images = [
        np.asarray(Image.open(ARTIFACTS / "examples" / "cifar10" / f"{n}.png").convert("RGB"))
        for n in names
    ]
    return (np.stack(images).transpose(0, 3, 1, 2) / 255.0).astype(np.float32)


def tensor(images: np.ndarray, **overrides) -> dict:
    """The input tensor of a JSON infer request, with any field replaced."""
    return {
        "name": "image",
        "datatype": "FP32",
        "shape": list(images.shape),
        "data": images.ravel().tolist(),
        **overrides,
    }


def json_body(images: np.ndarray | None = None, **request) -> bytes:
    request.setdefault("inputs", [tensor(example_batch() if images is None else images)])
    return json.dumps(request).encode()


def binary_body(images: np.ndarray, **input_parameters) -> tuple[bytes, str]:
    """(JSON header + raw FP32 tensor, the Inference-Header-Content-Length value)."""
    raw = images.astype("<f4").tobytes()
    described = tensor(images, parameters={"binary_data_size": len(raw), **input_parameters})
    del described["data"]
    header = json.dumps({"inputs": [described]}).encode()
    return header + raw, str(len(header))


def one(**overrides) -> bytes:
    """A one-image JSON request whose input tensor has `overrides`."""
    return json_body(inputs=[tensor(example_batch(("cat_0",)), **overrides)])


def _binary_with(values: np.ndarray) -> tuple[bytes, str]:
    return binary_body(values.reshape(1, 3, 32, 32).astype(np.float32))


_NAN = np.full(PIXELS, 0.5, np.float32)
_NAN[7] = np.nan
_INF = np.full(PIXELS, 0.5, np.float32)
_INF[0] = np.inf
_SHORT, _SHORT_LENGTH = binary_body(example_batch(("cat_0",)))
_NESTED = b"[" * 2000 + b"]" * 2000

# (id, body, Inference-Header-Content-Length, error kind, what the message must say)
PROTOCOL_CASES = [
    ("malformed-json", b'{"inputs": [', None, "json", r"not valid JSON"),
    ("not-utf8", b'{"inputs": "\xff"}', None, "json", r"not valid JSON"),
    ("json-array", b"[1, 2, 3]", None, "json", r"must be a JSON object with 'inputs'"),
    ("nan-literal", one().replace(b"0.", b"NaN, 0.", 1), None, "json", r"not valid JSON"),
    ("too-deep", b'{"inputs": ' + _NESTED + b"}", None, "json", r"not valid JSON"),
    ("no-inputs", json_body(inputs=None), None, "input", r"'inputs' must be a list of one"),
    (
        "two-inputs",
        json_body(inputs=[tensor(example_batch(("cat_0",)))] * 2),
        None,
        "input",
        r"a list of one tensor, 'image' \(FP32, shape \[N, 3, 32, 32\]\)",
    ),
    ("input-name", one(name="input0"), None, "input_name", r'"input0" is not an input'),
    ("datatype", one(datatype="UINT8"), None, "datatype", r"must be FP32, not \"UINT8\""),
    ("rank", one(shape=[3, 32, 32]), None, "shape", r"has rank 3; input 'image' takes rank 4"),
    ("dims", one(shape=[1, 3, 64, 64]), None, "shape", r"does not fit input 'image'"),
    ("shape-strings", one(shape=["1", 3, 32, 32]), None, "shape", r"list of integers"),
    ("shape-bool", one(shape=[True, 3, 32, 32]), None, "shape", r"list of integers"),
    ("billions", one(shape=[10**9, 3, 32, 32]), None, "batch", r"1000000000 images is over"),
    ("batch-over-limit", one(shape=[65, 3, 32, 32]), None, "batch", r"max_batch_size of 64"),
    ("empty-batch", one(shape=[0, 3, 32, 32]), None, "bad_request", r"holds no image"),
    ("data-length", one(shape=[2, 3, 32, 32]), None, "data", r"has 3072 values.*needs 6144"),
    ("data-strings", one(data=["0.5"] * PIXELS), None, "data", r"must hold only numbers"),
    ("data-nulls", one(data=[None] * PIXELS), None, "data", r"must hold only numbers"),
    ("data-ragged", one(data=[[0.5], [0.5, 0.5]]), None, "data", r"is ragged"),
    ("no-data", one(data=None), None, "data", r"has no 'data'"),
    ("raw-bytes", one(data=[255] * PIXELS), None, "range", r"values from 255 to 255.*\[0, 1\]"),
    ("normalised", one(data=[-1.5] * PIXELS), None, "range", r"values from -1\.5"),
    (
        "binary-nan",
        *_binary_with(_NAN),
        "nan",
        r"NaN or infinite values \(the first at flat index 7",
    ),
    ("binary-inf", *_binary_with(_INF), "nan", r"NaN or infinite"),
    (
        "binary-size",
        binary_body(example_batch(("cat_0",)), binary_data_size=100)[0],
        binary_body(example_batch(("cat_0",)), binary_data_size=100)[1],
        "binary",
        r"declares binary_data_size 100; its shape needs 12288 bytes",
    ),
    ("binary-short", _SHORT[:-10], _SHORT_LENGTH, "binary", r"the body carries 12278"),
    ("binary-undeclared", one() + b"\0" * 16, str(len(one())), "binary", r"declares no"),
    ("header-length-text", one(), "twelve", "bad_request", r"must be a byte count"),
    ("header-length-long", one(), "99999999", "bad_request", r"does not fit the \d+-byte body"),
    (
        "output-name",
        json_body(outputs=[{"name": "scores"}]),
        None,
        "output_name",
        r'"scores" is not an output of cifar10-net; it has \'logits\', \'probs\'',
    ),
    (
        "output-twice",
        json_body(outputs=[{"name": "probs"}, {"name": "probs"}]),
        None,
        "output_name",
        r"requested twice",
    ),
    (
        "classification-count",
        json_body(outputs=[{"name": "probs", "parameters": {"classification": 11}}]),
        None,
        "classification",
        r"count from 1 to 10, not 11",
    ),
    (
        "binary-flag",
        json_body(outputs=[{"name": "probs", "parameters": {"binary_data": "yes"}}]),
        None,
        "bad_request",
        r"binary_data must be true or false",
    ),
    ("id-number", json_body(id=7), None, "bad_request", r"'id' must be a string"),
    ("parameters-list", json_body(parameters=[1]), None, "bad_request", r"must be a JSON object"),
]


# --- what a model says about itself ------------------------------------------------------------


def test_a_shipped_model_describes_itself_as_its_onnx_graph_does(spec, classifier):
    assert spec.names == ("cifar10-net", "cifar10_net")  # catalog key, then the Triton name
    meta = spec.metadata("cifar10_net")
    assert meta["name"] == "cifar10_net" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [
        {"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
        {"name": "probs", "datatype": "FP32", "shape": [-1, 10]},
    ]
    assert meta["parameters"]["classes"] == classifier.classes
    assert meta["parameters"]["max_batch_size"] == MAX_BATCH_SIZE
    assert meta["parameters"]["confidence_threshold"] == classifier.confidence_threshold
    assert meta["parameters"]["calibration_method"] == classifier.metadata["calibration_method"]
    config = spec.config("cifar10_net")
    assert config["input"][0]["dims"] == [3, 32, 32] and config["max_batch_size"] == 64
    assert [o["dims"] for o in config["output"]] == [[10], [10]]
    assert server_metadata("1.2.3")["extensions"] == ["classification", "binary_tensor_data"]


# --- requests --------------------------------------------------------------------------------


def test_json_flat_json_nested_and_binary_requests_read_the_same_batch(spec):
    images = example_batch()
    flat = parse_infer(json_body(images), None, spec)
    nested = parse_infer(json_body(inputs=[tensor(images, data=images.tolist())]), None, spec)
    binary = parse_infer(*binary_body(images), spec)
    for request in (flat, nested, binary):
        assert request.images.shape == (3, 3, 32, 32) and request.images.dtype == np.float32
        np.testing.assert_array_equal(request.images, images)
    # No outputs named: every output, as JSON unless the request asks for binary.
    assert flat.outputs == [RequestedOutput("logits", False, 0), RequestedOutput("probs", False, 0)]
    asked = parse_infer(json_body(images, parameters={"binary_data_output": True}), None, spec)
    assert all(o.binary for o in asked.outputs)


@pytest.mark.parametrize(
    ("body", "header_length", "kind", "message"),
    [case[1:] for case in PROTOCOL_CASES],
    ids=[case[0] for case in PROTOCOL_CASES],
)
def test_every_bad_request_is_refused_naming_its_problem(spec, body, header_length, kind, message):
    with pytest.raises(RequestError, match=message) as info:
        parse_infer(body, header_length, spec)
    assert (info.value.status, info.value.kind) == (400, kind)
    assert len(str(info.value)) < 300  # quoting a client's value never floods the answer


def test_a_huge_claimed_shape_is_refused_before_anything_is_allocated(spec):
    """The shape is checked against the model and the batch limit before the data is looked
    at: one image's worth of data claiming 100,000 images (1.2 GB of FP32) costs nothing."""
    body = one(shape=[100_000, 3, 32, 32])
    tracemalloc.start()
    try:
        with pytest.raises(RequestError, match="over this server's max_batch_size"):
            parse_infer(body, None, spec)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000  # the parsed JSON itself, not the tensor it claims


def test_client_values_are_quoted_short():
    assert quote(list(range(10**6))) == "a list of 1000000 items"
    assert len(quote("x" * 10_000)) == 60
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    assert quote(nested) == "a list of 1 item"  # never printed deep (no RecursionError)
    assert quote(["1", 3, 32, 32]) == '["1", 3, 32, 32]'


# --- responses, read back by tritonclient ------------------------------------------------------


def run(spec: ModelSpec, classifier: OnnxClassifier, body: bytes, header_length=None):
    request = parse_infer(body, header_length, spec)
    results = classifier.run_outputs(request.images, [o.name for o in request.outputs])
    return request, results, encode_response("cifar10_net", request, results, spec.classes)


def test_binary_and_json_responses_decode_with_tritonclient(spec, classifier):
    from tritonclient.http import InferResult

    images = example_batch()
    outputs = [
        {"name": "logits", "parameters": {"binary_data": True}},
        {"name": "probs", "parameters": {"classification": 3, "binary_data": True}},
    ]
    body = json_body(images, outputs=outputs, id="req-1")
    _, results, (answer, json_length) = run(spec, classifier, body)
    assert json_length is not None and json.loads(answer[:json_length])["id"] == "req-1"
    result = InferResult.from_response_body(answer, header_length=json_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), results["logits"])
    top3 = result.as_numpy("probs")
    assert top3.shape == (3, 3) and top3.dtype == object
    expected = np.argsort(-results["probs"], axis=1)[:, :3]
    for row, indices in zip(top3, expected, strict=True):
        decoded = [item.decode().split(":") for item in row]
        assert [int(i) for _, i, _ in decoded] == indices.tolist()
        assert [label for _, _, label in decoded] == [spec.classes[i] for i in indices]
    # The same request without binary_data: plain JSON, which the client reads just as well.
    plain = json_body(images, outputs=[{"name": "probs"}])
    _, results, (answer, json_length) = run(spec, classifier, plain)
    assert json_length is None
    decoded = InferResult.from_response_body(answer).as_numpy("probs")
    np.testing.assert_allclose(decoded, results["probs"], rtol=1e-6)


def test_classification_orders_by_value_and_breaks_ties_by_index():
    values = np.array([[0.1, 0.5, 0.5, 0.2]], dtype=np.float32)
    labels = classification(values, 3, ["a", "b", "c", "d"])
    assert labels.tolist() == [["0.500000:1:b", "0.500000:2:c", "0.200000:3:d"]]


def test_the_response_echoes_the_name_it_was_asked_for(spec, classifier):
    request = InferRequest(None, example_batch(("cat_0",)), [RequestedOutput("probs", False, 0)])
    results = classifier.run_outputs(request.images, ["probs"])
    answer, _ = encode_response("cifar10-net", request, results, spec.classes)
    decoded = json.loads(answer)
    assert decoded["model_name"] == "cifar10-net" and decoded["model_version"] == "1"
    assert "id" not in decoded and decoded["outputs"][0]["shape"] == [1, 10]
