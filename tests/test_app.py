"""The Gradio app, launched for real on a free 127.0.0.1 port and driven through gradio_client
and plain HTTP: predictions, the default model, known failures, every bad input, what the
server will hand out, auth, and `python -m serving.app` itself (plus, marked slow, in a fresh
venv built only from serving/requirements.txt, as the Docker image is).
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from gradio.route_utils import delete_files_created_by_app
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from serving.app import build_demo, launch
from serving.catalog import Catalog, load_catalog
from serving.options import parse_args, parse_auth
from serving.page.blocks import CACHE_SWEEP
from serving.page.card import card_markdown, latency_markdown
from serving.page.handlers import DemoHandlers, upload_bytes
from serving.uploads import ImageError, open_upload
from tests.served import png_claiming, truncated
from tests.synthetic import CIFAR_CLASSES, STL10_CLASSES

ROOT = Path(__file__).resolve().parents[1]
UPLOAD_CAP_MB = 0.5  # small, so the over-the-cap test needs no huge file
STARTUP_TIMEOUT_S = 60
REQUEST_TIMEOUT_S = 60  # no test may hang on a stuck server


# --- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_demo(
    artifacts: Path, build_options: dict | None = None, **launch_options
) -> Iterator[str]:
    """The app in this process (a server thread) on a free port; closed afterwards.
    `build_options` go to build_demo (the upload cap defaults to UPLOAD_CAP_MB)."""
    demo = build_demo(artifacts, **{"max_upload_mb": UPLOAD_CAP_MB, **(build_options or {})})
    url = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True, **launch_options)
    try:
        yield url
    finally:
        demo.blocks.close()


def wait_until_up(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code == 200:
                return
        time.sleep(0.3)
    raise AssertionError(f"{url} did not come up within {timeout} s")


def smoke_test_module_app(python: str, cwd: Path, artifacts: Path, example: Path) -> dict:
    """Run `python -m serving.app` as a process, classify `example` through gradio_client."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRADIO_", "TOOLKIT_AUTH"))}
    process = subprocess.Popen(
        [python, "-m", "serving.app", "--artifacts", str(artifacts), "--port", str(port)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_until_up(url, process, STARTUP_TIMEOUT_S)
        return ask(connect(url), handle_file(str(example)))
    finally:
        process.terminate()
        try:
            output, _ = process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        print(output[-3000:])  # shown by pytest only when the test fails


@pytest.fixture(scope="module")
def catalog(served_artifacts) -> Catalog:
    return load_catalog(served_artifacts)


@pytest.fixture(scope="module")
def server(served_artifacts) -> Iterator[str]:
    with running_demo(served_artifacts) as url:
        yield url


@pytest.fixture(scope="module")
def client(server) -> Client:
    return connect(server)


def example(artifacts: Path, dataset: str, name: str) -> Path:
    return artifacts / "examples" / dataset / f"{name}_0.png"


def top5(catalog: Catalog, model: str, path: Path) -> dict[str, float]:
    """What the classifier says in-process: the reference for the API's answers."""
    served = catalog.get(model)
    return served.classifier.top_k(served.classifier.predict([open_upload(path)])[0])


def connect(url: str, **options) -> Client:
    return Client(url, verbose=False, httpx_kwargs={"timeout": REQUEST_TIMEOUT_S}, **options)


def ask(client: Client, *inputs):
    """client.predict with a deadline: the /predict answer, or its error raised here."""
    return client.submit(*inputs).result(timeout=REQUEST_TIMEOUT_S)


def as_dict(label: dict) -> dict[str, float]:
    return {c["label"]: c["confidence"] for c in label["confidences"]}


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def top_class(label: dict) -> str:
    """The most likely class of a gr.Label value; its heading may say "not sure" instead."""
    return label["confidences"][0]["label"]


# --- predictions -------------------------------------------------------------------------------


def test_predict_returns_the_top5_label(client, catalog, served_artifacts):
    path = example(served_artifacts, "cifar10", "cat")
    result = ask(client, handle_file(str(path)), "cifar10-net")
    assert top_class(result) == "cat"
    confidences = [c["confidence"] for c in result["confidences"]]
    assert len(confidences) == 5 and confidences == sorted(confidences, reverse=True)
    sure = catalog.get("cifar10-net").classifier.is_sure(np.array(confidences))
    assert result["label"] == ("cat" if sure else "not sure")
    expected = top5(catalog, "cifar10-net", path)
    assert list(as_dict(result)) == list(expected)
    np.testing.assert_allclose(list(as_dict(result).values()), list(expected.values()), atol=1e-6)


def test_default_model_is_the_most_accurate(client, catalog, served_artifacts):
    path = example(served_artifacts, "stl10", "horse")
    default = ask(client, handle_file(str(path)))
    assert catalog.default == "cifar10-net"
    assert set(as_dict(default)) <= set(CIFAR_CLASSES)
    assert as_dict(default) == pytest.approx(top5(catalog, "cifar10-net", path), abs=1e-6)
    stl = ask(client, handle_file(str(path)), "stl10-net")
    assert set(as_dict(stl)) <= set(STL10_CLASSES) and "monkey" in STL10_CLASSES
    assert as_dict(stl) == pytest.approx(top5(catalog, "stl10-net", path), abs=1e-6)


def test_known_failures_are_reproduced_through_the_api(client, catalog):
    failures = catalog.get("stl10-net").failures
    assert failures
    for failure in failures:
        result = ask(client, handle_file(str(failure.path)), "stl10-net")
        assert top_class(result) == failure.predicted != failure.true
        assert result["confidences"][0]["confidence"] == pytest.approx(failure.confidence, abs=1e-4)


def test_gallery_clicks_run_the_clicked_image(catalog):
    import gradio as gr

    handlers = DemoHandlers(catalog, max_upload_bytes=10**6)
    failure = catalog.get("stl10-net").failures[1]
    click = gr.SelectData(None, {"index": 1, "value": None})
    shown, label, timing = handlers.run_failure("stl10-net", click)
    assert Path(shown) == failure.path
    assert top_class(label) == failure.predicted
    assert timing["model"] == "stl10-net" and timing["model_ms"] > 0
    # With no image on screen a model switch must not wipe what a click just showed.
    assert handlers.reclassify(None, "stl10-net") == (gr.skip(), gr.skip())
    click = gr.SelectData(None, {"index": 4, "value": None})
    shown, label, _ = handlers.run_example("cifar10-net", click)
    assert Path(shown) == catalog.examples["cifar10"][4]
    assert top_class(label) == Path(shown).stem.rsplit("_", 1)[0]  # the 100 % model is right


def test_model_switch_shows_that_models_card_and_galleries(catalog):
    handlers = DemoHandlers(catalog, max_upload_bytes=10**6)
    card, matrix, reliability, failures, examples = handlers.show_model("stl10-net")
    served = catalog.get("stl10-net")
    assert card.startswith("### stl10 · net") and "monkey" in card
    assert Path(matrix) == served.confusion_matrix
    assert Path(reliability) == served.reliability_diagram and reliability.endswith(".png")
    assert [Path(p) for p, _ in failures] == [f.path for f in served.failures]
    assert failures[0][1] == f"{served.failures[0].true} → {served.failures[0].predicted} " + (
        f"({served.failures[0].confidence:.0%})"
    )
    assert [Path(p).parent.name for p, _ in examples] == ["stl10"] * len(examples) != []


def test_model_card_shows_params_size_accuracy_and_export_figures(catalog):
    served = catalog.get("cifar10-net")
    card = card_markdown(served)
    assert f"| parameters | {served.info['num_params']:,} |" in card
    assert "| test accuracy | 100.00% (100 images) |" in card
    assert f"| ONNX size | {served.size_bytes / 1e6:.2f} MB |" in card
    assert "| ONNX = torch top-1 | 100.00% |" in card
    assert "latency p50 (onnx fp32" in card
    served.report.clear()  # a minimal export report still gives a card
    assert "| parameters |" in card_markdown(served)


def test_below_the_threshold_the_page_says_not_sure_and_still_shows_the_top5(
    catalog, served_artifacts, monkeypatch
):
    handlers = DemoHandlers(catalog, max_upload_bytes=10**6)
    classifier = catalog.get("cifar10-net").classifier
    cat = example(served_artifacts, "cifar10", "cat").read_bytes()
    monkeypatch.setattr(classifier, "confidence_threshold", 1.5)  # no probability reaches it
    doubtful, timing = handlers.predict({"path": None, "url": data_url(cat)}, "cifar10-net")
    assert doubtful["label"] == "not sure" and top_class(doubtful) == "cat"
    assert len(doubtful["confidences"]) == 5
    note = latency_markdown(timing)
    assert note.startswith("**Not sure**: the top class has") and "threshold of 150%" in note
    monkeypatch.setattr(classifier, "confidence_threshold", None)  # an uncalibrated model
    sure, timing = handlers.predict({"path": None, "url": data_url(cat)}, "cifar10-net")
    assert sure["label"] == "cat" and "not_sure" not in timing
    assert sure["confidences"] == doubtful["confidences"]


def test_the_model_card_says_what_the_probabilities_mean(catalog):
    served = catalog.get("cifar10-net")
    card = card_markdown(served)
    method, computed = served.info["calibration_method"], served.info["calibration_description"]
    assert f"calibrated by {method}, fitted and chosen on the val split: {computed}" in card
    assert f"softmax(logits / {served.info['temperature']:.3f})" in computed
    assert "| calibration error (ECE, test) |" in card and "raw →" in card
    threshold = served.info["confidence_threshold"]
    if threshold is None:
        assert "| not sure | never" in card
    else:
        kept = served.metrics["calibration"]["selective"]
        assert f"below {threshold:.1%} top-1 probability (target 95% accuracy)" in card
        assert f"answered {kept['coverage']:.1%} of the images" in card


# --- bad input --------------------------------------------------------------------------------

BAD_UPLOADS = {
    "notes.txt": (b"just some text\n", r"'notes.txt' is not a PNG, JPEG, GIF, BMP, TIFF"),
    "empty.png": (b"", r"'empty.png' is empty \(0 bytes\)"),
    "cut.jpg": (truncated("JPEG"), r"'cut.jpg' is truncated"),
    "bomb.png": (png_claiming(100_000, 100_000), r"'bomb.png' claims 10,000 megapixels"),
    "dot.png": (png_claiming(1, 1), r"'dot.png' is only 1×1 pixels"),
}


@pytest.mark.parametrize("name", BAD_UPLOADS)
def test_bad_uploads_get_a_specific_error_and_the_server_keeps_serving(
    client, served_artifacts, tmp_path, name
):
    data, message = BAD_UPLOADS[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(AppError, match=message):
        ask(client, handle_file(str(tmp_path / name)))
    good = ask(client, handle_file(str(example(served_artifacts, "cifar10", "ship"))))
    assert top_class(good) == "ship"


def test_missing_image_and_unknown_model(client, served_artifacts):
    with pytest.raises(AppError, match="no image given"):
        ask(client, None)
    path = handle_file(str(example(served_artifacts, "cifar10", "dog")))
    with pytest.raises(AppError, match="unknown model 'imagenet-vit'; choose one of: cifar10-net"):
        ask(client, path, "imagenet-vit")


def test_animated_gif_is_classified_by_its_first_frame(client, served_artifacts, tmp_path):
    from PIL import Image

    first = Image.open(example(served_artifacts, "cifar10", "frog")).convert("RGB")
    second = Image.open(example(served_artifacts, "cifar10", "truck")).convert("RGB")
    first.save(tmp_path / "anim.gif", save_all=True, append_images=[second], duration=200)
    result = ask(client, handle_file(str(tmp_path / "anim.gif")))
    assert top_class(result) == "frog"


def test_uploads_over_the_cap_are_refused(client, server, tmp_path):
    big = tmp_path / "huge.png"
    big.write_bytes(os.urandom(int(UPLOAD_CAP_MB * 1e6) + 1000))
    # gradio_client reads the cap from the app and refuses before sending...
    with pytest.raises(ValueError, match="exceeds the maximum file size of 500000 bytes"):
        ask(client, handle_file(str(big)))
    # ...and a client that ignores it is stopped by the server.
    with big.open("rb") as f:
        response = httpx.post(f"{server}gradio_api/upload", files={"files": f}, timeout=30)
    assert response.status_code == 413 and "maximum allowed size of 500000" in response.text


def test_upload_payload_checks():
    png = png_claiming(16, 16)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    assert upload_bytes({"url": url}, 10**6) == (png, "the upload")
    with pytest.raises(ImageError, match="upload limit is 0.0 MB"):
        upload_bytes({"url": url, "orig_name": "x.png"}, 10)
    with pytest.raises(ImageError, match="no image given"):
        upload_bytes(None, 10**6)
    with pytest.raises(ImageError, match="did not reach the server"):
        upload_bytes({"orig_name": "x.png"}, 10**6)


def test_error_messages_are_html_escaped(catalog):
    import gradio as gr

    handlers = DemoHandlers(catalog, max_upload_bytes=10**6)
    url = "data:text/plain;base64," + base64.b64encode(b"not an image").decode()
    with pytest.raises(gr.Error) as info:
        handlers.predict({"url": url, "orig_name": "<img src=x onerror=alert(1)>.png"})
    assert "<img" not in info.value.message and "&lt;img" in info.value.message


# --- what the server exposes -----------------------------------------------------------------


def test_only_the_shown_images_can_be_downloaded(server, catalog):
    served = catalog.get("stl10-net")
    allowed = [served.failures[0].path, served.confusion_matrix, catalog.examples["cifar10"][0]]
    refused = [
        served.folder / "model.onnx",
        served.folder / "metrics.json",
        served.folder / "failures.json",
        Path(__file__),
        Path("/etc/passwd"),
    ]
    for path in allowed:
        assert httpx.get(f"{server}gradio_api/file={path}", timeout=10).status_code == 200, path
    for path in refused:
        assert httpx.get(f"{server}gradio_api/file={path}", timeout=10).status_code == 403, path


def test_the_api_does_not_read_server_paths(server, catalog):
    """preprocess=False hands the raw payload over, so check Gradio still refuses foreign paths."""
    for path in ("/etc/hostname", str(catalog.examples["cifar10"][0])):
        payload = {"data": [{"path": path, "meta": {"_type": "gradio.FileData"}}, None]}
        event = httpx.post(f"{server}gradio_api/call/predict", json=payload, timeout=10).json()
        stream = httpx.get(f"{server}gradio_api/call/predict/{event['event_id']}", timeout=30)
        assert stream.text.startswith("event: error"), stream.text
        assert "label" not in stream.text


def test_only_predict_is_public(client):
    assert list(client.view_api(print_info=False, return_format="dict")["named_endpoints"]) == [
        "/predict"
    ]


def test_safe_defaults(monkeypatch, server):
    monkeypatch.delenv("TOOLKIT_AUTH", raising=False)
    args = parse_args([])
    assert (args.host, args.port, args.share, args.auth) == ("127.0.0.1", 7860, False, None)
    assert args.artifacts == Path("artifacts") and args.max_upload_mb == 10
    assert server.startswith("http://127.0.0.1:")
    monkeypatch.setenv("TOOLKIT_AUTH", "ana:s3:cret")
    assert parse_args([]).auth == ("ana", "s3:cret")
    assert parse_args(["--auth", "bo:pw"]).auth == ("bo", "pw")
    for bad in ("nocolon", ":pw", "user:"):
        with pytest.raises(ValueError, match="user:password"):
            parse_auth(bad)


def test_auth_is_required_when_set(served_artifacts):
    example_image = handle_file(str(example(served_artifacts, "cifar10", "cat")))
    with running_demo(served_artifacts, auth=("ana", "secret")) as url:
        assert httpx.get(f"{url}config", timeout=10).status_code == 401
        with pytest.raises(Exception):  # noqa: B017 - the client raises different types here
            ask(connect(url), example_image)
        authed = connect(url, auth=("ana", "secret"))
        assert top_class(ask(authed, example_image)) == "cat"


def test_the_cache_sweep_deletes_old_uploads_and_keeps_the_page(served_artifacts, tmp_path):
    """Gradio keeps every upload until restart unless delete_cache is set; the sweep must not
    take the page's own pictures (examples, failures, confusion matrix) with them."""
    demo = build_demo(served_artifacts, max_upload_mb=UPLOAD_CAP_MB)
    blocks = demo.blocks
    assert blocks.delete_cache == CACHE_SWEEP
    url = launch(demo, port=free_port(), prevent_thread_lock=True, quiet=True)
    try:
        page = {f for block in blocks.blocks.values() for f in getattr(block, "keep_in_cache", ())}
        assert len(page) > 3
        # Not an example file itself: Gradio caches by content, and would find the page's copy.
        upload, note = tmp_path / "upload.png", PngInfo()
        note.add_text("comment", "an upload")  # same pixels, other bytes
        Image.open(example(served_artifacts, "cifar10", "cat")).save(upload, pnginfo=note)
        cat = handle_file(str(upload))
        assert top_class(ask(connect(url), cat, "cifar10-net")) == "cat"
        uploads = set(blocks.upload_file_set)
        assert uploads and all(Path(f).exists() for f in uploads)

        delete_files_created_by_app(blocks, age=0)  # the hourly sweep, once everything is old

        assert not any(Path(f).exists() for f in uploads)
        for path in page:
            assert httpx.get(f"{url}gradio_api/file={path}", timeout=10).status_code == 200, path
        assert top_class(ask(connect(url), cat, "cifar10-net")) == "cat"
    finally:
        blocks.close()


# --- `python -m serving.app` -------------------------------------------------------------------


def test_module_entry_point_serves(served_artifacts):
    result = smoke_test_module_app(
        sys.executable, ROOT, served_artifacts, example(served_artifacts, "cifar10", "deer")
    )
    assert top_class(result) == "deer"


def test_broken_artifacts_stop_the_server_naming_the_file(served_artifacts, tmp_path):
    broken = shutil.copytree(served_artifacts, tmp_path / "artifacts")
    (broken / "stl10-net" / "model.onnx").unlink()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.app",
            "--artifacts",
            str(broken),
            "--port",
            str(free_port()),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert f"error: '{broken.resolve() / 'stl10-net' / 'model.onnx'}' is missing" in done.stderr
    assert "Traceback" not in done.stderr
