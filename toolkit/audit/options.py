"""The audit's own options, declared once (toolkit.options): the CLI's flags come from here.

The defaults are what benchmarks/audit.md measured on the real CIFAR-10 with planted errors,
on a 2-core CPU: the cross-validated models, and the near-duplicate similarity threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ToolkitError
from toolkit.options import option

# Cross-validation: 4 folds of a narrow speedrun net (width 16: 127k parameters), 8 epochs at
# batch 512, each image scored with its mirror. On a 2-core AVX2 CPU (no bf16) each fold
# model trains in about 4 minutes and the audit of CIFAR-10's 60,000 images takes about 23
# (benchmarks/audit.md). Near-duplicates: the highest pixel-correlation threshold that lost
# none of the planted near-duplicates (0.92; recall first drops at 0.94).
CV_MODEL = "speedrun"
CV_WIDTH = 16
CV_BATCH = 512
NEAR_DUPLICATE_CORRELATION = 0.92


@dataclass(frozen=True)
class AuditOptions:
    out: str | None = option(None, "Audit folder (default audits/<dataset>-<time>).", path=True)
    model: str | None = option(
        None,
        "Reuse a trained model instead of cross-validating: a run folder (its best.pt) or a "
        "model.onnx. It gives the embeddings and the val/test probabilities; train labels "
        "are then not checked (the model has seen them).",
        path=True,
    )
    cv_model: str = option(CV_MODEL, "The toolkit model each fold trains (toolkit models).")
    width: int = option(CV_WIDTH, "Width of the fold models, where the model has one.")
    folds: int = option(
        4,
        "Cross-validation folds (each image's probabilities come from "
        "the model that did not train on its fold).",
    )
    epochs: int = option(8, "Epochs each fold model trains.")
    batch_size: int = option(CV_BATCH, "Batch size of the fold models.")
    near_threshold: float = option(
        NEAR_DUPLICATE_CORRELATION,
        "Pixel correlation (after aligning by up to 2 px) at or above which two images that "
        "the models also see as alike are near-duplicates.",
    )
    seed: int = option(0, "Seed of the folds and the fold models.")
    write_splits: str | None = option(
        None,
        "Also write train.txt/val.txt/test.txt/classes.txt here without the flagged images "
        "(for `toolkit train --splits`); no file of yours is moved or deleted.",
        path=True,
    )
    device: str = option("auto", "auto, cpu or cuda.")

    def __post_init__(self):
        if self.folds < 2:
            raise ToolkitError(f"--folds must be at least 2, got {self.folds}")
        if self.epochs < 1:
            raise ToolkitError(f"--epochs must be at least 1, got {self.epochs}")
        if not 0.0 < self.near_threshold <= 1.0:
            raise ToolkitError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")
