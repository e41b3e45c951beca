"""`toolkit predict`: classify image files (files, folders, globs) with an exported ONNX
model, onnxruntime only, so it runs in the torch-free demo install.

    from toolkit.predict import predict
    rows = predict(["photos/"], model="artifacts/cifar10-resnet10", top_k=3)
"""

from toolkit.lazy import lazy_exports

EXPORTS = {
    "classify": ("DEFAULT_BATCH_SIZE", "Prediction", "accuracy", "default_workers", "predict"),
    "inputs": ("list_sources", "load_model", "true_labels"),
    "output": ("OUTPUT_SUFFIXES", "check_output", "format_row", "summary", "write_predictions"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, EXPORTS)
