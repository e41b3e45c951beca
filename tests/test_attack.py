"""The app under load and under attack: hostile uploads mixed into real traffic, paths that
try to climb out of what is served, oversized request bodies, model files swapped while the
app runs, and the warning for a server other machines can reach without a password.

tests/test_app.py already covers each bad upload one at a time, Gradio's upload cap, absolute
paths on the file route and in the API; these tests add what those do not.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import gradio as gr
import httpx
import pytest
from gradio_client import handle_file
from PIL import Image

import serving.app
from benchmarks.bad_uploads import real_bomb
from benchmarks.load_test import VALID, post_chunked, read_status, serve_under_attack, targets
from serving.catalog import load_catalog
from serving.classifier import ArtifactError
from serving.options import exposure_warning, is_loopback
from serving.page.handlers import DemoHandlers
from serving.uploads import ImageError, open_upload
from tests.test_app import UPLOAD_CAP_MB, ask, connect, example, running_demo

REFUSED = "File not allowed"  # the body of Gradio's file route when it refuses a path


# --- load with hostile uploads mixed in --------------------------------------------------------


def test_mixed_valid_and_hostile_load(served_artifacts, tmp_path):
    """benchmarks/load_test.py, short: 4 clients for 10 s against `python -m serving.app`."""
    result = serve_under_attack(served_artifacts, 4, 10.0, UPLOAD_CAP_MB, tmp_path)
    met = targets(result)
    assert all(met.values()), (met, result["problems"], result["kinds"])
    kinds = result["kinds"]
    # Not vacuous: every kind really went out, and each was answered the expected way.
    assert all(k["sent"] >= 2 for k in kinds.values()), kinds
    assert kinds[VALID]["ok"] == kinds[VALID]["sent"]
    for name, counts in kinds.items():
        if name != VALID:
            assert counts.get("refused") == counts["sent"], (name, counts)
    assert result["server"]["printed_url"] and result["answers_afterwards"]


# --- what the file route hands out --------------------------------------------------------------


@pytest.fixture(scope="module")
def private_artifacts(served_artifacts, tmp_path_factory) -> Path:
    """A copy the tests may plant symlinks in."""
    return shutil.copytree(served_artifacts, tmp_path_factory.mktemp("attack") / "artifacts")


@pytest.fixture(scope="module")
def server(private_artifacts) -> Iterator[str]:
    with running_demo(private_artifacts) as url:
        yield url


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written: httpx would normalise '../' away before sending."""
    address = httpx.URL(url)
    connection = http.client.HTTPConnection(address.host, address.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@contextlib.contextmanager
def listener() -> Iterator[tuple[int, list]]:
    """A loopback port that records every connection made to it: proof a URL was not fetched."""
    hits: list = []
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sock.settimeout(0.2)
        stop = threading.Event()

        def accept() -> None:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    hits.append(sock.accept()[0].close())

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield sock.getsockname()[1], hits
        finally:
            stop.set()
            thread.join()


def traversal_paths(artifacts: Path, port: int) -> dict[str, str]:
    """Request paths that try to reach model.onnx, /etc/passwd or loopback from served ones."""
    model = artifacts / "stl10-net" / "model.onnx"
    failures = artifacts / "stl10-net" / "failures"
    shown = next(failures.iterdir())
    examples = artifacts / "examples" / "cifar10"
    return {
        "dot-dot": f"/gradio_api/file={failures}/../model.onnx",
        "dot-dot-after-a-file": f"/gradio_api/file={shown}/../../model.onnx",
        "encoded-dot-dot": f"/gradio_api/file={failures}/%2e%2e/model.onnx",
        "encoded-slash": f"/gradio_api/file={failures}/..%2fmodel.onnx",
        "double-encoded": f"/gradio_api/file={failures}/%252e%252e/model.onnx",
        "fully-encoded": "/gradio_api/file=" + quote(str(model), safe=""),
        "to-etc-passwd": f"/gradio_api/file={examples}" + "/.." * 16 + "/etc/passwd",
        "double-slash": "/gradio_api/file=//etc/passwd",
        "relative-to-cwd": "/gradio_api/file=" + os.path.relpath(model),
        "old-file-route": f"/gradio_api/file/{model}",
        "symlink-to-file": f"/gradio_api/file={examples}/leak.png",
        "symlinked-dir": f"/gradio_api/file={examples}/root/etc/passwd",
        "loopback-url": f"/gradio_api/file=http://127.0.0.1:{port}/secret.png",
    }


def test_file_route_refuses_every_way_out(server, private_artifacts):
    examples = private_artifacts / "examples" / "cifar10"
    # Planted after startup: links inside the served tree to things that are not served.
    (examples / "leak.png").symlink_to("/etc/passwd")
    (examples / "root").symlink_to("/")
    shown = next((private_artifacts / "stl10-net" / "failures").iterdir())
    # The raw sender does reach files that are served: a refusal below is a real refusal.
    assert raw_get(server, f"/gradio_api/file={shown}") == (200, shown.read_bytes())
    with listener() as (port, hits):
        for name, path in traversal_paths(private_artifacts, port).items():
            status, body = raw_get(server, path)
            assert status == 403 and REFUSED in body.decode(), (name, status, body[:200])
    assert hits == [], "the server fetched a loopback URL"


def test_upload_folder_paths_cannot_climb_out(server, served_artifacts):
    """The API accepts only files uploaded to Gradio's folder; a path that starts there and
    climbs out, or a URL pointing at loopback, must be refused without being read."""
    image = example(served_artifacts, "cifar10", "cat")
    with image.open("rb") as f:
        (uploaded,) = httpx.post(f"{server}gradio_api/upload", files={"files": f}).json()
    with listener() as (port, hits):
        answers = {
            path: call_predict(server, path)
            for path in (
                uploaded,  # control: the genuine upload is classified
                uploaded + "/../../../../../../etc/hostname",
                f"http://127.0.0.1:{port}/cat.png",
            )
        }
    control, *attacks = answers.values()
    assert control.startswith("event: complete"), control
    assert json.loads(control.split("data:", 1)[1])[0]["confidences"][0]["label"] == "cat"
    for stream in attacks:
        assert stream.startswith("event: error") and "label" not in stream, stream
    assert hits == [], "the server fetched a loopback URL"


def call_predict(url: str, path: str) -> str:
    """/predict over Gradio's plain HTTP API with a FileData path; the event stream's text."""
    payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, None]}
    event = httpx.post(f"{url}gradio_api/call/predict", json=payload, timeout=30).json()
    return httpx.get(f"{url}gradio_api/call/predict/{event['event_id']}", timeout=60).text


def test_example_symlinked_outside_the_artifacts_is_refused_at_startup(served_artifacts, tmp_path):
    """Gradio serves what a link points to, so a linked example would publish its target."""
    root = shutil.copytree(served_artifacts, tmp_path / "artifacts")
    outside = tmp_path / "elsewhere.png"
    Image.new("RGB", (32, 32)).save(outside)
    (root / "examples" / "cifar10" / "cat_9.png").symlink_to(outside)
    with pytest.raises(ArtifactError, match=r"cat_9\.png' points outside .*elsewhere\.png"):
        load_catalog(root)


# --- request bodies -----------------------------------------------------------------------------


def test_request_bodies_over_the_cap_are_refused_before_they_are_read(server, served_artifacts):
    """Gradio caps uploaded files, not JSON: without serving/limits.py a 200 MB POST to
    queue/join is read into memory. A declared size gets 413 before the body is sent; a
    chunked body (no declared size) is cut off once it passes 1 MiB."""
    address = httpx.URL(server)
    for path, declared in (
        ("gradio_api/queue/join", 200_000_000),
        ("gradio_api/call/predict", 2_000_000),
        ("gradio_api/upload", int(UPLOAD_CAP_MB * 1e6) + 200_000),
    ):
        with socket.create_connection((address.host, address.port), timeout=30) as sock:
            sock.sendall(
                f"POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {declared}\r\n\r\n".encode()
            )
            # Not one body byte sent: only a refusal on the headers can answer in time.
            assert read_status(sock) == 413, path
    assert post_chunked(server, "gradio_api/queue/join", 8 * 1024 * 1024) == 413
    assert post_chunked(server, "gradio_api/call/predict", 8 * 1024 * 1024) == 413
    # Ordinary requests still pass the limit.
    image = handle_file(str(example(served_artifacts, "cifar10", "cat")))
    assert ask(connect(server), image)["confidences"][0]["label"] == "cat"


def test_real_decompression_bomb_is_refused_before_decoding(monkeypatch):
    """A complete 7 KB PNG that decodes to 56 megapixels: refused on its header alone."""
    data = real_bomb()
    assert len(data) < 20_000
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    with pytest.raises(ImageError, match="claims 8000×7000 pixels, 56 megapixels"):
        open_upload(data, "'bomb.png'")
    assert decoded == [], "the pixels were decoded before the bomb was refused"


# --- model files swapped while the app runs -----------------------------------------------------


def test_a_model_swapped_for_garbage_while_serving_changes_nothing(served_artifacts, tmp_path):
    """Sessions are loaded at startup: overwriting a model.onnx in place must not disturb that
    model's predictions or the others'."""
    root = shutil.copytree(served_artifacts, tmp_path / "artifacts")
    image = handle_file(str(example(served_artifacts, "cifar10", "cat")))
    with running_demo(root) as url:
        client = connect(url)
        before = {m: ask(client, image, m) for m in ("cifar10-net", "stl10-net")}
        (root / "stl10-net" / "model.onnx").write_bytes(b"\x08\x01garbage, not protobuf" * 50)
        after = {m: ask(client, image, m) for m in ("cifar10-net", "stl10-net")}
    assert after == before


def test_gallery_images_damaged_while_serving_fail_that_click_only(served_artifacts, tmp_path):
    """Gallery images are read from disk at click time: a damaged one gives an error naming
    the file, and every other image and model still works."""
    root = shutil.copytree(served_artifacts, tmp_path / "artifacts")
    handlers = DemoHandlers(load_catalog(root), max_upload_bytes=10**6)
    damaged = handlers.catalog.get("stl10-net").failures[0].path
    damaged.write_bytes(b"no longer a png")
    (root / "stl10-net" / "model.onnx").unlink()
    click = gr.SelectData(None, {"index": 0, "value": None})
    with pytest.raises(gr.Error, match=rf"'{damaged}' changed since the server started"):
        handlers.run_failure("stl10-net", click)
    other = gr.SelectData(None, {"index": 1, "value": None})
    shown, label, _ = handlers.run_failure("stl10-net", other)
    assert label and Path(shown) != damaged
    assert handlers.run_example("cifar10-net", click)[1]
    assert handlers.show_model("stl10-net")[0].startswith("### stl10 · net")


# --- who can reach the server ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("[::1]", True),
        ("127.0.0.2", True),
        ("0.0.0.0", False),
        ("::", False),
        ("192.168.1.20", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback
    assert (exposure_warning(host, None) is None) is loopback
    assert exposure_warning(host, ("ana", "pw")) is None


@pytest.fixture
def fake_server(monkeypatch) -> list:
    """serving.app.main without loading models or binding a port: records what launch got."""
    launched: list = []

    def launch(demo, **options):
        launched.append(options)
        return f"http://{options['host']}:{options['port']}/"

    demo = SimpleNamespace(blocks=SimpleNamespace(block_thread=lambda: None))
    monkeypatch.setattr(serving.app, "build_demo", lambda *args, **kwargs: demo)
    monkeypatch.setattr(serving.app, "launch", launch)
    monkeypatch.delenv("TOOLKIT_AUTH", raising=False)
    return launched


def test_main_prints_its_url_and_warns_when_exposed_without_auth(fake_server, monkeypatch, capsys):
    serving.app.main(["--host", "0.0.0.0", "--port", "7999"])
    out, err = capsys.readouterr()
    assert "Serving on http://0.0.0.0:7999/" in out
    assert "warning: listening on 0.0.0.0, reachable from other machines" in err
    assert "--auth user:password or set $TOOLKIT_AUTH" in err

    serving.app.main(["--port", "7999"])
    out, err = capsys.readouterr()
    assert "Serving on http://127.0.0.1:7999/" in out and "warning" not in err

    monkeypatch.setenv("TOOLKIT_AUTH", "ana:pw")
    serving.app.main(["--host", "0.0.0.0"])
    out, err = capsys.readouterr()
    assert "Serving on http://0.0.0.0:7860/" in out and "warning" not in err
    assert fake_server[-1]["auth"] == ("ana", "pw")


def test_toolkit_serve_warns_too(fake_server):
    from typer.testing import CliRunner

    from toolkit.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--port", "7998"])
    assert result.exit_code == 0, result.output
    assert "Serving on http://0.0.0.0:7998/" in result.output
    assert "warning: listening on 0.0.0.0" in result.output
    assert fake_server[-1]["host"] == "0.0.0.0"
