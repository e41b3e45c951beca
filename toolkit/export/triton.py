"""A Triton Inference Server model repository for an exported model.

    DIR/<name>/config.pbtxt      platform onnxruntime_onnx, dims without the batch dimension
    DIR/<name>/labels.txt        one class per line: Triton's classification extension
    DIR/<name>/1/model.onnx      version 1

``max_batch_size`` > 0 tells Triton the first dimension is the batch, so ``dims`` leave it out;
dynamic batching lets the server merge single-image requests into one batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from serving.api.oip import triton_name
from toolkit.atomic import atomic_write_bytes, atomic_write_text
from toolkit.errors import ToolkitError
from toolkit.export.onnx_graph import INPUT_NAME, OUTPUT_NAMES

log = logging.getLogger(__name__)

MAX_BATCH_SIZE = 64
# Long enough to gather a batch from concurrent clients, short next to a CNN's few ms.
MAX_QUEUE_DELAY_US = 500


def model_name(meta: dict) -> str:
    """<dataset>_<model>, the one rule the inference API also answers to (serving.api.oip)."""
    return triton_name(meta)


def config_pbtxt(name: str, meta: dict, max_batch_size: int = MAX_BATCH_SIZE) -> str:
    """The model configuration in protobuf text format (inference.ModelConfig)."""
    height, width = meta["input_size"]
    classes = len(meta["classes"])
    logits, probs = OUTPUT_NAMES
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, {height}, {width} ]
  }}
]
output [
  {{
    name: "{logits}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
  }},
  {{
    name: "{probs}"
    data_type: TYPE_FP32
    dims: [ {classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}
}}
"""


def write_triton_repo(repo: Path, model_bytes: bytes, meta: dict) -> dict:
    """Lay out (or update) DIR/<name>/ with the model as version 1; returns what was written."""
    name = model_name(meta)
    folder = Path(repo) / name
    try:
        atomic_write_bytes(folder / "1" / "model.onnx", model_bytes)
        atomic_write_text(folder / "labels.txt", "\n".join(meta["classes"]) + "\n")
        atomic_write_text(folder / "config.pbtxt", config_pbtxt(name, meta))
    except OSError as exc:
        raise ToolkitError(
            f"cannot write the Triton repository '{repo}': {exc.strerror or exc}"
        ) from exc
    log.info("Triton model repository: %s", folder)
    return {
        "repository": str(Path(repo)),
        "model_name": name,
        "config": str(folder / "config.pbtxt"),
        "model": str(folder / "1" / "model.onnx"),
        "max_batch_size": MAX_BATCH_SIZE,
    }
