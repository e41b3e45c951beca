"""The artifacts folder the app serves, read and checked once at startup.

    artifacts/<dataset>-<model>/
        model.onnx  model.json  export-report.json  metrics.json  confusion_matrix.png
        reliability_diagram.png (packaged since the models are calibrated; optional)
        failures.json  failures/<index>.png
    artifacts/examples/<dataset>/<class>_<n>.png          (optional)

toolkit/package.py writes exactly this layout. Every model folder must be complete: a missing
or unreadable file stops the server with an ArtifactError naming it, rather than serving a
model whose card, gallery or predictions would be silently wrong or absent.
"""

from __future__ import annotations

import json
import logging
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from serving.classifier import ArtifactError, OnnxClassifier

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
EXAMPLE_SUFFIXES = {".png", ".jpg", ".jpeg"}
# Whatever model.json says must agree with the ONNX metadata serving actually uses.
CROSS_CHECKED = ("dataset", "model", "classes", "input_size")


@dataclass(frozen=True)
class Failure:
    """One known mistake of a model on its test split (from `toolkit evaluate`)."""

    index: int
    true: str
    predicted: str
    confidence: float
    path: Path
    # The class a data audit suggests when it doubts the given label (toolkit audit): the
    # model may be right and the label wrong.
    label_doubt: str | None = None

    @property
    def caption(self) -> str:
        text = f"{self.true} → {self.predicted} ({self.confidence:.0%})"
        if self.label_doubt:
            text += f" · label likely wrong — the audit suggests {self.label_doubt}"
        return text


@dataclass
class ServedModel:
    """One artifacts/<dataset>-<model>/ folder: the classifier plus what its card shows."""

    key: str
    folder: Path
    classifier: OnnxClassifier
    info: dict[str, Any]
    metrics: dict[str, Any]
    report: dict[str, Any]
    failures: list[Failure]
    confusion_matrix: Path
    reliability_diagram: Path | None  # models packaged before calibration have none
    size_bytes: int

    @property
    def dataset(self) -> str:
        return str(self.info["dataset"])

    @property
    def model(self) -> str:
        return str(self.info["model"])

    @property
    def test_accuracy(self) -> float | None:
        """The served graph's own figure (the export's: with its TTA views, or the INT8
        model's), else the packaged evaluation's plain one."""
        value = self.info.get("test_accuracy")
        if not isinstance(value, (int, float)):
            value = self.metrics.get("accuracy")
        return float(value) if isinstance(value, (int, float)) else None

    @property
    def precision(self) -> str:
        """ "fp32", or what the file was converted to ("int8": model.json says so)."""
        return str(self.info.get("precision") or "fp32")

    @property
    def label(self) -> str:
        """How the model picker lists it: dataset, model, test accuracy, size."""
        accuracy = "n/a" if self.test_accuracy is None else f"{self.test_accuracy:.1%}"
        model = self.model + ("" if self.precision == "fp32" else f" {self.precision}")
        return f"{self.dataset} · {model} · test acc {accuracy} · {self.size_bytes / 1e6:.2f} MB"


@dataclass
class Catalog:
    """Every servable model, best first, and the example images per dataset."""

    root: Path
    models: dict[str, ServedModel]
    examples: dict[str, list[Path]] = field(default_factory=dict)

    @property
    def default(self) -> str:
        """The most accurate fp32 model (models are sorted best first). A converted twin
        (INT8) is shipped for speed: its accuracy differs from its source's by noise, so it
        never becomes the default over it."""
        full = [key for key, m in self.models.items() if m.precision == "fp32"]
        return (full or list(self.models))[0]

    def get(self, key: str | None) -> ServedModel:
        """The model named `key` (None or "" -> the default); KeyError lists the valid ones."""
        key = key or self.default
        if key not in self.models:
            raise KeyError(f"unknown model '{key}'; choose one of: {', '.join(self.models)}")
        return self.models[key]

    def servable_paths(self) -> list[str]:
        """The only files the web server may hand out: images shown in the UI, nothing else."""
        paths = [str(m.confusion_matrix) for m in self.models.values()]
        paths += [str(m.reliability_diagram) for m in self.models.values() if m.reliability_diagram]
        paths += [str(f.path) for m in self.models.values() for f in m.failures]
        paths += [str(p) for images in self.examples.values() for p in images]
        return paths


# --- reading ---------------------------------------------------------------------------------


def load_catalog(root: str | Path, providers: list[str] | None = None) -> Catalog:
    """Read and check every model folder under `root`; ArtifactError names any bad file."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise ArtifactError(
            f"artifacts folder '{root}' not found; build it with `make artifacts` or pass "
            "--artifacts DIR"
        )
    folders = sorted(
        p for p in root.iterdir() if p.is_dir() and p.name != EXAMPLES_DIR and not _hidden(p)
    )
    if not folders:
        raise ArtifactError(
            f"no models in '{root}' (expected <dataset>-<model>/model.onnx folders); build "
            "them with `make artifacts`, or `toolkit evaluate RUN`, `toolkit export RUN` and "
            "package the run"
        )
    models = []
    for folder in folders:
        model = load_model(folder, providers)
        problem = unreproduced_failures(model)
        if problem:  # e.g. an INT8 model on a CPU whose integer kernels differ (no VNNI)
            log.warning("not serving %s: %s", model.key, problem)
            continue
        models.append(model)
    if not models:
        raise ArtifactError(f"no model in '{root}' gives its recorded answers on this machine")
    models.sort(key=lambda m: (-(m.test_accuracy or 0.0), m.key))
    examples = load_examples(root / EXAMPLES_DIR)
    log.info("serving %d model(s) from %s: %s", len(models), root, [m.key for m in models])
    return Catalog(root, {m.key: m for m in models}, examples)


def unreproduced_failures(model: ServedModel) -> str | None:
    """Why the model does not give its recorded answers here, or None when it does.

    The known failures are the evaluation's most confident mistakes, far from any tie: a
    model that answers one of them differently on this machine computes something else than
    what was evaluated (measured: the shipped INT8 speedrun on an AVX2 CPU without VNNI
    scored 43.7 % instead of 90.4 %, and 6 of its 20 known failures changed), so it is not
    served."""
    if not model.failures:
        return None
    with ExitStack() as stack:
        images = [stack.enter_context(Image.open(f.path)) for f in model.failures]
        probs = model.classifier.predict(images)
    answers = [model.classifier.classes[i] for i in probs.argmax(1)]
    changed = sum(a != f.predicted for a, f in zip(answers, model.failures, strict=True))
    if not changed:
        return None
    return (
        f"{changed} of its {len(model.failures)} recorded predictions (the known failures) "
        "change on this machine, so it would not answer as it was evaluated"
    )


def load_model(folder: Path, providers: list[str] | None = None) -> ServedModel:
    """One model folder -> ServedModel, every file checked."""
    # Served: requests arrive one image at a time, with HTTP work in between (see spin_wait).
    classifier = OnnxClassifier(_required(folder / "model.onnx"), providers, spin_wait=False)
    info = read_json_object(folder / "model.json")
    for key in CROSS_CHECKED:
        if info.get(key) != classifier.metadata.get(key):
            raise ArtifactError(
                f"'{folder / 'model.json'}' says {key}={info.get(key)!r} but "
                f"'{classifier.path}' says {classifier.metadata.get(key)!r}; package the run again"
            )
    metrics = read_json_object(folder / "metrics.json")
    if not isinstance(metrics.get("accuracy"), (int, float)):
        raise ArtifactError(f"'{folder / 'metrics.json'}' has no numeric 'accuracy'")
    return ServedModel(
        key=folder.name,
        folder=folder,
        classifier=classifier,
        info=info,
        metrics=metrics,
        report=read_json_object(folder / "export-report.json"),
        failures=load_failures(folder),
        confusion_matrix=check_image(folder / "confusion_matrix.png", inside=folder),
        reliability_diagram=_optional_image(folder / "reliability_diagram.png", folder),
        size_bytes=classifier.path.stat().st_size,
    )


def load_failures(folder: Path) -> list[Failure]:
    """failures.json entries whose images exist inside the folder."""
    path = folder / "failures.json"
    entries = read_json(path)
    if not isinstance(entries, list):
        raise ArtifactError(f"'{path}' is not a list of failure entries")
    failures = []
    for n, entry in enumerate(entries):
        try:
            image = (folder / entry["file"]).resolve()
            failure = Failure(
                int(entry["index"]),
                str(entry["true"]),
                str(entry["predicted"]),
                float(entry["confidence"]),
                image,
                _label_doubt(entry),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"'{path}' entry {n} is malformed ({exc!r})") from exc
        # A crafted "../../etc/x" must not turn into a servable path.
        if not image.is_relative_to(folder.resolve()):
            raise ArtifactError(f"'{path}' entry {n} points outside '{folder}'")
        failures.append(failure)
    for failure in failures:
        check_image(failure.path, inside=folder)
    return failures


def _label_doubt(entry: dict) -> str | None:
    doubt = entry.get("label_doubt")
    if doubt is None:
        return None
    return str(doubt["suggested"])


def load_examples(folder: Path) -> dict[str, list[Path]]:
    """examples/<dataset>/*.png -> {dataset: [paths]}; the folder itself is optional."""
    if not folder.is_dir():
        log.info("no example images at %s", folder)
        return {}
    out = {}
    for dataset in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = sorted(p for p in dataset.iterdir() if p.suffix.lower() in EXAMPLE_SUFFIXES)
        out[dataset.name] = [check_image(p, inside=folder) for p in images]
    return out


def example_caption(path: Path) -> str:
    """examples/<dataset>/<class>_<n>.png -> "<class>"."""
    return path.stem.rsplit("_", 1)[0]


# --- small checked readers -------------------------------------------------------------------


def _optional_image(path: Path, inside: Path) -> Path | None:
    return check_image(path, inside) if path.exists() or path.is_symlink() else None


def _hidden(path: Path) -> bool:
    # package_run fills a hidden ".<name>.*.tmp" folder before swapping it in (atomic_folder).
    return path.name.startswith(".")


def _required(path: Path) -> Path:
    if not path.is_file():
        raise ArtifactError(f"'{path}' is missing; package the run again")
    return path


def read_json(path: Path) -> Any:
    try:
        return json.loads(_required(path).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"'{path}' is not valid JSON ({exc})") from exc


def read_json_object(path: Path) -> dict[str, Any]:
    value = read_json(path)
    if not isinstance(value, dict):
        raise ArtifactError(f"'{path}' should hold a JSON object, not {type(value).__name__}")
    return value


def check_image(path: Path, inside: Path) -> Path:
    """`path` resolved, after checking it is a readable image (the UI will show it) that
    really lives under `inside`.

    Every image checked here becomes a servable path, and Gradio serves the file a symlink
    points to: a link to a file outside the artifacts would publish it.
    """
    resolved = path.resolve()
    if not resolved.is_relative_to(inside.resolve()):
        raise ArtifactError(
            f"'{path}' points outside '{inside}' (to '{resolved}'); copy the file in instead "
            "of linking it"
        )
    try:
        with Image.open(_required(path)) as image:
            image.verify()
    except ArtifactError:
        raise
    except Exception as exc:  # Pillow raises many types for damaged files
        raise ArtifactError(f"'{path}' is not a readable image ({exc})") from exc
    return resolved
