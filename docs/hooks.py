"""MkDocs hooks: the repository's measured figures and the package exports, from their one source.

1. **Repository files in the site.** `benchmarks/` (the measured figures: Markdown tables,
   JSON, CSV, plots), `artifacts/` (the shipped models' README, evaluation plots and failure
   images; no model.onnx) and `deploy/` (the example manifests) are added to the site at the
   same paths, read from where they live; nothing is copied into docs/. A docs page links
   them as it would on GitHub, `../benchmarks/speedrun.md`, and the link is rewritten to the
   site's copy, so `mkdocs build --strict` checks it like a link between pages: a renamed or
   deleted benchmark file fails the build.
2. **Package exports.** A line `<!-- exports toolkit.data -->` in a page becomes one
   mkdocstrings block per name the package's `__init__` exports (its lazy `EXPORTS` table, or
   `__all__` and the imports it re-exports), under the name callers import it by. The table is
   read with `ast`, so building the docs imports neither torch nor the toolkit.
"""

from __future__ import annotations

import ast
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parents[1]
# Repository folders served at the same path in the site, and the files of each that go.
MIRRORED = {
    "benchmarks": {".md", ".json", ".csv", ".txt", ".png"},
    "artifacts": {".md", ".json", ".png"},
    "deploy": {".yaml"},
}
EXPORTS_LINE = re.compile(r"^<!-- exports (?P<package>[\w.]+) -->$", re.M)
# A Markdown link or image target that climbs out of docs/: ](../benchmarks/x.md#anchor)
REPO_LINK = re.compile(r"\]\((?P<target>(?:\.\./)+[^)\s#]+)(?P<anchor>#[^)\s]*)?\)")


def on_files(files: Files, config) -> Files:
    for folder, suffixes in MIRRORED.items():
        for path in sorted((ROOT / folder).rglob("*")):
            if path.is_file() and path.suffix in suffixes and "__pycache__" not in path.parts:
                uri = path.relative_to(ROOT).as_posix()
                # Listed in the nav where the nav names them; reachable by link otherwise.
                where = {"abs_src_path": str(path), "inclusion": InclusionLevel.NOT_IN_NAV}
                files.append(File.generated(config, uri, **where))
    return files


def repo_links(markdown: str, page_uri: str) -> str:
    """`../benchmarks/x.md` in docs/<page_uri> -> the relative link to the site's copy."""
    page_dir = posixpath.dirname(page_uri)

    def rewrite(match: re.Match) -> str:
        in_repo = posixpath.normpath(posixpath.join("docs", page_dir, match["target"]))
        if in_repo.split("/")[0] not in MIRRORED:
            return match[0]  # left as written: strict mode reports it as unrecognised
        target = posixpath.relpath(in_repo, page_dir or ".")
        return f"]({target}{match['anchor'] or ''})"

    return REPO_LINK.sub(rewrite, markdown)


def exported_names(package: str) -> dict[str, str]:
    """{public name: the module that defines it} for a toolkit package, read from its source."""
    init = ROOT.joinpath(*package.split(".")) / "__init__.py"
    tree = ast.parse(init.read_text())
    lazy: dict[str, str] = {}  # the EXPORTS table: the package's public names, all of them
    imported: dict[str, str] = {}  # names imported by __init__, public where __all__ says so
    public: list[str] = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id == "EXPORTS":
                for module, names in ast.literal_eval(node.value).items():
                    lazy.update({name: f"{package}.{module}" for name in names})
            elif node.targets[0].id == "__all__":
                public = ast.literal_eval(node.value)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.update({alias.name: node.module for alias in node.names})
    where, names = (lazy, list(lazy)) if lazy else (imported, public)
    missing = [n for n in names if n not in where]
    if not names or missing:
        raise ValueError(f"{init}: cannot tell where {missing or 'its exports'} come from")
    return {name: where[name] for name in sorted(names, key=str.lower)}


def exports_block(package: str) -> str:
    blocks = []
    for name, module in exported_names(package).items():
        blocks.append(
            f"::: {module}.{name}\n"
            f"    options:\n"
            f'      heading: "{package}.{name}"\n'
            f'      toc_label: "{name}"\n'
        )
    return "\n".join(blocks)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri.split("/")[0] not in MIRRORED:  # a mirrored file's links already fit
        markdown = repo_links(markdown, page.file.src_uri)
    return EXPORTS_LINE.sub(lambda m: exports_block(m["package"]), markdown)
