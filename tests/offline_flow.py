"""The whole flow a user runs, as the user runs it (one process per command), for
tests/test_offline_flow.py to run with no network:

    python -m tests.offline_flow WORK

WORK/data holds train/ and test/ class folders. It trains, evaluates, exports, predicts and
packages with `python -m toolkit`, then serves the package with `toolkit serve` and uses both
doors over loopback HTTP: the Gradio page (the page itself, and its predict as the page's
JavaScript calls it) and the inference API (/v2 metadata, /classify). Everything it saw goes
to WORK/flow.json; it judges nothing, the test does. Nothing here imports toolkit or serving:
the processes it starts are what is tested.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 300
SERVER_START_TIMEOUT_S = 120
# src/href/url() pointing at another host: what a browser would fetch from the internet.
EXTERNAL_REFERENCE = re.compile(
    r"""(?:src|href)\s*=\s*["']((?:https?:)?//[^"']+)|url\(\s*["']?((?:https?:)?//[^)"']+)"""
)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def toolkit(*args: object) -> dict:
    """One `python -m toolkit ...` command: its exit code, time and output's end."""
    command = [sys.executable, "-m", "toolkit", *map(str, args)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=STEP_TIMEOUT_S)
    return {
        "command": " ".join(map(str, args[:1])),
        "rc": done.returncode,
        "seconds": round(time.perf_counter() - start, 1),
        "stdout": tail(done.stdout),
        "stderr": tail(done.stderr),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None) -> tuple:
    """(status, body text) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def multipart(field: str, name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def wait_ready(base: str, server: subprocess.Popen) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < SERVER_START_TIMEOUT_S:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode} before it was ready")
        try:
            if http("GET", f"{base}/v2/health/ready")[0] == 200:
                return round(time.perf_counter() - start, 1)
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server was not ready after {SERVER_START_TIMEOUT_S} s")


def page_predict(base: str, image: Path, model: str) -> str:
    """The page's predict, called the way its JavaScript does: upload, call, read the events."""
    body, headers = multipart("files", image.name, image.read_bytes())
    status, uploaded = http("POST", f"{base}/gradio_api/upload", body, headers)
    if status != 200:
        return f"upload: {status} {uploaded}"
    file_data = {"path": json.loads(uploaded)[0], "meta": {"_type": "gradio.FileData"}}
    call = json.dumps({"data": [file_data, model]}).encode()
    status, answer = http(
        "POST", f"{base}/gradio_api/call/predict", call, {"Content-Type": "application/json"}
    )
    if status != 200:
        return f"call: {status} {answer}"
    return http("GET", f"{base}/gradio_api/call/predict/{json.loads(answer)['event_id']}")[1]


def serve(artifacts: Path, model: str, image: Path, log: Path) -> dict:
    """`toolkit serve` on a free loopback port: the page and the API, then SIGTERM."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    command = ["toolkit", "serve", "--artifacts", artifacts, "--port", port]
    with open(log, "w") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", *map(str, command)], cwd=REPO, stdout=output, stderr=output
        )
    seen: dict = {}
    try:
        seen["ready_after_s"] = wait_ready(base, server)
        status, page = http("GET", f"{base}/")
        _, theme = http("GET", f"{base}/theme.css")
        config = json.loads(http("GET", f"{base}/config")[1])
        seen["page"] = {
            "status": status,
            "title": config.get("title"),
            "analytics_enabled": config.get("analytics_enabled"),
            "stylesheets": config.get("stylesheets"),  # a theme's web fonts would be here
        }
        seen["external_references"] = sorted(
            {a or b for a, b in EXTERNAL_REFERENCE.findall(page + theme)}
        )
        seen["page_predict"] = page_predict(base, image, model)
        seen["metadata"] = json.loads(http("GET", f"{base}/v2/models/{model}")[1])
        status, answer = http(
            "POST",
            f"{base}/classify?model={model}",
            image.read_bytes(),
            {"Content-Type": "image/png"},
        )
        seen["classify"] = {"status": status, "answer": json.loads(answer)}
    except Exception as exc:  # the test reports it beside everything seen before it
        seen["error"] = repr(exc)
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        seen["server"] = {"rc": server.returncode, "output": tail(log.read_text())}
    return seen


def main(work: Path) -> None:
    data, run, artifacts = work / "data", work / "run", work / "artifacts"
    commands = [
        ["train", "net", "--data-dir", data, "--data-root", work / "cache", "--epochs", 1,
         "--batch-size", 16, "--device", "cpu", "--run-dir", run],
        ["evaluate", run, "--device", "cpu"],
        ["export", run],
        ["predict", data / "test", "--model", run, "--top-k", 2],
        ["package", run, "--artifacts", artifacts, "--name", "shapes-net"],
    ]  # fmt: skip
    result: dict = {"steps": []}
    for args in commands:
        result["steps"].append(toolkit(*args))
        if result["steps"][-1]["rc"] != 0:
            break
    else:
        image = sorted((data / "test").glob("*/*.png"))[0]
        result["served"] = serve(artifacts, "shapes-net", image, work / "server.log")
    (work / "flow.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ["TOOLKIT_PROGRESS"] = "0"  # no live bars in captured output
    main(Path(sys.argv[1]))
