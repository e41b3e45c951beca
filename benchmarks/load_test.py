"""Serving under attack: a bounded load test that mixes valid and hostile uploads.

    python -m benchmarks.load_test [--artifacts artifacts] [--clients 8] [--duration 60]
                                   [--max-upload-mb 10] [--note TEXT]

Starts `python -m serving.app` as its own process on a free 127.0.0.1 port (so its memory can
be read from /proc), sends one request of every kind, then for `--duration` seconds lets
concurrent gradio_client clients send a fixed rotation: every other request a valid example
image, the others an empty file, a text file named .png, a truncated PNG, a forged and a real
decompression bomb, a 1×1 image (benchmarks/bad_uploads.py), a file over the upload cap
posted straight to the upload route (gradio_client would refuse to send it), or 4 MiB of JSON
streamed without a Content-Length. Every request has a deadline; the clients stop by
themselves. Afterwards a fresh client must still get an answer. Writes load.{json,md} and
exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import itertools
import json
import os
import re
import select
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

from benchmarks.bad_uploads import bad_uploads, oversized
from benchmarks.serving_load import OUT, free_port, machine, start_app
from serving.limits import JSON_BODY_LIMIT

REQUEST_TIMEOUT_S = 30  # a request without an answer by then counts as hung
RSS_INTERVAL_S = 0.5
# Growth of the server's resident memory over the second half of the run that still counts
# as bounded: allocator noise, not a leak (a leak of one upload per request would be GBs).
RSS_GROWTH_LIMIT_MB = 25.0
VALID = "valid"
OVER_CAP = "over-cap"
HUGE_BODY = "huge-json"
# The huge JSON body streams 4× the server's cap for non-upload bodies, unless the server
# answers first, as it should.
HUGE_BODY_BYTES = 4 * JSON_BODY_LIMIT
CHUNK_BYTES = 64 * 1024
# In the server's output, a traceback means some request reached code that did not expect it.
TRACEBACK = "Traceback (most recent call last)"


# --- what each request does ------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """Everything the clients send: example images, bad files on disk, the oversized bytes."""

    images: list[Path]
    bad_files: dict[str, Path]
    bad_errors: dict[str, str]
    oversized: bytes

    @property
    def kinds(self) -> list[str]:
        return [VALID, *self.bad_files, OVER_CAP, HUGE_BODY]


def write_inputs(images: list[Path], folder: Path, max_upload_bytes: int) -> Inputs:
    """The bad uploads as files under `folder` (gradio_client uploads files, not bytes)."""
    uploads = bad_uploads()
    folder.mkdir(parents=True, exist_ok=True)
    for upload in uploads.values():
        (folder / upload.filename).write_bytes(upload.data)
    return Inputs(
        images=images,
        bad_files={kind: folder / u.filename for kind, u in uploads.items()},
        bad_errors={kind: u.error for kind, u in uploads.items()},
        oversized=oversized(max_upload_bytes),
    )


def rotation(kinds: list[str], offset: int) -> Iterator[str]:
    """Valid and invalid requests alternate; each client starts at its own point of the cycle,
    so at any moment the server sees a mix."""
    bad = [k for k in kinds if k != VALID]
    cycle = [kind for pair in zip([VALID] * len(bad), bad, strict=True) for kind in pair]
    return itertools.islice(itertools.cycle(cycle), offset % len(cycle), None)


def send(client: Client, url: str, kind: str, inputs: Inputs, n: int) -> tuple[str, str]:
    """One request -> (outcome, detail). Outcomes: ok (valid answered with a label), refused
    (bad input answered with its own error), wrong (any other answer), hung (none in time),
    broken (the connection or the client failed)."""
    try:
        if kind == OVER_CAP:
            return post_oversized(url, inputs.oversized)
        if kind == HUGE_BODY:
            status = post_chunked(url, "gradio_api/queue/join", HUGE_BODY_BYTES)
            return ("refused", "") if status == 413 else ("wrong", f"{kind}: HTTP {status}")
        path = inputs.images[n % len(inputs.images)] if kind == VALID else inputs.bad_files[kind]
        job = client.submit(handle_file(str(path)), None, api_name="/predict")
        result = job.result(timeout=REQUEST_TIMEOUT_S)
    except AppError as exc:
        if kind != VALID and re.search(inputs.bad_errors[kind], str(exc)):
            return "refused", ""
        return "wrong", f"{kind}: error {str(exc)[:200]!r}"
    except concurrent.futures.TimeoutError:
        return "hung", f"{kind}: no answer within {REQUEST_TIMEOUT_S} s"
    except Exception as exc:  # counted, not raised: the figure is how often this happens
        return "broken", f"{kind}: {exc!r}"[:300]
    if kind == VALID and result.get("label") and len(result.get("confidences", [])) == 5:
        return "ok", ""
    return "wrong", f"{kind}: answered {str(result)[:200]}"


def post_oversized(url: str, data: bytes) -> tuple[str, str]:
    """An upload over the cap, straight to the upload route: the server must answer 413."""
    response = httpx.post(
        f"{url}gradio_api/upload",
        files={"files": ("huge.png", data, "image/png")},
        timeout=REQUEST_TIMEOUT_S,
    )
    if response.status_code == 413:
        return "refused", ""
    return "wrong", f"{OVER_CAP}: HTTP {response.status_code} {response.text[:200]!r}"


def post_chunked(url: str, path: str, total: int, timeout: float = REQUEST_TIMEOUT_S) -> int | None:
    """POST up to `total` bytes of JSON-looking junk with chunked encoding (no Content-Length,
    so only counting can stop it), over a raw socket; stops sending as soon as the server
    answers. Returns the HTTP status, or None when no answer came within `timeout`."""
    address = httpx.URL(url)
    with socket.create_connection((address.host, address.port), timeout=timeout) as sock:
        head = (
            f"POST /{path} HTTP/1.1\r\nHost: {address.host}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunk = f"{CHUNK_BYTES:x}\r\n".encode() + b"[" * CHUNK_BYTES + b"\r\n"
        try:
            sock.sendall(head.encode())
            for _ in range(total // CHUNK_BYTES):
                if select.select([sock], [], [], 0)[0]:
                    break  # the server has answered (or closed): stop feeding it
                sock.sendall(chunk)
            else:
                sock.sendall(b"0\r\n\r\n")
        except OSError:  # the server closed its side mid-body, as it may after refusing
            pass
        return read_status(sock)


def read_status(sock: socket.socket) -> int | None:
    """The status code of the first response on `sock` (None: closed or timed out first)."""
    data = b""
    try:
        while b"\r\n" not in data:
            piece = sock.recv(4096)
            if not piece:
                break
            data += piece
    except OSError:
        pass
    match = re.match(rb"HTTP/1\.[01] (\d{3})", data)
    return int(match.group(1)) if match else None


# --- the clients -----------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes and latencies per kind, shared by the client threads."""

    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, outcome: str, detail: str, seconds: float) -> None:
        with self.lock:
            per_kind = self.counts.setdefault(kind, {})
            per_kind[outcome] = per_kind.get(outcome, 0) + 1
            self.seconds.setdefault(kind, []).append(seconds)
            if detail:
                self.problems.append(detail)


def connect(url: str) -> Client:
    # ssl_verify=False: with it on, each of gradio_client's HTTP calls loads the CA bundle
    # (~25 ms of CPU, even for plain http), which on 2 shared cores is measured as server
    # latency (see serving_load.py).
    return Client(
        url,
        verbose=False,
        ssl_verify=False,
        analytics_enabled=False,
        httpx_kwargs={"timeout": REQUEST_TIMEOUT_S},
    )


def attacker(url: str, inputs: Inputs, offset: int, deadline: float, tally: Tally) -> None:
    """One client: requests from its rotation until `deadline`."""
    client = connect(url)
    for n, kind in enumerate(rotation(inputs.kinds, offset)):
        if time.monotonic() >= deadline:
            return
        start = time.perf_counter()
        outcome, detail = send(client, url, kind, inputs, n + offset)
        tally.add(kind, outcome, detail, time.perf_counter() - start)


def warm_up(url: str, inputs: Inputs) -> Tally:
    """One request of each kind before measuring, so first-use allocations (imports, caches,
    the first decode) are not counted as growth under load."""
    tally = Tally()
    client = connect(url)
    for n, kind in enumerate(inputs.kinds):
        start = time.perf_counter()
        tally.add(kind, *send(client, url, kind, inputs, n), time.perf_counter() - start)
    return tally


def attack(url: str, inputs: Inputs, clients: int, duration: float) -> Tally:
    """`clients` threads for `duration` seconds; returns once every thread has stopped."""
    tally = Tally()
    deadline = time.monotonic() + duration
    threads = [
        threading.Thread(target=attacker, args=(url, inputs, 2 * i, deadline, tally), daemon=True)
        for i in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        # A request still in flight at the deadline gets its own timeout, and no more.
        thread.join(timeout=max(0.0, deadline - time.monotonic()) + REQUEST_TIMEOUT_S + 10)
    stuck = sum(thread.is_alive() for thread in threads)
    if stuck:
        tally.problems.append(f"{stuck} client thread(s) still running after the deadline")
    return tally


# --- the server's memory ---------------------------------------------------------------------


def rss_mb(pid: int) -> float | None:
    """Resident memory of `pid` from /proc (None once the process is gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


class RssSampler(threading.Thread):
    """Samples a process's RSS every RSS_INTERVAL_S seconds until stopped."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self._stop_event = threading.Event()
        self._start = time.monotonic()

    def run(self) -> None:
        while not self._stop_event.is_set():
            value = rss_mb(self.pid)
            if value is None:
                return
            self.samples.append((time.monotonic() - self._start, value))
            self._stop_event.wait(RSS_INTERVAL_S)

    def stop(self) -> list[tuple[float, float]]:
        self._stop_event.set()
        self.join()
        return self.samples


def rss_figures(samples: list[tuple[float, float]], after: float | None) -> dict:
    """Start, peak, end of the load window; growth over its second half; RSS afterwards."""
    if not samples:
        return {}
    middle = samples[-1][0] / 2
    at_middle = min(samples, key=lambda s: abs(s[0] - middle))[1]
    start, end = samples[0][1], samples[-1][1]
    return {
        "start": round(start, 1),
        "peak": round(max(mb for _, mb in samples), 1),
        "middle": round(at_middle, 1),
        "end": round(end, 1),
        "second_half_growth": round(end - at_middle, 1),
        "after": None if after is None else round(after, 1),
        # About 60 points: enough to see a trend, small enough for the JSON.
        "samples": [(round(t, 1), round(mb, 1)) for t, mb in samples[:: len(samples) // 60 + 1]],
    }


# --- one whole run ---------------------------------------------------------------------------


def percentile_ms(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.array(values) * 1000, q)), 1) if values else None


def per_kind(tally: Tally) -> dict[str, dict]:
    """For each kind: how many were sent and how each was answered, with latency."""
    out = {}
    for kind, counts in tally.counts.items():
        out[kind] = {
            "sent": sum(counts.values()),
            **counts,
            "p50_ms": percentile_ms(tally.seconds[kind], 50),
            "p95_ms": percentile_ms(tally.seconds[kind], 95),
        }
    return out


def answers_afterwards(url: str, image: Path) -> bool:
    """A fresh client, a valid image: does the server still classify it?"""
    try:
        result = connect(url).submit(handle_file(str(image)), None, api_name="/predict")
        return bool(result.result(timeout=REQUEST_TIMEOUT_S).get("label"))
    except Exception:  # any failure is the answer "no"
        return False


def upload_folder_size(folder: Path) -> dict:
    """Files in the server's Gradio folder: copies of the shown images, and every distinct
    upload (Gradio stores each file once, by content hash)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"files": len(files), "mb": round(sum(p.stat().st_size for p in files) / 1e6, 2)}


def serve_under_attack(
    artifacts: Path, clients: int, duration: float, max_upload_mb: float, work: Path
) -> dict:
    """Start the app, warm it up, attack it for `duration` s, check it afterwards, stop it."""
    images = sorted(artifacts.glob("examples/*/*.png"))
    if not images:
        raise SystemExit(f"no example images under {artifacts}/examples")
    inputs = write_inputs(images, work / "inputs", int(max_upload_mb * 1e6))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    log_path = work / "server.log"
    with log_path.open("w") as log:
        process, startup = start_app(
            artifacts,
            port,
            ["--max-upload-mb", str(max_upload_mb)],
            env={"GRADIO_TEMP_DIR": str(work / "uploads")},
            output=log,
        )
        try:
            warm = warm_up(url, inputs)
            kept_before = upload_folder_size(work / "uploads")
            sampler = RssSampler(process.pid)
            sampler.start()
            start = time.perf_counter()
            tally = attack(url, inputs, clients, duration)
            wall = time.perf_counter() - start
            samples = sampler.stop()
            afterwards = answers_afterwards(url, images[0])
            alive = process.poll() is None
            after = rss_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    server_log = log_path.read_text(errors="replace")
    kinds = per_kind(tally)
    valid = tally.seconds.get(VALID, [])
    return {
        "machine": machine(),
        "clients": clients,
        "duration_s": round(wall, 1),
        "max_upload_mb": max_upload_mb,
        "startup_s": round(startup, 2),
        "requests": sum(k["sent"] for k in kinds.values()),
        "requests_per_s": round(sum(k["sent"] for k in kinds.values()) / wall, 1),
        "warm_up": per_kind(warm),
        "kinds": kinds,
        "valid_p50_ms": percentile_ms(valid, 50),
        "valid_p95_ms": percentile_ms(valid, 95),
        "problems": (warm.problems + tally.problems)[:20],
        "rss_mb": rss_figures(samples, after),
        "uploads_kept": {"before": kept_before, "after": upload_folder_size(work / "uploads")},
        "server": {
            "alive": alive,
            "tracebacks": server_log.count(TRACEBACK),
            "printed_url": f"Serving on {url}" in server_log,
        },
        "answers_afterwards": afterwards,
    }


def targets(result: dict) -> dict[str, bool]:
    """The pass/fail lines of the run."""
    kinds = result["kinds"]
    bad = [k for k in kinds if k != VALID]
    return {
        "every kind was sent": len(bad) == 8,
        "0 failed valid requests": kinds.get(VALID, {}).get("ok", 0) == kinds[VALID]["sent"] > 0,
        "every invalid request refused with its own error": all(
            kinds[k].get("refused", 0) == kinds[k]["sent"] for k in bad
        ),
        "warm-up answered as expected": all(
            k["sent"] == k.get("ok", 0) + k.get("refused", 0) for k in result["warm_up"].values()
        ),
        "no server tracebacks": result["server"]["tracebacks"] == 0,
        "server alive": result["server"]["alive"],
        f"RSS growth over the second half < {RSS_GROWTH_LIMIT_MB:g} MB": (
            result["rss_mb"]["second_half_growth"] < RSS_GROWTH_LIMIT_MB
        ),
        "answers afterwards": result["answers_afterwards"],
    }


# --- report ----------------------------------------------------------------------------------


def markdown(result: dict, note: str) -> str:
    rss, kinds, kept = result["rss_mb"], result["kinds"], result["uploads_kept"]
    rows = "".join(
        f"| {kind} | {k['sent']} | {k.get('ok', 0) + k.get('refused', 0)} | {k.get('wrong', 0)} "
        f"| {k.get('hung', 0)} | {k.get('broken', 0)} | {k['p50_ms']} | {k['p95_ms']} |\n"
        for kind, k in kinds.items()
    )
    checks = "".join(
        f"- {'yes' if ok else 'NO'}: {name}\n" for name, ok in result["targets"].items()
    )
    problems = "".join(f"- `{p}`\n" for p in result["problems"]) or "- none\n"
    return (
        "# Serving under load and attack\n\n"
        f"Machine: {result['machine']}. {note}\n\n"
        f"`python -m serving.app --max-upload-mb {result['max_upload_mb']:g}` on loopback "
        f"(started in {result['startup_s']} s), then **{result['clients']} concurrent "
        f"gradio_client clients for {result['duration_s']} s**: every other request a valid "
        "example image, the others in turn an empty file, a text file named .png, a truncated "
        "PNG, a forged decompression-bomb header (10,000 MP), a real 56 MP 1-bit PNG bomb "
        "(7 KB on disk), a 1×1 PNG, an upload just over the cap posted straight to "
        "`/gradio_api/upload`, or 4 MiB of JSON streamed without a Content-Length to "
        f"`/gradio_api/queue/join`. {result['requests']} requests, {result['requests_per_s']}/s. "
        "Reproduce: `python -m benchmarks.load_test`.\n\n"
        "'as expected': a valid image answered with its top-5, a bad one refused with the "
        "error naming its problem (HTTP 413 for the oversized upload and body).\n\n"
        "| input | sent | as expected | wrong answer | hung | broken | p50 (ms) | p95 (ms) |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + rows + "\n"
        f"Valid requests: p50 **{result['valid_p50_ms']} ms**, p95 "
        f"**{result['valid_p95_ms']} ms**.\n\n"
        f"Server RSS (MB, from /proc every {RSS_INTERVAL_S:g} s): start {rss['start']}, peak "
        f"{rss['peak']}, middle {rss['middle']}, end {rss['end']}; **growth over the second "
        f"half: {rss['second_half_growth']} MB**; after the run {rss['after']}.\n\n"
        f"Files in the server's Gradio folder: {kept['before']['files']} "
        f"({kept['before']['mb']} MB) before the load, {kept['after']['files']} "
        f"({kept['after']['mb']} MB) after (each distinct upload is stored once). Server "
        "tracebacks: "
        f"{result['server']['tracebacks']}. Prints its URL: "
        f"{'yes' if result['server']['printed_url'] else 'no'}. "
        f"**Answers afterwards: {'yes' if result['answers_afterwards'] else 'no'}.**\n\n"
        "## Targets\n\n" + checks + "\n## Unexpected answers\n\n" + problems
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    # The app's own default cap, so the oversized upload is refused where users meet it.
    parser.add_argument("--max-upload-mb", type=float, default=10.0)
    parser.add_argument(
        "--note", default="", help="environment note for load.md (e.g. other jobs running)"
    )
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="load-test-") as work:
        result = serve_under_attack(
            args.artifacts, args.clients, args.duration, args.max_upload_mb, Path(work)
        )
    result["targets"] = targets(result)
    note = f"Load average before the run: {load_before:.2f}. {args.note}".strip()
    result["note"] = note
    (OUT / "load.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result, note)
    (OUT / "load.md").write_text(md)
    print(md)
    if not all(result["targets"].values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
