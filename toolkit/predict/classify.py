"""Classifying image files in batches (`toolkit predict`), onnxruntime only.

    files ─► decoded by a thread pool with the app's upload checks (serving.uploads) and the
    one preprocessing (serving.preprocess) ─► OnnxClassifier batches ─► [Prediction]

A file that cannot be classified (empty, not an image, truncated, a decompression bomb) is
not an error: it comes back as a Prediction with `error` set, so one bad file never stops a
run over thousands.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console

from serving.classifier import OnnxClassifier
from serving.preprocess import Resize, prepare
from serving.uploads import ImageError, open_upload
from toolkit import seams
from toolkit.errors import ToolkitError, first_line
from toolkit.predict.inputs import list_sources, load_model, true_labels
from toolkit.progress import progress_bar

DEFAULT_BATCH_SIZE = 256
# Read into memory whole before decoding: no image under serving's 50-megapixel limit needs
# more (an uncompressed 50 MP RGBA file is 200 MB), and a 2 GB file named .png is refused.
MAX_FILE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Prediction:
    """One image file: its top classes with probabilities, or why it was skipped."""

    path: Path
    top: tuple[tuple[str, float], ...] = ()  # (label, probability), most likely first
    true: str | None = None  # the parent folder's name, in a class-folder tree
    rank: int | None = None  # where the true label ranks among all classes (1 = top-1)
    error: str | None = None  # why the file was skipped; then `top` is empty

    @property
    def ok(self) -> bool:
        return self.error is None


def predict(
    sources: Sequence[str | Path],
    model: str | Path | OnnxClassifier | None = None,
    top_k: int = 5,
    batch_size: int = DEFAULT_BATCH_SIZE,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> list[Prediction]:
    """Classify every image file `sources` name (see list_sources); one Prediction per file.

    `model` as load_model takes it (or a loaded classifier); top_k is capped at the model's
    class count. Files are decoded by `workers` threads (default_workers()) while the
    previous batch runs in onnxruntime. `progress` draws a bar on stderr.
    """
    if top_k < 1:
        raise ToolkitError(f"--top-k must be 1 or more (got {top_k})")
    if batch_size < 1:
        raise ToolkitError(f"--batch-size must be 1 or more (got {batch_size})")
    paths = list_sources(sources)
    classifier = model if isinstance(model, OnnxClassifier) else load_model(model)
    k = min(top_k, len(classifier.classes))
    truths = true_labels(paths, classifier.classes)
    chunks = [paths[start : start + batch_size] for start in range(0, len(paths), batch_size)]
    decode = _Decoder(classifier.resize)
    out: list[Prediction] = []
    skipped = 0
    no_probs = np.empty((0, len(classifier.classes)), np.float32)
    with (
        contextlib.closing(_prefetched(decode, chunks, workers)) as decoded,
        progress_bar(len(paths), "predict", enabled=progress, console=Console(stderr=True)) as bar,
    ):
        for chunk, (images, errors) in zip(chunks, decoded, strict=True):
            probs = classifier.predict_arrays(images) if len(images) else no_probs
            truth = truths[len(out) : len(out) + len(chunk)]
            out += _predictions(chunk, errors, probs, truth, classifier.classes, k)
            skipped += sum(error is not None for error in errors)
            bar.advance(len(chunk), status=f"{skipped} skipped" if skipped else "")
            seams.PREDICT_BATCH(done=len(out), total=len(paths))
    return out


class _Decoder:
    """A batch of files -> (N×H×W×3 uint8 of the good ones, each file's error or None)."""

    def __init__(self, resize: Resize):
        self.resize = resize

    def __call__(self, paths: Sequence[Path]) -> tuple[np.ndarray, list[str | None]]:
        images, errors = [], []
        for path in paths:
            result = self.one(path)
            if isinstance(result, str):
                errors.append(result)
            else:
                errors.append(None)
                images.append(result)
        shape = (0, *self.resize.size, 3)
        return (np.stack(images) if images else np.empty(shape, np.uint8)), errors

    def one(self, path: Path) -> np.ndarray | str:
        try:
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):  # a FIFO or a device would block or never end
                return "is not a regular file"
            if info.st_size > MAX_FILE_BYTES:
                return f"is {info.st_size / 1e6:,.0f} MB, more than any image this reads"
            return prepare(open_upload(path, name="the file"), self.resize)
        except ImageError as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot be read ({exc.strerror or first_line(exc)})"
        except Exception as exc:  # a decoder failing in a way open_upload does not foresee
            return f"could not be decoded ({first_line(exc)})"


def default_workers() -> int:
    """Decode threads: half the cores, and at least two. On 2 quiet cores one and two decode
    threads give the same 2,000-2,600 CIFAR-10 images/s within run-to-run noise (benchmarks/
    predict_speed.md); two keep one decoding in Pillow, which releases the GIL, while the
    other is in Python. Large photos gain from more (`workers=`).
    """
    return max(2, (os.cpu_count() or 1) // 2)


def _prefetched(decode: Callable, chunks: list, workers: int | None) -> Iterator:
    """decode(chunk) for each chunk, in order, computed ahead by a thread pool.

    Pillow releases the GIL while it decodes and onnxruntime while it runs, so the threads
    decode the next batches while the caller runs this one. At most workers + 1 batches are
    in flight, which bounds memory however many files there are.
    """
    workers = workers or default_workers()
    pending: deque = deque()
    todo = iter(chunks)
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        try:
            for chunk in todo:
                pending.append(pool.submit(decode, chunk))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a crash or Ctrl-C in the caller: drop the batches not yet started
            for future in pending:
                future.cancel()


def _predictions(chunk, errors, probs, truths, classes, k) -> list[Prediction]:
    """One batch's Predictions: `probs` holds a row per file whose error is None."""
    order = np.argsort(-probs, axis=1, kind="stable")
    index = {name: i for i, name in enumerate(classes)}
    out, row = [], 0
    for path, error, true in zip(chunk, errors, truths, strict=True):
        if error is not None:
            out.append(Prediction(path, true=true, error=error))
            continue
        ranked, p = order[row], probs[row]
        top = tuple((classes[i], float(p[i])) for i in ranked[:k])
        rank = None if true is None else int(np.flatnonzero(ranked == index[true])[0]) + 1
        out.append(Prediction(path, top, true, rank))
        row += 1
    return out


def accuracy(predictions: Sequence[Prediction], k: int = 1) -> float | None:
    """The share of classified images whose true label is among their top k (None when no
    image has a true label)."""
    ranks = [p.rank for p in predictions if p.ok and p.rank is not None]
    return sum(rank <= k for rank in ranks) / len(ranks) if ranks else None
