"""The inference API served beside the page (serving/api/routes.py), over real HTTP on a free port,
with the shipped models: health and metadata, tensors in and out, /classify answering as the
page does, every bad request a 4xx with a JSON error that names it (and the server still
serving), backpressure, --auth, and the Prometheus metrics.
"""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio_client import handle_file
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from benchmarks.bad_uploads import truncated
from benchmarks.load_test import post_chunked, read_status
from serving.app import build_demo
from serving.catalog import load_catalog
from serving.classifier import OnnxClassifier
from serving.options import DEFAULT_MAX_QUEUE, parse_args
from tests.test_app import UPLOAD_CAP_MB, as_dict, ask, connect, running_demo
from tests.test_oip import PROTOCOL_CASES, binary_body, example_batch, json_body

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "artifacts"
EXAMPLES = ARTIFACTS / "examples" / "cifar10"
MODEL = "cifar10-net"
DEFAULT_MODEL = "cifar10-speedrun"  # the most accurate shipped model: the page's default
TIMEOUT = 30


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with running_demo(ARTIFACTS) as url:
        yield url


@pytest.fixture(scope="module")
def http(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=TIMEOUT) as client:
        yield client


def infer(http: httpx.Client, body: bytes, header_length: str | None = None, **options):
    headers = {"Content-Type": "application/json", **options.pop("headers", {})}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length
    model = options.pop("model", MODEL)
    return http.post(f"v2/models/{model}/infer", content=body, headers=headers, **options)


def error_of(response: httpx.Response) -> str:
    assert response.headers["content-type"].startswith("application/json"), response.text
    return response.json()["error"]


def still_serving(http: httpx.Client) -> None:
    answer = infer(http, json_body(example_batch(("cat_0",))))
    assert answer.status_code == 200, answer.text


# --- health and metadata ---------------------------------------------------------------------


def test_health_and_metadata_describe_every_shipped_model(http):
    assert http.get("v2/health/live").json() == {"live": True}
    ready = http.get("v2/health/ready")
    shipped = {p.parent.name for p in ARTIFACTS.glob("*/model.onnx")}
    fp32 = {"cifar10-net", "cifar10-lenet5", "cifar10-resnet10", DEFAULT_MODEL}
    assert fp32 <= shipped
    # Every shipped model that gives its recorded answers on this machine (the catalog's
    # check; the INT8 twin does not on CPUs without VNNI), and the fp32 ones always do.
    served = set(load_catalog(ARTIFACTS).models)
    assert fp32 <= served <= shipped
    assert ready.status_code == 200 and set(ready.json()["models"]) == served
    assert "binary_tensor_data" in http.get("v2").json()["extensions"]
    listed = {m["name"]: m for m in http.get("v2/models").json()["models"]}
    assert listed[DEFAULT_MODEL]["default"] and listed[MODEL]["names"] == [MODEL, "cifar10_net"]
    for name in (MODEL, "cifar10_net"):
        meta = http.get(f"v2/models/{name}").json()
        assert meta["name"] == name and meta["inputs"][0]["shape"] == [-1, 3, 32, 32]
        assert http.get(f"v2/models/{name}/versions/1").json() == meta
        assert http.get(f"v2/models/{name}/ready").json() == {"name": name, "ready": True}
    missing = http.get("v2/models/cifar10-vgg99")
    assert missing.status_code == 404
    assert f"unknown model 'cifar10-vgg99'; this server has {DEFAULT_MODEL}" in error_of(missing)
    wrong_version = http.get(f"v2/models/{MODEL}/versions/2/ready")
    assert wrong_version.status_code == 404 and "only version 1" in error_of(wrong_version)


# --- inference ---------------------------------------------------------------------------------


def test_json_and_binary_infer_answer_what_the_model_computes(http):
    images = example_batch()
    expected = OnnxClassifier(ARTIFACTS / MODEL / "model.onnx").run_outputs(
        images, ["logits", "probs"]
    )
    answer = infer(http, json_body(images))
    assert answer.status_code == 200
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    for name, values in expected.items():
        assert outputs[name]["shape"] == [3, 10] and outputs[name]["datatype"] == "FP32"
        np.testing.assert_allclose(np.array(outputs[name]["data"]).reshape(3, 10), values, 1e-6)

    body, length = binary_body(images)
    request = json.loads(body[: int(length)])
    request["parameters"] = {"binary_data_output": True}
    header = json.dumps(request).encode()
    answer = infer(http, header + body[int(length) :], str(len(header)))
    json_length = int(answer.headers["inference-header-content-length"])
    meta = json.loads(answer.content[:json_length])
    blob = answer.content[json_length:]
    for output in meta["outputs"]:
        size = output["parameters"]["binary_data_size"]
        values = np.frombuffer(blob[:size], "<f4").reshape(output["shape"])
        np.testing.assert_array_equal(values, expected[output["name"]])
        blob = blob[size:]
    assert blob == b""


def _content_length_over(limit_path: str, declared: int, server: str) -> int | None:
    """Declare a body over the cap and send none of it: only a refusal on headers answers."""
    address = httpx.URL(server)
    with socket.create_connection((address.host, address.port), timeout=TIMEOUT) as sock:
        sock.sendall(
            f"POST /{limit_path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {declared}\r\n\r\n".encode()
        )
        return read_status(sock)


HTTP_CASES = [
    ("text/plain", {"headers": {"Content-Type": "text/plain"}}, 415, r"'text/plain' is not"),
    (
        "curl-form",
        {"headers": {"Content-Type": "application/x-www-form-urlencoded"}},
        415,
        r"send application/json",
    ),
    ("gzip", {"headers": {"Content-Encoding": "gzip"}}, 415, r"send the body uncompressed"),
    ("unknown-model", {"model": "nope"}, 404, r"unknown model 'nope'"),
    ("unknown-version", {"model": f"{MODEL}/versions/3"}, 404, r"has only version 1"),
]


@pytest.mark.parametrize(
    ("body", "header_length", "message"),
    [(body, length, message) for _, body, length, _, message in PROTOCOL_CASES],
    ids=[case[0] for case in PROTOCOL_CASES],
)
def test_every_bad_tensor_request_gets_400_naming_it_over_http(http, body, header_length, message):
    answer = infer(http, body, header_length)
    assert answer.status_code == 400
    assert re.search(message, error_of(answer)), error_of(answer)
    still_serving(http)


@pytest.mark.parametrize(
    ("options", "status", "message"),
    [case[1:] for case in HTTP_CASES],
    ids=[case[0] for case in HTTP_CASES],
)
def test_requests_the_protocol_cannot_take_get_their_own_4xx(http, options, status, message):
    answer = infer(http, json_body(example_batch(("cat_0",))), **options)
    assert answer.status_code == status
    assert re.search(message, error_of(answer)), error_of(answer)
    still_serving(http)


def test_bodies_over_the_cap_get_413_before_they_are_read(http, server):
    assert _content_length_over(f"v2/models/{MODEL}/infer", 10**9, server) == 413
    assert _content_length_over("classify", int(UPLOAD_CAP_MB * 1e6) + 10**6, server) == 413
    assert post_chunked(server, f"v2/models/{MODEL}/infer", 64 * 2**20) == 413
    huge = http.post("classify", content=b"\0" * int(UPLOAD_CAP_MB * 1e6 + 10**5))
    assert huge.status_code == 413 and "maximum allowed size" in error_of(huge)
    # A full batch of 64 images in JSON is under the infer cap.
    batch = np.repeat(example_batch(("cat_0",)), 64, axis=0)
    assert infer(http, json_body(batch)).status_code == 200


# --- /classify: an image file, the page's answer -------------------------------------------------


def awkward_jpeg() -> bytes:
    """Not square, not RGB-sized, EXIF-rotated: crop, resize and orientation all matter."""
    image = Image.open(EXAMPLES / "horse_0.png").convert("RGB").resize((70, 45))
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=92, exif=exif.tobytes())
    return buffer.getvalue()


def test_classify_answers_exactly_as_the_page(http, server, tmp_path):
    page = connect(server)
    awkward = tmp_path / "awkward.jpg"
    awkward.write_bytes(awkward_jpeg())
    for path in (EXAMPLES / "cat_0.png", EXAMPLES / "truck_1.png", awkward):
        shown = ask(page, handle_file(str(path)), MODEL)
        files = {"image": (path.name, path.read_bytes())}
        multipart = http.post(f"classify?model={MODEL}", files=files).json()
        raw = http.post(
            "classify",
            params={"model": MODEL},
            content=path.read_bytes(),
            headers={"Content-Type": "image/jpeg" if path.suffix == ".jpg" else "image/png"},
        ).json()
        for answer in (multipart, raw):
            assert answer["model"] == MODEL and answer["label"] == shown["label"]
            assert as_dict(answer) == as_dict(shown)
    cat = (EXAMPLES / "cat_0.png").read_bytes()
    default = http.post("classify", files={"file": ("cat.png", cat)}).json()
    assert default["model"] == DEFAULT_MODEL and len(default["confidences"]) == 5
    three = http.post("classify?top_k=3", content=cat, headers={"Content-Type": "image/png"})
    three = three.json()
    assert len(three["confidences"]) == 3


@pytest.mark.parametrize(
    ("request_options", "status", "message"),
    [
        ({"content": b"just text", "headers": {"Content-Type": "image/png"}}, 400, "is not a PNG"),
        ({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "is empty"),
        ({"files": {"image": ("a.png", truncated("PNG"))}}, 400, "'a.png' is (truncated|a dam)"),
        ({"data": {"model": MODEL}}, 415, "application/x-www-form-urlencoded"),
        ({"files": {"note": (None, "hi")}}, 400, "the form has no file"),
        ({"json": {"image": "cat.png"}}, 415, "'application/json' is not accepted"),
        ({"params": {"model": "x"}, "files": {"f": b"1"}}, 404, "unknown model 'x'"),
        ({"params": {"top_k": "0"}, "files": {"f": b"1"}}, 400, "from 1 to 10, not '0'"),
    ],
    ids=["text", "empty", "damaged", "form", "no-file", "json", "model", "top-k"],
)
def test_classify_refuses_what_is_not_an_image(http, request_options, status, message):
    answer = http.post("classify", **request_options)
    assert answer.status_code == status
    assert re.search(message, error_of(answer)), error_of(answer)
    still_serving(http)


# --- the page is still there -----------------------------------------------------------------


def test_the_page_and_its_gradio_api_share_the_port(http, server):
    assert "<html" in http.get("/").text.lower()
    assert http.get("gradio_api/info").status_code == 200
    answer = ask(connect(server), handle_file(str(EXAMPLES / "ship_0.png")), MODEL)
    assert answer["confidences"][0]["label"] == "ship"


def test_server_options_and_the_page_queue_bound(monkeypatch):
    monkeypatch.delenv("TOOLKIT_AUTH", raising=False)
    args = parse_args([])
    assert (args.max_in_flight, args.max_queue) == (16, DEFAULT_MAX_QUEUE)
    assert parse_args(["--max-in-flight", "2", "--max-queue", "5"]).max_in_flight == 2
    for bad in (["--max-in-flight", "0"], ["--max-queue", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    demo = build_demo(ARTIFACTS, max_queue=5, max_in_flight=2)
    assert demo.blocks._queue.max_size == 5 and demo.api.gate.limit == 2


# --- backpressure, auth, metrics -----------------------------------------------------------------


def hold_a_slot(server: str) -> socket.socket:
    """An infer request whose body never finishes arriving: it holds one in-flight slot."""
    address = httpx.URL(server)
    sock = socket.create_connection((address.host, address.port), timeout=TIMEOUT)
    sock.sendall(
        f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        "\r\nContent-Length: 5000\r\n\r\n{".encode()
    )
    return sock


def test_past_the_in_flight_bound_the_answer_is_503_with_retry_after():
    with (
        running_demo(ARTIFACTS, {"max_in_flight": 1}) as url,
        httpx.Client(base_url=url, timeout=TIMEOUT) as http,
    ):
        holder = hold_a_slot(url)
        try:
            for _ in range(100):  # until the server has read the held request's headers
                busy = infer(http, json_body(example_batch(("cat_0",))))
                if busy.status_code == 503:
                    break
                time.sleep(0.02)
            assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
            assert "the server is busy (1 inference requests in progress)" in error_of(busy)
            assert http.get("v2/health/ready").status_code == 200  # probes are never bounded
        finally:
            holder.close()  # the client gives up mid-body: its slot is free again
        for _ in range(100):
            if infer(http, json_body(example_batch(("cat_0",)))).status_code == 200:
                break
            time.sleep(0.02)
        still_serving(http)
        assert 'kind="overloaded"' in http.get("metrics").text


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_auth_protects_the_api_but_not_the_probes():
    body = json_body(example_batch(("cat_0",)))
    with (
        running_demo(ARTIFACTS, auth=("ana", "s3cret")) as url,
        httpx.Client(base_url=url, timeout=TIMEOUT) as http,
    ):
        assert http.get("v2/health/live").status_code == 200
        assert http.get("v2/health/ready").status_code == 200
        for method, path in [
            ("GET", "v2"),
            ("GET", f"v2/models/{MODEL}"),
            ("GET", "metrics"),
            ("POST", f"v2/models/{MODEL}/infer"),
            ("POST", "classify"),
        ]:
            for headers in (
                {},
                basic("ana", "wrong"),
                basic("bob", "s3cret"),
                {"Authorization": "Basic !!not-base64"},
            ):
                refused = http.request(method, path, content=body, headers=headers)
                assert refused.status_code == 401, (path, headers)
                assert refused.headers["www-authenticate"].startswith("Basic")
                assert "user name and password" in error_of(refused)
        assert http.get("v2", headers=basic("ana", "s3cret")).status_code == 200
        answer = infer(http, body, headers=basic("ana", "s3cret"))
        assert answer.status_code == 200
        assert http.get("config").status_code == 401  # the page keeps Gradio's own login


def samples(http: httpx.Client) -> dict[tuple, float]:
    """Every sample of /metrics as {(name, sorted labels): value}."""
    out = {}
    for family in text_string_to_metric_families(http.get("metrics").text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_metrics_count_requests_latency_and_errors_by_endpoint_model_and_kind(http, server):
    endpoint = "/v2/models/{name}/infer"
    before = samples(http)
    assert infer(http, json_body(example_batch())).status_code == 200
    assert infer(http, json_body(example_batch(("cat_0",)))).status_code == 200
    bad_shape = json_body(inputs=[{"name": "image", "datatype": "FP32", "shape": [1, 3]}])
    assert infer(http, bad_shape).status_code == 400
    assert infer(http, b"{}", model="made-up-name-123").status_code == 404
    assert _content_length_over(f"v2/models/{MODEL}/infer", 10**9, server) == 413
    after = samples(http)

    def delta(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = {"endpoint": endpoint, "model": MODEL}
    assert delta("toolkit_requests_total", **ok, code="200") == 2
    assert delta("toolkit_request_duration_seconds_count", **ok) == 3  # two answers, one 400
    assert delta("toolkit_images_total", model=MODEL) == 4
    assert delta("toolkit_request_errors_total", **ok, kind="shape") == 1
    assert delta("toolkit_request_errors_total", endpoint=endpoint, model="none", kind="too_large")
    assert delta(
        "toolkit_request_errors_total", endpoint=endpoint, model="none", kind="unknown_model"
    )
    assert "made-up-name-123" not in http.get("metrics").text  # labels never echo a client


def test_served_models_do_not_spin_between_requests():
    """onnxruntime's threads busy-wait after each run by default, taking CPU from the HTTP
    work between single-image requests: the served catalog turns that off, a plain
    OnnxClassifier (batch work, toolkit predict) keeps onnxruntime's default."""
    key = "session.intra_op.allow_spinning"
    served = load_catalog(ARTIFACTS).get(MODEL).classifier.session.get_session_options()
    assert served.get_session_config_entry(key) == "0"
    plain = OnnxClassifier(ARTIFACTS / MODEL / "model.onnx").session.get_session_options()
    with pytest.raises(RuntimeError):  # never set: onnxruntime's default, spinning
        plain.get_session_config_entry(key)
