"""The documentation site builds with `mkdocs build --strict`, and strict mode catches what it
should: a broken link or anchor, a nav entry without its page, a page left out of the nav, a
link to a benchmark file that does not exist. Figures quoted from benchmarks/ are still there."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# The `dev` extra's documentation tools; `make test` installs them, so this runs in CI.
pytest.importorskip("mkdocs")
pytest.importorskip("material")
pytest.importorskip("mkdocstrings")
pytest.importorskip("mkdocstrings_handlers.python")

ROOT = Path(__file__).resolve().parents[1]
# What the build reads besides docs/ and mkdocs.yml: the hook's mirrored folders, and the code
# mkdocstrings documents.
BUILD_INPUTS = ("benchmarks", "artifacts", "deploy", "toolkit")


def build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=config_dir,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs") / "site"
    done = build(ROOT, out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_the_site_builds_strict_with_every_nav_page(site):
    nav = re.findall(r":\s+([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M)
    assert len(nav) >= 30
    for page in nav:  # a.md -> a.html (the site opens from disk); a/README.md -> a/index.html
        html = re.sub(r"(^|/)README\.md$", r"\1index.md", page).removesuffix(".md") + ".html"
        assert (site / html).is_file(), page
    # The hook's mirrored files: a benchmark page, its plots, the shipped models' pictures.
    assert "90.74% ± 0.06%" in (site / "benchmarks" / "speedrun.html").read_text()
    assert (site / "benchmarks" / "calibration" / "cifar10-speedrun.png").is_file()
    assert (site / "artifacts" / "cifar10-speedrun" / "reliability_diagram.png").is_file()
    assert not list(site.rglob("*.onnx")) and not (site / "hooks.py").exists()
    # Links written for GitHub (../benchmarks/x.md) point at the site's copy.
    page = (site / "benchmarks.html").read_text()
    assert 'href="benchmarks/speedrun.html"' in page and "../benchmarks/" not in page
    # Nothing is fetched from the network when the site is opened (web fonts, scripts).
    for html in site.rglob("*.html"):
        assert not re.search(r'<(link|script)[^>]+(href|src)="(https?:)?//', html.read_text())


# Packages with no Python API to document: the command line is documented by its commands.
NOT_API = {"cli"}


def test_the_reference_documents_every_exported_name(site):
    """Each package's public names, read from its __init__, have a rendered entry."""
    packages = sorted(
        p.parent.name
        for p in (ROOT / "toolkit").glob("*/__init__.py")
        if p.parent.name not in NOT_API
    )
    assert {"data", "models", "train", "export", "predict", "audit"} <= set(packages)
    for package in packages:
        page = (site / "api" / f"{package}.html").read_text()
        names = hooks().exported_names(f"toolkit.{package}")
        for name in names:
            assert f'id="{names[name]}.{name}"' in page, f"toolkit.{package}.{name}"
    api = (site / "api" / "toolkit-api.html").read_text()
    for name in ("train", "resume", "evaluate", "export", "predict", "audit"):
        assert f'id="toolkit.api.{name}"' in api


def test_strict_fails_on_broken_links_and_missing_pages(tmp_path):
    """A copy of the docs with one fault of each kind: the build fails and names every one."""
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(ROOT / "docs", tmp_path / "docs", ignore=shutil.ignore_patterns("__pycache__"))
    for name in BUILD_INPUTS:
        (tmp_path / name).symlink_to(ROOT / name)
    with (tmp_path / "docs" / "export.md").open("a") as page:
        page.write("\n[a page](no-such-page.md) [an anchor](audit.md#no-such-section)\n")
        page.write("[a benchmark](../benchmarks/no_such_benchmark.md)\n")
    (tmp_path / "docs" / "orphan.md").write_text("# In no nav\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(config.read_text().replace("guarantees.md", "no-such-nav-page.md"))
    done = build(tmp_path, tmp_path / "site")
    assert done.returncode != 0
    for fault in (
        "no-such-page.md",
        "no-such-section",
        "benchmarks/no_such_benchmark.md",
        "orphan.md",
        "no-such-nav-page.md",
    ):
        assert fault in done.stderr, fault


# --- figures quoted from benchmarks/ ------------------------------------------------------------

NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")
LINK = re.compile(r"\]\(((?:\.\./)*benchmarks/[\w./-]+\.md)\)")


def missing_figures(page: Path) -> tuple[int, list[str]]:
    """Rows checked, and the bold figures of a table row that its linked benchmark file lacks."""
    checked, missing = 0, []
    for row in page.read_text().splitlines():
        targets = set(LINK.findall(row))
        bold = re.findall(r"\*\*(.+?)\*\*", row)
        if not row.startswith("|") or len(targets) != 1 or not bold:
            continue
        source = (page.parent / targets.pop()).resolve().read_text()
        checked += 1
        missing += [
            f"{n} ({row[:60]}…)" for b in bold for n in NUMBER.findall(b) if n not in source
        ]
    return checked, missing


@pytest.mark.parametrize(("page", "rows"), [("README.md", 8), ("docs/benchmarks.md", 14)])
def test_quoted_headline_figures_are_in_the_benchmark_files_they_link(page, rows):
    checked, missing = missing_figures(ROOT / page)
    assert checked >= rows
    assert not missing


def test_a_figure_missing_from_its_benchmark_file_is_caught(tmp_path):
    page = tmp_path / "page.md"
    (tmp_path / "benchmarks").symlink_to(ROOT / "benchmarks")
    page.write_text("| speedrun | **90.74%** vs **99.99%** | [file](benchmarks/speedrun.md) |\n")
    checked, missing = missing_figures(page)
    assert checked == 1 and [m.split()[0] for m in missing] == ["99.99"]
