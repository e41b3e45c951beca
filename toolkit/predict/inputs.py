"""What `toolkit predict` classifies, and with which model.

Files are taken as given; folders (recursively) and glob patterns contribute the files named
like images (toolkit.data's IMAGE_SUFFIXES), hidden and system files left out, as in a class
folder. The model is an artifacts folder, a run's export or a .onnx file, read by serving's
OnnxClassifier, so its class names and preprocessing come from its own metadata.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from glob import glob
from pathlib import Path

from serving.catalog import load_catalog
from serving.classifier import ArtifactError, OnnxClassifier
from toolkit.data.listing import IMAGE_SUFFIXES, SYSTEM_FILES
from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)

DEFAULT_ARTIFACTS = Path("artifacts")
# A folder holding one of these (and no export/model.onnx) is a run that was not exported.
RUN_FILES = ("config.json", "best.pt", "last.pt")
GLOB_CHARACTERS = "*?["


# --- what to classify ------------------------------------------------------------------------


def list_sources(sources: Sequence[str | Path]) -> list[Path]:
    """The image files that `sources` name, in order, each once.

    A file is taken as given (and refused later if it is no image); folders (recursively)
    and glob patterns contribute the files named like images (IMAGE_SUFFIXES), hidden and
    system files left out. A source that contributes nothing is an error: it is a typo more
    often than a wish.
    """
    if not sources:
        raise ToolkitError(
            "name the images to classify: files, folders or glob patterns, "
            "e.g. `toolkit predict photos/`"
        )
    paths, seen = [], set()
    for source in sources:
        for path in _expand(str(source)):
            key = os.path.abspath(path)
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def _expand(source: str) -> list[Path]:
    path = Path(source)
    if path.is_dir():
        found = _images_under(path)
        if not found:
            raise ToolkitError(f"'{source}' holds no image files ({_suffixes()}); {_sources_fix()}")
        return found
    if path.exists() or path.is_symlink():
        return [path]
    if not any(c in source for c in GLOB_CHARACTERS):
        raise ToolkitError(f"'{source}' does not exist; {_sources_fix()}")
    found = []
    for match in sorted(glob(source, recursive=True)):
        match = Path(match)
        if match.is_dir():
            found += _images_under(match)
        elif _is_image_name(match.name):
            found.append(match)
    if not found:
        raise ToolkitError(
            f"the pattern '{source}' matches no image file ({_suffixes()}); check it, and "
            "quote it so that the shell passes it on as it is"
        )
    return found


def _images_under(folder: Path) -> list[Path]:
    found = []
    for here, folders, files in os.walk(folder):
        folders[:] = sorted(f for f in folders if not _is_system(f))
        found += [Path(here, name) for name in sorted(files) if _is_image_name(name)]
    return found


def _is_system(name: str) -> bool:
    return name.startswith(".") or name.lower() in SYSTEM_FILES


def _is_image_name(name: str) -> bool:
    return not _is_system(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES


def _suffixes() -> str:
    return ", ".join(sorted(IMAGE_SUFFIXES))


def _sources_fix() -> str:
    return "give image files, folders or glob patterns"


# --- which model -----------------------------------------------------------------------------


def load_model(
    model: str | Path | None = None, artifacts: Path = DEFAULT_ARTIFACTS
) -> OnnxClassifier:
    """The classifier `model` names: an artifacts folder or its name, a run folder (its
    export/model.onnx) or a .onnx file; None: the most accurate model under `artifacts`
    (serving's catalog picks it, as the app picks its default)."""
    if model is None:
        return _default_model(Path(artifacts))
    path = Path(model)
    if not path.exists() and (Path(artifacts) / path / "model.onnx").is_file():
        path = Path(artifacts) / path  # `--model cifar10-resnet10`
    if path.is_dir():
        path = _model_in_folder(path)
    elif not path.exists():
        raise ToolkitError(
            f"--model '{model}' not found; pass artifacts/NAME, a run folder or a model.onnx"
        )
    try:
        return OnnxClassifier(path)
    except ArtifactError as exc:
        raise ToolkitError(f"--model: {exc}") from None


def _model_in_folder(folder: Path) -> Path:
    for candidate in (folder / "model.onnx", folder / "export" / "model.onnx"):
        if candidate.is_file():
            return candidate
    if any((folder / name).exists() for name in RUN_FILES):
        raise ToolkitError(
            f"run '{folder}' has no exported model; run `toolkit export {folder}` first"
        )
    raise ToolkitError(
        f"--model '{folder}' holds no model.onnx; pass artifacts/NAME, a run folder or a model.onnx"
    )


def _default_model(artifacts: Path) -> OnnxClassifier:
    if not artifacts.is_dir():
        raise ToolkitError(
            f"no --model given and no '{artifacts}' folder of shipped models here; pass "
            "--model artifacts/NAME, a run folder or a model.onnx"
        )
    try:
        catalog = load_catalog(artifacts)
    except ArtifactError as exc:
        raise ToolkitError(f"{exc} (or pass --model)") from None
    chosen = catalog.get(None)
    log.debug("model: %s (the most accurate under %s)", chosen.key, artifacts)
    return chosen.classifier


def true_labels(paths: Sequence[Path], classes: Sequence[str]) -> list[str | None]:
    """Each file's parent folder name when all of them are class names, else all None."""
    names = [path.absolute().parent.name for path in paths]
    known = set(classes)
    return names if names and all(name in known for name in names) else [None] * len(paths)
