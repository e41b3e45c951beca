"""Parity: does the ONNX model predict what the trained torch model predicts?

Both see the same tensors (the run's own test split, val when the source has none, uint8
scaled to [0, 1] exactly as a client does), so any difference is the export's, not the data's.
The data is the run's own, loaded under toolkit.run.state's policy (changed files refused).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from toolkit.data import DataBundle, Split
from toolkit.errors import ToolkitError
from toolkit.export.onnx_graph import INPUT_NAME, OUTPUT_NAMES
from toolkit.progress import progress_bar

# Below this share of identical top-1 predictions the ONNX model is not the trained model.
REQUIRED_AGREEMENT = 0.999
# The served (calibrated) probabilities may differ from torch's by float rounding only.
PROB_TOLERANCE = 1e-4


def evaluation_split(data: DataBundle) -> tuple[str, Split]:
    """The test split (held out from train when the source has none)."""
    if len(data.test) == 0:
        raise ToolkitError("the run's test split is empty; nothing to verify the export on")
    return "test", data.test


def torch_outputs(
    head: torch.nn.Module,
    images: torch.Tensor,
    threads: int,
    batch: int = 1000,
    description: str = "torch",
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probs) of the torch model for uint8 images scaled to [0, 1], as clients do."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    outs = []
    try:
        with torch.inference_mode(), progress_bar(_batches(images, batch), description) as bar:
            for i in range(0, len(images), batch):
                outs.append(head(images[i : i + batch].float().div(255)))
                bar.advance(1)
    finally:
        torch.set_num_threads(previous)
    return torch.cat([o[0] for o in outs]).numpy(), torch.cat([o[1] for o in outs]).numpy()


def onnx_outputs(
    session: ort.InferenceSession,
    images: torch.Tensor,
    batch: int = 500,
    description: str = "onnxruntime",
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, probs) of an onnxruntime session on the same [0, 1] inputs."""
    logits, probs = [], []
    with progress_bar(_batches(images, batch), description) as bar:
        for i in range(0, len(images), batch):
            x = images[i : i + batch].float().div(255).numpy()
            out = session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            logits.append(np.asarray(out[0], dtype=np.float32))
            probs.append(np.asarray(out[1], dtype=np.float32))
            bar.advance(1)
    return np.concatenate(logits), np.concatenate(probs)


def _batches(images: torch.Tensor, batch: int) -> int:
    return -(-len(images) // batch)


def compare(
    reference: tuple[np.ndarray, np.ndarray],
    candidate: tuple[np.ndarray, np.ndarray],
    labels: torch.Tensor,
) -> dict:
    """How far `candidate` (logits, probs) is from `reference`, and both accuracies."""
    (ref_logits, ref_probs), (logits, probs) = reference, candidate
    truth = labels.numpy()
    ref_top1, top1 = ref_logits.argmax(1), logits.argmax(1)
    return {
        "max_abs_logit_diff": float(np.abs(ref_logits - logits).max()),
        "max_abs_prob_diff": float(np.abs(ref_probs - probs).max()),
        "top1_agreement": float((ref_top1 == top1).mean()),
        "torch_accuracy": float((ref_top1 == truth).mean()),
        "onnx_accuracy": float((top1 == truth).mean()),
    }


def check_parity(comparison: dict, split: str, images: int) -> dict:
    """The verification record of a comparison (compare's dict plus the verdict), or a
    ToolkitError when ONNX and torch disagree on too many images, or on the probabilities."""
    agreement = comparison["top1_agreement"]
    if agreement < REQUIRED_AGREEMENT:
        raise ToolkitError(
            f"ONNX and torch agree on only {agreement:.2%} of the {images} {split} images "
            f"(max |logit diff| {comparison['max_abs_logit_diff']:.3g}; at least "
            f"{REQUIRED_AGREEMENT:.1%} is required); nothing was written. Try another "
            "--opset, or report the run's best.pt"
        )
    if comparison["max_abs_prob_diff"] > PROB_TOLERANCE:
        raise ToolkitError(
            f"ONNX and torch probabilities differ by up to {comparison['max_abs_prob_diff']:.3g} "
            f"on the {split} images (at most {PROB_TOLERANCE:g} is allowed); nothing was "
            "written. Try another --opset, or report the run's best.pt"
        )
    return {
        "split": split,
        "images": images,
        **comparison,
        "required_agreement": REQUIRED_AGREEMENT,
        "prob_tolerance": PROB_TOLERANCE,
        "passed": True,
    }
