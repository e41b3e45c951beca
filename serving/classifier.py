"""OnnxClassifier: an exported model.onnx that preprocesses and classifies images by itself.

Everything the classifier needs — classes, input size, the preprocessing rules — is read from
the model's own `metadata_props` (written by toolkit's export), so serving never re-types a
constant that training decided. Only onnxruntime, numpy and Pillow are imported here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image

from serving.preprocess import Resize, prepare

log = logging.getLogger(__name__)

REQUIRED_METADATA = ("classes", "input_size", "dataset", "model", "preprocessing")
BATCH_SIZE = 256
PROVIDERS_ENV = "TOOLKIT_ORT_PROVIDERS"


class ArtifactError(RuntimeError):
    """A model file that is missing, unreadable or inconsistent; the message names the file."""


def default_providers() -> list[str]:
    """CUDA when this onnxruntime has it *and* the machine has an NVIDIA device, else CPU.

    onnxruntime-gpu lists CUDA even on machines without a GPU and then logs a loud error on
    every session; checking for the device first keeps CPU machines quiet. Set
    $TOOLKIT_ORT_PROVIDERS (comma-separated) to choose explicitly.
    """
    chosen = os.environ.get(PROVIDERS_ENV)
    if chosen:
        return [p.strip() for p in chosen.split(",") if p.strip()]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available and Path("/dev/nvidiactl").exists():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def parse_metadata(props: dict[str, str]) -> dict[str, Any]:
    """ONNX metadata values are strings: JSON where it parses, the raw string otherwise."""
    out: dict[str, Any] = {}
    for key, value in props.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


class OnnxClassifier:
    """A model.onnx from `toolkit export`: images in, class probabilities out."""

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        *,
        spin_wait: bool = True,
    ):
        """`spin_wait=False` stops onnxruntime's threads from busy-waiting for the next run
        after each one (its default, right for back-to-back batches): a server shares its
        cores with the HTTP work between runs. Measured on this 2-core machine (server CPU
        time per single-image resnet10 request over the inference API), spinning added 0.5 to
        1.2 ms to the 1.7 ms such a request costs without it."""
        self.path = Path(path)
        self.session = self._open_session(list(providers or default_providers()), spin_wait)
        self.metadata = parse_metadata(self.session.get_modelmeta().custom_metadata_map)
        self.classes: list[str] = self._check_metadata()
        height, width = self.metadata["input_size"]
        self.input_size: tuple[int, int] = (int(height), int(width))
        self.resize = self._check_preprocessing()
        # Calibration (toolkit's export): the graph's "probs" are calibrated on val (T is the
        # first step of its calibrator; metadata "calibration_method" names the rest), and
        # below the threshold a prediction is "not sure". Older models: T = 1, no threshold.
        self.temperature = float(self.metadata.get("temperature", 1.0))
        self.confidence_threshold: float | None = self.metadata.get("confidence_threshold")
        self.input_name, self.batch_limit = self._check_input()
        self.output_name = self._pick_output()
        self._check_runs()

    # --- loading -----------------------------------------------------------------------------

    def _open_session(self, providers: list[str], spin_wait: bool) -> ort.InferenceSession:
        if not self.path.is_file():
            raise ArtifactError(f"model file '{self.path}' not found")
        options = ort.SessionOptions()
        if not spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.path), options, providers=providers)
        except Exception as exc:  # truncated protobuf, foreign file, unsupported operator...
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ArtifactError(
                f"'{self.path}' is not a loadable ONNX model ({first}); "
                "export it again with `toolkit export`"
            ) from exc
        log.info("loaded %s with %s", self.path, session.get_providers())
        return session

    def _check_metadata(self) -> list[str]:
        """The classes, after checking the metadata serving relies on is there and sane."""
        meta = self.metadata
        missing = [key for key in REQUIRED_METADATA if key not in meta]
        if missing:
            raise ArtifactError(
                f"'{self.path}' lacks metadata {', '.join(missing)}; "
                "was it written by `toolkit export`?"
            )
        classes = meta["classes"]
        if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
            raise ArtifactError(f"'{self.path}': metadata 'classes' is not a list of names")
        size = meta["input_size"]
        if not (
            isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) for s in size)
        ):
            raise ArtifactError(f"'{self.path}': metadata 'input_size' is not [height, width]")
        threshold = meta.get("confidence_threshold")
        if threshold is not None and not (
            isinstance(threshold, (int, float)) and 0.0 < threshold <= 1.0
        ):
            raise ArtifactError(f"'{self.path}': metadata 'confidence_threshold' is not in (0, 1]")
        temperature = meta.get("temperature", 1.0)
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ArtifactError(f"'{self.path}': metadata 'temperature' is not a positive number")
        return classes

    def _check_preprocessing(self) -> Resize:
        """How uploads are resized for this model: the rules its metadata names, if this code
        implements them."""
        try:
            return Resize.from_rules(self.input_size, self.metadata["preprocessing"])
        except ValueError as exc:
            raise ArtifactError(f"'{self.path}' asks for {exc}") from exc

    def _check_input(self) -> tuple[str, int | None]:
        """The input's name and its fixed batch size (None when the batch is dynamic)."""
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else []
        expected = [3, *self.input_size]
        if len(shape) != 4 or [s for s in shape[1:] if isinstance(s, int)] != expected:
            raise ArtifactError(
                f"'{self.path}' takes {[i.shape for i in inputs]}, not one N×3×"
                f"{self.input_size[0]}×{self.input_size[1]} image batch as its metadata says"
            )
        batch = shape[0] if isinstance(shape[0], int) else None
        return inputs[0].name, batch

    def _check_runs(self) -> None:
        """One blank image through the graph: fails at startup, not on a user's first request,
        and warms the session so that first request is not slower than the rest."""
        height, width = self.input_size
        try:
            out = self._run(np.zeros((1, 3, height, width), dtype=np.float32))
        except Exception as exc:  # an operator failing at run time, a wrong output shape...
            raise ArtifactError(f"'{self.path}' fails on a blank image ({exc})") from exc
        if out.shape != (1, len(self.classes)):
            raise ArtifactError(
                f"'{self.path}' outputs shape {list(out.shape)} for one image but its metadata "
                f"lists {len(self.classes)} classes"
            )

    def _pick_output(self) -> str:
        names = [o.name for o in self.session.get_outputs()]
        for name in ("probs", "logits"):
            if name in names:
                return name
        return names[0]

    # --- facts -------------------------------------------------------------------------------

    @property
    def providers(self) -> list[str]:
        """The execution providers the session really uses (CUDA falls back to CPU)."""
        return self.session.get_providers()

    @property
    def name(self) -> str:
        return f"{self.metadata['dataset']}-{self.metadata['model']}"

    # --- prediction --------------------------------------------------------------------------

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """PIL image -> 3×H×W float32 in [0, 1], exactly as the training data was prepared."""
        return self.to_input(prepare(image, self.resize)[None])[0]

    @staticmethod
    def to_input(images: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 -> N×3×H×W float32 in [0, 1] (ToTensor's layout and scale)."""
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255.0

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """N×3×H×W float32 in [0, 1] -> N×classes probabilities, in chunks the model accepts."""
        step = self.batch_limit or BATCH_SIZE
        chunks = [self._run(batch[start : start + step]) for start in range(0, len(batch), step)]
        if not chunks:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        return np.concatenate(chunks)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        (out,) = self.session.run([self.output_name], {self.input_name: batch})
        return out if self.output_name == "probs" else softmax(out / self.temperature)

    def run_outputs(self, batch: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The graph's own outputs `names` for an N×3×H×W float32 batch in [0, 1], as the
        inference API returns them (logits and the calibrated probs, untouched)."""
        return dict(
            zip(names, self.session.run(list(names), {self.input_name: batch}), strict=True)
        )

    def predict_arrays(self, images: np.ndarray) -> np.ndarray:
        """N×H×W×3 uint8 images already at the input size -> N×classes probabilities."""
        return self.predict_batch(self.to_input(images))

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """PIL images of any size and mode -> N×classes probabilities."""
        if not images:
            return np.empty((0, len(self.classes)), dtype=np.float32)
        return self.predict_batch(np.stack([self.preprocess(image) for image in images]))

    def is_sure(self, probs: np.ndarray) -> bool:
        """Whether one image's top-1 probability reaches the model's confidence threshold."""
        return self.confidence_threshold is None or float(probs.max()) >= self.confidence_threshold

    def top_k(self, probs: np.ndarray, k: int = 5) -> dict[str, float]:
        """One row of probabilities -> {class: probability} for the k most likely classes."""
        order = np.argsort(-probs, kind="stable")[:k]
        return {self.classes[i]: float(probs[i]) for i in order}

    def timed_predict(self, image: Image.Image) -> tuple[np.ndarray, dict[str, float]]:
        """One image -> (probabilities, {"preprocess_ms", "model_ms"}) for the latency read-out."""
        start = time.perf_counter()
        batch = self.preprocess(image)[None]
        middle = time.perf_counter()
        probs = self.predict_batch(batch)[0]
        end = time.perf_counter()
        return probs, {"preprocess_ms": (middle - start) * 1e3, "model_ms": (end - middle) * 1e3}
