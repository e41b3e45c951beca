"""A real browser on the real app: Playwright driving Debian's chromium (/usr/bin/chromium).

Open the page, upload an image, see its label and latency; run a known failure from the
gallery; upload a damaged file and see the specific error. Screenshots go to pytest's tmp
dir. Skips when Playwright or the browser is missing (nothing is ever downloaded).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.served import truncated
from tests.test_app import running_demo

CHROMIUM = Path(os.environ.get("TOOLKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 30_000

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
if not CHROMIUM.is_file():
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


@pytest.fixture()
def requested() -> list[str]:
    """Every URL the page's browser asks for, from the first load on."""
    return []


@pytest.fixture()
def page(served_artifacts, requested):
    """A fresh page on a fresh server; both closed afterwards."""
    with running_demo(served_artifacts) as url, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=TIMEOUT_MS
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("request", lambda request: requested.append(request.url))
            page.goto(url)
            yield page
        finally:
            browser.close()


def heading(top_class: str) -> re.Pattern:
    """The label's heading: the top class, or "not sure" below the model's threshold."""
    return re.compile(f"^({re.escape(top_class)}|not sure)$")


def upload(page, path: Path) -> None:
    page.set_input_files("#image-input input[type=file]", str(path))


def test_upload_shows_the_label_and_latency(page, served_artifacts, tmp_path):
    expect = sync_api.expect
    upload(page, served_artifacts / "examples" / "cifar10" / "cat_0.png")
    expect(page.get_by_test_id("label-output-value")).to_have_text(heading("cat"))
    expect(page.locator("#prediction button.confidence-set")).to_have_count(5)
    expect(page.locator("#prediction button.confidence-set").first).to_contain_text("cat")
    expect(page.locator("#latency")).to_contain_text("cifar10-net on CPUExecutionProvider")
    page.screenshot(path=tmp_path / "upload.png", full_page=True)
    assert (tmp_path / "upload.png").stat().st_size > 10_000


def test_failure_gallery_click_runs_that_image(page, served_artifacts, tmp_path):
    expect = sync_api.expect
    failures = json.loads((served_artifacts / "stl10-net" / "failures.json").read_text())
    page.click("#model-picker input")
    page.get_by_role("option", name="stl10 · net").click()
    page.get_by_role("tab", name="Known failures").click()
    thumbnails = page.locator("#failures button.thumbnail-item")
    expect(thumbnails).to_have_count(len(failures))
    expect(thumbnails.first).to_contain_text(f"{failures[0]['true']} → {failures[0]['predicted']}")
    thumbnails.first.click()
    expect(page.get_by_test_id("label-output-value")).to_have_text(
        heading(failures[0]["predicted"])
    )
    expect(page.locator("#latency")).to_contain_text("stl10-net")
    page.screenshot(path=tmp_path / "failure.png", full_page=True)


def test_damaged_upload_shows_a_specific_error(page, served_artifacts, tmp_path):
    expect = sync_api.expect
    damaged = tmp_path / "holiday.jpg"
    damaged.write_bytes(truncated("JPEG"))
    upload(page, damaged)
    expect(page.get_by_text("'holiday.jpg' is truncated")).to_be_visible()
    page.screenshot(path=tmp_path / "error.png")
    # the page still works afterwards
    upload(page, served_artifacts / "examples" / "cifar10" / "ship_0.png")
    expect(page.get_by_test_id("label-output-value")).to_have_text(heading("ship"))


def test_the_page_asks_nothing_of_other_hosts(page, requested, served_artifacts):
    """An air-gapped user's browser reaches no CDN or font service: everything the page
    loads, and asks while classifying, comes from the server itself."""
    upload(page, served_artifacts / "examples" / "cifar10" / "cat_0.png")
    sync_api.expect(page.get_by_test_id("label-output-value")).to_have_text(heading("cat"))
    origin = urlsplit(page.url).netloc
    fetched = [u for u in requested if urlsplit(u).scheme in ("http", "https", "ws", "wss")]
    assert len(fetched) > 5  # the page, its scripts, styles, fonts, the upload, the call
    assert [u for u in fetched if urlsplit(u).netloc != origin] == []
