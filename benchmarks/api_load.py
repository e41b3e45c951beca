"""The inference API under load, for benchmarks/serving_load.py: closed-loop httpx clients on
`/v2/models/{name}/infer` (JSON or binary tensors) and `/classify`, a hostile-half mix, and
what server-side batching could save at most.

Every request is a `Call`: how to send it and what the answer must be (a status, and for a
refusal a regex its JSON error must match), so the valid and the hostile requests are counted
by the same code.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from benchmarks.bad_uploads import bad_uploads

REQUEST_TIMEOUT_S = 30
Answer = tuple[int, str]  # (HTTP status, body text)


@dataclass(frozen=True)
class Call:
    """One kind of request and the answer it must get."""

    kind: str
    send: Callable[[httpx.Client], Answer]
    status: int = 200
    error: str | None = None  # a regex the JSON error must match (refusals only)

    def check(self, answer: Answer) -> str:
        """'' when the answer is the expected one, else what was wrong."""
        status, text = answer
        if status != self.status:
            return f"{self.kind}: HTTP {status} {text[:160]!r}"
        if self.error is None:
            return ""
        try:
            message = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"{self.kind}: not a JSON error: {text[:160]!r}"
        return "" if re.search(self.error, message) else f"{self.kind}: {message[:160]!r}"


def pixels(path: Path) -> np.ndarray:
    """A 32×32 example image as the protocol carries it: 1×3×32×32 float32 in [0, 1]."""
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    return rgb.transpose(2, 0, 1)[None].copy()


def json_infer(images: np.ndarray, **tensor) -> bytes:
    described = {
        "name": "image",
        "datatype": "FP32",
        "shape": list(images.shape),
        "data": images.ravel().tolist(),
        **tensor,
    }
    return json.dumps({"inputs": [described]}).encode()


def binary_infer(images: np.ndarray) -> tuple[bytes, str]:
    raw = images.astype("<f4").tobytes()
    header = {
        "inputs": [
            {
                "name": "image",
                "datatype": "FP32",
                "shape": list(images.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    text = json.dumps(header).encode()
    return text + raw, str(len(text))


def post(path: str, body: bytes, headers: dict[str, str]) -> Callable[[httpx.Client], Answer]:
    def send(client: httpx.Client) -> Answer:
        response = client.post(path, content=body, headers=headers)
        return response.status_code, response.text

    return send


def declared_over_cap(path: str, size: int) -> Callable[[httpx.Client], Answer]:
    """A Content-Length past the cap and no body at all: only a refusal on the headers can
    answer (httpx would insist on sending the body it declared)."""

    def send(client: httpx.Client) -> Answer:
        url = client.base_url
        connection = http.client.HTTPConnection(url.host, url.port, timeout=REQUEST_TIMEOUT_S)
        try:
            connection.putrequest("POST", path)
            connection.putheader("Content-Type", "application/json")
            connection.putheader("Content-Length", str(size))
            connection.endheaders()
            response = connection.getresponse()
            return response.status, response.read().decode(errors="replace")
        finally:
            connection.close()

    return send


JSON = {"Content-Type": "application/json"}
PNG = {"Content-Type": "image/png"}


def valid_calls(model: str, image: Path) -> dict[str, Call]:
    """The requests whose figures the benchmark reports, by endpoint and format."""
    batch = pixels(image)
    body, length = binary_infer(batch)
    infer = f"/v2/models/{model}/infer"
    return {
        "infer-json": Call("infer-json", post(infer, json_infer(batch), JSON)),
        "infer-binary": Call(
            "infer-binary", post(infer, body, {"Inference-Header-Content-Length": length})
        ),
        "classify": Call("classify", post(f"/classify?model={model}", image.read_bytes(), PNG)),
    }


def hostile_calls(model: str, image: Path) -> list[Call]:
    """Every kind of bad request the API must refuse with its own error, and keep serving."""
    batch = pixels(image)
    infer = f"/v2/models/{model}/infer"
    nan = batch.copy()
    nan[0, 0, 0, 0] = np.nan
    nan_body, nan_length = binary_infer(nan)
    tensors = [
        ("malformed-json", b'{"inputs": [', r"not valid JSON"),
        ("input-name", json_infer(batch, name="input0"), r"is not an input"),
        ("datatype", json_infer(batch, datatype="INT8"), r"must be FP32"),
        ("shape", json_infer(batch, shape=[1, 3, 64, 64]), r"does not fit input"),
        ("billions", json_infer(batch, shape=[10**9, 3, 32, 32]), r"max_batch_size"),
        ("data-length", json_infer(batch, shape=[2, 3, 32, 32]), r"its shape needs 6144"),
        ("range", json_infer(batch * 255), r"\[0, 1\]"),
    ]
    calls = [Call(kind, post(infer, body, JSON), 400, error) for kind, body, error in tensors]
    calls += [
        Call(
            "nan-binary",
            post(infer, nan_body, {"Inference-Header-Content-Length": nan_length}),
            400,
            r"NaN or infinite",
        ),
        Call(
            "unknown-model",
            post("/v2/models/no-such-model/infer", json_infer(batch), JSON),
            404,
            r"unknown model",
        ),
        Call(
            "content-type",
            post(infer, json_infer(batch), {"Content-Type": "text/plain"}),
            415,
            r"is not accepted",
        ),
        Call("over-cap", declared_over_cap(infer, 10**9), 413, r"maximum allowed size"),
    ]
    for kind, upload in bad_uploads().items():
        path = f"/classify?model={model}"
        calls.append(Call(f"classify-{kind}", post(path, upload.data, PNG), 400, upload.error))
    return calls


# --- closed-loop load ----------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes and latencies per kind, shared by the client threads."""

    seconds: dict[str, list[float]] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self, client: httpx.Client, call: Call) -> None:
        start = time.perf_counter()
        try:
            problem = call.check(call.send(client))
        except Exception as exc:  # counted, not raised: the figure is how often this happens
            problem = f"{call.kind}: {exc!r}"[:200]
        elapsed = time.perf_counter() - start
        with self.lock:
            self.seconds.setdefault(call.kind, []).append(elapsed)
            if problem:
                self.failed[call.kind] = self.failed.get(call.kind, 0) + 1
                self.problems.append(problem)


def run_clients(url: str, work: Callable[[httpx.Client, int], None], clients: int) -> float:
    """`clients` threads, each with its own keep-alive connection, running `work(client,
    index)`; returns the wall time."""

    def client_thread(index: int) -> None:
        with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
            work(client, index)

    threads = [
        threading.Thread(target=client_thread, args=(i,), daemon=True) for i in range(clients)
    ]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    return time.perf_counter() - start


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 2) if values else None


def closed_loop(url: str, call: Call, clients: int, requests: int, warmup: int = 20) -> dict:
    """`requests` calls spread over `clients` concurrent clients, each sent as soon as its
    client's previous answer arrived."""
    warm = Tally()
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for _ in range(warmup):
            warm.send(client, call)
    per_client = [requests // clients] * clients
    per_client[0] += requests - sum(per_client)
    tally = Tally()

    def work(client: httpx.Client, index: int) -> None:
        for _ in range(per_client[index]):
            tally.send(client, call)

    wall = run_clients(url, work, clients)
    seconds = tally.seconds.get(call.kind, [])
    errors = tally.failed.get(call.kind, 0)
    return {
        "endpoint": call.kind,
        "clients": clients,
        "requests": len(seconds),
        "errors": errors,
        "error_examples": tally.problems[:3],
        "p50_ms": percentile_ms(seconds, 50),
        "p95_ms": percentile_ms(seconds, 95),
        "requests_per_s": round((len(seconds) - errors) / wall, 1),
    }


def hostile_half(
    url: str, valid: list[Call], hostile: list[Call], clients: int, duration: float
) -> dict:
    """For `duration` seconds, every other request valid, the others in turn every hostile
    kind; each client starts at its own point of the cycle, so the server sees a mix."""
    cycle = [call for pair in zip(itertools.cycle(valid), hostile, strict=False) for call in pair]
    deadline = time.monotonic() + duration
    tally = Tally()

    def work(client: httpx.Client, index: int) -> None:
        for call in itertools.islice(itertools.cycle(cycle), 3 * index, None):
            if time.monotonic() >= deadline:
                return
            tally.send(client, call)

    wall = run_clients(url, work, clients)
    valid_kinds = {c.kind for c in valid}
    kinds = {
        kind: {
            "sent": len(seconds),
            "as_expected": len(seconds) - tally.failed.get(kind, 0),
            "p50_ms": percentile_ms(seconds, 50),
        }
        for kind, seconds in sorted(tally.seconds.items())
    }
    sent_valid = sum(k["sent"] for name, k in kinds.items() if name in valid_kinds)
    return {
        "clients": clients,
        "duration_s": round(wall, 1),
        "requests": sum(k["sent"] for k in kinds.values()),
        "valid_sent": sent_valid,
        "valid_failed": sum(tally.failed.get(kind, 0) for kind in valid_kinds),
        "hostile_sent": sum(k["sent"] for n, k in kinds.items() if n not in valid_kinds),
        "hostile_not_as_expected": sum(
            tally.failed.get(kind, 0) for kind in kinds if kind not in valid_kinds
        ),
        "kinds": kinds,
        "problems": tally.problems[:20],
    }


def batching_bound(model_path: Path, batch: int = 8, runs: int = 300) -> dict:
    """What batching requests together server-side could save at most, per request: the
    model's time for one image alone minus its per-image time inside a batch of `batch`."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    per_image = {}
    for size in (1, batch):
        images = np.random.default_rng(0).random((size, 3, 32, 32), dtype=np.float32)
        for _ in range(20):
            session.run(None, {name: images})
        start = time.perf_counter()
        for _ in range(runs // size + 1):
            session.run(None, {name: images})
        per_image[size] = (time.perf_counter() - start) / (runs // size + 1) / size * 1000
    return {
        "model_ms_batch_1": round(per_image[1], 3),
        f"model_ms_per_image_batch_{batch}": round(per_image[batch], 3),
        "most_saved_per_request_ms": round(per_image[1] - per_image[batch], 3),
    }
