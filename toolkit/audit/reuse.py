"""`toolkit audit --model RUN|model.onnx`: a trained model's outputs instead of cross-validation.

A run folder gives its best.pt; a model.onnx from `toolkit export` runs in onnxruntime with
one more graph output, the input of its last Gemm/MatMul (the embedding), averaged over the
test-time augmentation views when the graph has them. The model must know the data's classes
in the data's order and take images of the audited size. It has seen its training images, so
only val and test labels are checked (summary.json says so).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from serving.preprocess import Resize
from toolkit.audit.crossval import ModelOutputs, normalise_rows
from toolkit.audit.rows import Rows
from toolkit.data.specs import parse_size, size_label
from toolkit.errors import ToolkitError, first_line
from toolkit.progress import progress_bar

ONNX_BATCH = 256


def reused_outputs(path: Path, rows: Rows, device: str) -> ModelOutputs:
    if path.is_dir():
        probs, embeddings = _run_outputs(path, rows, device)
    elif path.suffix == ".onnx" and path.is_file():
        probs, embeddings = onnx_outputs(path, rows)
    else:
        raise ToolkitError(
            f"--model '{path}' is neither a run folder nor a model.onnx file; pass a run of "
            "`toolkit train` or a model of `toolkit export`"
        )
    return ModelOutputs(probs, embeddings, train_out_of_sample=False, models=[str(path)])


def _check_classes(classes: list[str], rows: Rows, path: Path) -> None:
    if list(classes) != list(rows.classes):
        raise ToolkitError(
            f"--model '{path}' knows the classes {', '.join(classes)}, but the data has "
            f"{', '.join(rows.classes)}; audit with a model of this data"
        )


def _check_resize(resize: Resize, rows: Rows, model: Path) -> None:
    """The audit decodes the images as the model was trained to see them, or says how to."""
    if (resize.interpolation, resize.crop_fraction) != (
        rows.bundle.interpolation,
        rows.bundle.crop_fraction,
    ):
        raise ToolkitError(
            f"--model '{model}' was trained on images resized with --interpolation "
            f"{resize.interpolation} --crop-fraction {resize.crop_fraction:g}; audit with the "
            "same flags"
        )


def _run_outputs(run: Path, rows: Rows, device: str):
    from toolkit.audit.crossval import checkpoint_outputs
    from toolkit.run.checkpoint import Checkpoint

    ckpt = Checkpoint.load(run / "best.pt")
    _check_classes(ckpt.dataset["classes"], rows, run)
    size = parse_size(ckpt.dataset["image_size"])
    if size != rows.bundle.size_hw:
        raise ToolkitError(
            f"--model '{run}' was trained at {size_label(size)}px; audit at the same size "
            f"(--image-size {size_label(size)})"
        )
    _check_resize(ckpt.resize, rows, run)
    return checkpoint_outputs(ckpt, rows, device, "the given model")


def _with_embedding_output(model) -> tuple[bytes, str]:
    """The model with the input of its last Gemm/MatMul node as an extra output."""
    import onnx

    last = [n for n in model.graph.node if n.op_type in ("Gemm", "MatMul")]
    if not last:
        raise ToolkitError("the model has no Gemm/MatMul layer to take embeddings before")
    name = last[-1].input[0]
    model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return model.SerializeToString(), name


def onnx_outputs(path: Path, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    import onnx
    import onnxruntime as ort

    from serving.classifier import ArtifactError, OnnxClassifier, softmax

    try:
        classifier = OnnxClassifier(path, providers=["CPUExecutionProvider"])
        model = onnx.load(str(path))
    except ArtifactError as exc:  # it names the file and the fix
        raise ToolkitError(f"cannot use --model: {first_line(exc, 300)}") from exc
    except Exception as exc:  # a damaged protobuf, an unreadable file
        raise ToolkitError(
            f"--model '{path}' is not a readable ONNX model ({first_line(exc)})"
        ) from exc
    _check_classes(classifier.classes, rows, path)
    if tuple(classifier.input_size) != rows.bundle.size_hw:
        raise ToolkitError(
            f"--model '{path}' takes {size_label(classifier.input_size)} px images; audit at "
            f"that size (--image-size {size_label(classifier.input_size)})"
        )
    _check_resize(classifier.resize, rows, path)
    data, embedding = _with_embedding_output(model)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    # The raw logits when the graph has them, as with a checkpoint: the audit's probabilities
    # are the model's own, not the temperature-scaled ones the app shows.
    names = [o.name for o in session.get_outputs()]
    output = "logits" if "logits" in names else classifier.output_name
    probs = np.empty((len(rows), len(rows.classes)), dtype=np.float32)
    embeddings: np.ndarray | None = None
    with progress_bar(len(rows), "predicting with the given model") as bar:
        for _split, at, images, local in rows.all_images():
            for start in range(0, len(local), ONNX_BATCH):
                batch = images[local[start : start + ONNX_BATCH]].numpy().astype(np.float32) / 255
                # The image and its mirror, as with a checkpoint (toolkit.audit.crossval).
                both = np.concatenate([batch, batch[..., ::-1]])
                out, feature = session.run([output, embedding], {classifier.input_name: both})
                # A graph with test-time augmentation runs its views as one batch, view-major.
                feature = feature.reshape(-1, len(batch), *feature.shape[1:]).mean(0)
                feature = feature.reshape(len(batch), -1)
                if output == "logits":
                    out = softmax(out)
                out = out.reshape(2, len(batch), -1).mean(0)
                if embeddings is None:
                    embeddings = np.empty((len(rows), feature.shape[1]), dtype=np.float32)
                here = at[start : start + ONNX_BATCH]
                probs[here], embeddings[here] = out, feature
                bar.advance(len(here))
    return probs, normalise_rows(embeddings)
