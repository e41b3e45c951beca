"""Serving figures: app start time and a bounded load test on loopback.

    python -m benchmarks.serving_load [--artifacts artifacts] [--clients 8] [--requests 200]

Starts `python -m serving.app` as its own process on a free 127.0.0.1 port, times until the
page answers, then sends a fixed number of /predict calls from concurrent gradio_client
clients (example images, the default model) and stops. Writes serving.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx
import numpy as np
from gradio_client import Client, handle_file

OUT = Path(__file__).resolve().parent


def machine() -> dict:
    """What the figures were measured on."""
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=200)
    args = parser.parse_args()
    images = sorted((args.artifacts / "examples").glob("*/*.png"))
    if not images:
        raise SystemExit(f"no example images under {args.artifacts}/examples")

    port = free_port()
    process, startup = start_app(args.artifacts, port)
    url = f"http://127.0.0.1:{port}/"
    try:
        # One client first: the latency of a request that does not wait behind others.
        runs = [
            load(url, images, 1, 50),
            load(url, images, args.clients, args.requests),
            load(url, images, args.clients, args.requests, ssl_verify=True),
        ]
    finally:
        process.terminate()
        process.wait(timeout=30)

    result = {"machine": machine(), "startup_s": round(startup, 2), "runs": runs}
    (OUT / "serving.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "".join(
        f"| {r['clients']} | {'on' if r['ssl_verify'] else 'off'} | {r['requests']} "
        f"| {r['errors']} | {r['p50_ms']} | {r['p95_ms']} "
        f"| {r['requests_per_s']} |\n"
        for r in runs
    )
    md = (
        "# Serving figures\n\n"
        f"Machine: {result['machine']}. `python -m serving.app --artifacts {args.artifacts}` on "
        f"loopback, started in **{result['startup_s']} s**; `/predict` calls with the example "
        "images and the default model from concurrent gradio_client clients running on the "
        "same 2 cores as the server. Reproduce: `python -m benchmarks.serving_load`.\n\n"
        "`ssl_verify`: gradio_client opens a new httpx client for each HTTP call of a "
        "prediction (upload, queue join, result stream); with verification on (its default) "
        "each one loads the CA bundle, about 25 ms of CPU, even for plain http. The clients "
        "share the server's 2 cores, so that load-generator cost shows up as server latency; "
        "the 'off' rows measure the server, the 'on' row what a default client sees here.\n\n"
        "| clients | ssl_verify | requests | errors | p50 (ms) | p95 (ms) | requests/s |\n"
        "|---:|---|---:|---:|---:|---:|---:|\n" + rows
    )
    (OUT / "serving.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
