"""Serving figures: app start time, the page's Gradio path, the inference API beside it and
the API under a hostile-half load, all against one server on loopback, in one run.

    python -m benchmarks.serving_load [--artifacts artifacts] [--model cifar10-resnet10]
                                      [--clients 8] [--quick] [--out DIR]

Starts `python -m serving.app` as its own process on a free 127.0.0.1 port and times until
the page answers. Then, with the example images: /predict calls from concurrent gradio_client
clients (the default model); `/v2/models/{model}/infer` (JSON and binary tensors) and
`/classify` from 1 and from `--clients` concurrent httpx clients, each a fixed number of
requests (benchmarks/api_load.py); and `--hostile-seconds` of the API with every other request
hostile (bad tensors, bodies over the cap, bombs, unknown models...), counting valid requests
that failed. Finally what server-side batching could save at most, measured on the model
alone. Writes serving.{json,md} into --out (default benchmarks/); `--quick` runs a few
requests of each to check the script and writes nothing unless --out is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import httpx
import numpy as np
from gradio_client import Client, handle_file

from benchmarks.api_load import (
    batching_bound,
    closed_loop,
    hostile_calls,
    hostile_half,
    valid_calls,
)

OUT = Path(__file__).resolve().parent


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 9B14"), from /proc/cpuinfo where there is one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpu": cpu_model(), "cores": os.cpu_count()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(
    artifacts: Path,
    port: int,
    extra_args: Sequence[str] = (),
    env: dict[str, str] | None = None,
    output: IO | int = subprocess.DEVNULL,
) -> tuple[subprocess.Popen, float]:
    """`python -m serving.app` on 127.0.0.1:`port`; returns it and its seconds to first page.

    The app gets this environment minus GRADIO_* and TOOLKIT_AUTH (no surprise settings),
    plus `env`; its stdout and stderr go to `output`.
    """
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "TOOLKIT_AUTH"))}
    command = [sys.executable, "-m", "serving.app", "--artifacts", str(artifacts)]
    command += ["--port", str(port), *extra_args]
    start = time.perf_counter()
    process = subprocess.Popen(
        command, env={**clean, **(env or {})}, stdout=output, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}/"
    while time.perf_counter() - start < 120:
        if process.poll() is not None:
            raise SystemExit(f"the app exited with code {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return process, time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    process.kill()
    raise SystemExit("the app did not come up within 120 s")


def client_worker(
    url: str, images: list[Path], count: int, out: list, errors: list, ssl_verify: bool
) -> None:
    client = Client(url, verbose=False, ssl_verify=ssl_verify)
    for i in range(count):
        start = time.perf_counter()
        try:
            result = client.predict(
                handle_file(str(images[i % len(images)])), None, api_name="/predict"
            )
            if not result.get("label"):
                raise ValueError(f"no label in {result}")
            out.append(time.perf_counter() - start)
        except Exception as exc:  # counted, not raised: the figure is the error count
            errors.append(repr(exc))


def load(
    url: str, images: list[Path], clients: int, requests: int, ssl_verify: bool = False
) -> dict:
    """`requests` predictions spread over `clients` concurrent clients; latency figures.

    gradio_client opens a new httpx client for each of the three HTTP calls of a prediction,
    and with `ssl_verify` on each one loads the CA bundle (~25 ms of CPU) even for plain http.
    On 2 cores that load generator cost is what a default client measures, so the headline
    runs turn verification off (loopback http has nothing to verify) and one run keeps the
    library default for comparison.
    """
    latencies: list[float] = []
    errors: list[str] = []
    per_client = [requests // clients] * clients
    per_client[0] += requests - sum(per_client)
    threads = [
        threading.Thread(target=client_worker, args=(url, images, n, latencies, errors, ssl_verify))
        for n in per_client
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {
        "endpoint": "gradio /predict",
        "clients": clients,
        "requests": requests,
        "ssl_verify": ssl_verify,
        "ok": len(latencies),
        "errors": len(errors),
        "error_examples": errors[:3],
        "p50_ms": round(float(np.percentile(ms, 50)), 1) if len(ms) else None,
        "p95_ms": round(float(np.percentile(ms, 95)), 1) if len(ms) else None,
        "requests_per_s": round(len(latencies) / wall, 1),
    }


@dataclass(frozen=True)
class Plan:
    """How many requests each measurement sends."""

    gradio_one: int = 50
    gradio_many: int = 200
    api_one: int = 500
    api_many: int = 2000
    hostile_seconds: float = 30.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(gradio_one=5, gradio_many=16, api_one=40, api_many=160, hostile_seconds=4.0)


def measure(artifacts: Path, model: str, clients: int, plan: Plan, log: IO) -> dict:
    """Everything, against one server process; returns the figures."""
    images = sorted((artifacts / "examples").glob("*/*.png"))
    if not images:
        raise SystemExit(f"no example images under {artifacts}/examples")
    port = free_port()
    process, startup = start_app(artifacts, port, output=log)
    url = f"http://127.0.0.1:{port}/"
    api = url.rstrip("/")
    try:
        # One client first: the latency of a request that does not wait behind others.
        gradio = [
            load(url, images, 1, plan.gradio_one),
            load(url, images, clients, plan.gradio_many),
            load(url, images, clients, plan.gradio_many, ssl_verify=True),
        ]
        calls = valid_calls(model, images[0])
        measured = [
            closed_loop(api, call, n, plan.api_one if n == 1 else plan.api_many)
            for call in calls.values()
            for n in (1, clients)
        ]
        hostile = hostile_half(
            api,
            [calls["infer-json"], calls["classify"]],
            hostile_calls(model, images[0]),
            clients,
            plan.hostile_seconds,
        )
        ready = httpx.get(f"{api}/v2/health/ready", timeout=10).status_code == 200
        after = closed_loop(api, calls["infer-json"], 1, 5, warmup=0)["errors"] == 0
        alive = process.poll() is None
    finally:
        process.terminate()
        process.wait(timeout=30)
    hostile["answers_afterwards"] = ready and after and alive
    return {
        "machine": machine(),
        "model": model,
        "startup_s": round(startup, 2),
        "gradio": gradio,
        "api": measured,
        "hostile_half": hostile,
        "batching": batching_bound(artifacts / model / "model.onnx"),
    }


def targets(result: dict) -> dict[str, bool]:
    """Issue #15's figures, as yes/no lines."""
    rows = {(r["endpoint"], r["clients"]): r for r in result["api"]}
    many = max(clients for _, clients in rows)
    hostile = result["hostile_half"]
    out = {}
    for endpoint in ("infer-json", "infer-binary", "classify"):
        one, busy = rows[(endpoint, 1)], rows[(endpoint, many)]
        out[f"`{endpoint}`, 1 client: p50 ≤ 3 ms"] = one["p50_ms"] <= 3.0
        out[f"`{endpoint}`, {many} clients: ≥ 500 requests/s and 0 errors"] = (
            busy["requests_per_s"] >= 500 and busy["errors"] == 0
        )
    out["hostile half: 0 failed valid requests"] = hostile["valid_failed"] == 0
    out["hostile half: every hostile request refused with its own 4xx"] = (
        hostile["hostile_not_as_expected"] == 0
    )
    out["answers afterwards, no server tracebacks"] = (
        hostile["answers_afterwards"] and result["server_tracebacks"] == 0
    )
    return out


def markdown(result: dict, command: str) -> str:
    gradio = "".join(
        f"| {r['clients']} | {'on' if r['ssl_verify'] else 'off'} | {r['requests']} "
        f"| {r['errors']} | {r['p50_ms']} | {r['p95_ms']} | {r['requests_per_s']} |\n"
        for r in result["gradio"]
    )
    api = "".join(
        f"| `{r['endpoint']}` | {r['clients']} | {r['requests']} | {r['errors']} "
        f"| {r['p50_ms']} | {r['p95_ms']} | {r['requests_per_s']} |\n"
        for r in result["api"]
    )
    hostile, batching = result["hostile_half"], result["batching"]
    kinds = "".join(
        f"| {kind} | {k['sent']} | {k['as_expected']} | {k['p50_ms']} |\n"
        for kind, k in hostile["kinds"].items()
    )
    problems = "".join(f"- `{p}`\n" for p in hostile["problems"]) or "- none\n"
    model = result["model"]
    return (
        "# Serving figures\n\n"
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores; load "
        f"average before the run {result['load_before']:.2f}. "
        f"`python -m serving.app` on loopback, started in **{result['startup_s']} s**; the "
        "clients run on the same cores as the server. One run of "
        f"`{command}`.\n\n"
        "## The page: Gradio's /predict\n\n"
        "`/predict` calls with the example images and the default model from concurrent "
        "gradio_client clients. `ssl_verify`: gradio_client opens a new httpx client for each "
        "HTTP call of a prediction (upload, queue join, result stream); with verification on "
        "(its default) each one loads the CA bundle, about 25 ms of CPU, even for plain http. "
        "The 'off' rows measure the server, the 'on' row what a default client sees here.\n\n"
        "| clients | ssl_verify | requests | errors | p50 (ms) | p95 (ms) | requests/s |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n" + gradio + "\n"
        f"## The inference API: `{model}`\n\n"
        f"One 32×32 example image per request, to `{model}`, from httpx clients each holding "
        "one keep-alive connection and sending its next request when the answer arrives. "
        "`infer-json`: Open Inference Protocol JSON tensors (the body encoded once, outside "
        "the timing); `infer-binary`: the binary tensor extension, as tritonclient sends it; "
        "`classify`: the PNG file to `/classify`, decoded and preprocessed by the server.\n\n"
        "| endpoint | clients | requests | errors | p50 (ms) | p95 (ms) | requests/s |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n" + api + "\n"
        "## The API with half of its requests hostile\n\n"
        f"{hostile['clients']} clients for {hostile['duration_s']} s, every other request "
        "valid (`infer-json`, `classify` in turn), the others in turn each hostile kind. "
        f"{hostile['requests']} requests: **{hostile['valid_failed']} of "
        f"{hostile['valid_sent']} valid ones failed**; {hostile['hostile_not_as_expected']} of "
        f"{hostile['hostile_sent']} hostile ones got another answer than their own 4xx. "
        "Answers afterwards: "
        f"**{'yes' if hostile['answers_afterwards'] else 'no'}**.\n\n"
        "| request | sent | as expected | p50 (ms) |\n|---|---:|---:|---:|\n" + kinds + "\n"
        "Unexpected answers:\n\n" + problems + "\n"
        "## Server-side batching\n\n"
        "Not implemented. The most it could save per request, measured on the model alone "
        f"(onnxruntime, `{model}`): {batching['model_ms_batch_1']} ms for one image alone "
        "against "
        f"{next(v for k, v in batching.items() if k.startswith('model_ms_per_image'))} ms per "
        f"image in a batch of 8, so at most **{batching['most_saved_per_request_ms']} ms** per "
        "request, before the cost of waiting to form a batch.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--model", default="cifar10-resnet10", help="the API runs' model")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few requests of each")
    parser.add_argument("--out", type=Path, default=None, help="where serving.{json,md} go")
    args = parser.parse_args()
    plan = Plan.quick() if args.quick else Plan()
    out = args.out or (None if args.quick else OUT)
    command = "python -m benchmarks.serving_load" + (" --quick" if args.quick else "")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryFile("w+") as log:
        result = measure(args.artifacts, args.model, args.clients, plan, log)
        log.seek(0)
        result["server_tracebacks"] = log.read().count("Traceback (most recent call last)")
    result["load_before"] = round(load_before, 2)
    result["plan"] = asdict(plan)
    result["targets"] = targets(result)
    checks = "".join(
        f"- {'yes' if ok else 'NO'}: {name}\n" for name, ok in result["targets"].items()
    )
    md = (
        markdown(result, command)
        + f"\nServer tracebacks: {result['server_tracebacks']}.\n\n## Targets\n\n"
        + checks
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "serving.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
