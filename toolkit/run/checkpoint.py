"""The checkpoint: one type that builds, validates, saves and loads best.pt and last.pt.

On disk a checkpoint is a versioned plain dict of tensors, numbers, strings, lists and
dicts, so it loads with ``torch.load(weights_only=True)`` (no code runs) and rebuilds its
model with no other input:

    {
      "format": "toolkit-checkpoint", "format_version": 1, "toolkit_version": "0.1.0",
      "model":   {"name", "options", "num_classes", "input_size", "in_channels"},
      "dataset": {"name", "classes", "mean", "std", "image_size", "source", "fingerprint",
                  "skipped_count", "skipped_files"},                  (DataBundle.info())
      "config":  the resolved training config (config.json's TrainConfig part),
      "epoch": int (1-based, the last finished), "metrics": that epoch's metrics row,
      "best_val_acc": float, "best_epoch": int, "history": every epoch's metrics row so far,
      "state_dict": the plain model's weights (no DDP wrapper; not normalised),
      "optimizer", "scheduler": their state dicts, "scaler": the fp16 loss scaler's, or None,
    }

Every epoch writes one such checkpoint to last.pt, and the same bytes to best.pt when the
epoch is the best so far, so best.pt can be resumed from as well as evaluated.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from serving.preprocess import Resize
from toolkit.data.specs import parse_size
from toolkit.errors import ToolkitError, error_summary
from toolkit.models import NormalizedClassifier, create_model
from toolkit.version import __version__

FORMAT = "toolkit-checkpoint"
VERSION = 1
# The keys of the "model" and "dataset" sections that rebuilding and evaluating rely on.
MODEL_KEYS = ("name", "options", "num_classes", "input_size", "in_channels")
DATASET_KEYS = ("name", "classes", "mean", "std", "image_size", "fingerprint")


@dataclass(frozen=True)
class Checkpoint:
    """A training state at the end of an epoch: enough to evaluate, export or resume it."""

    model: dict
    dataset: dict
    config: dict
    epoch: int
    metrics: dict
    best_val_acc: float
    best_epoch: int
    history: list
    state_dict: dict
    optimizer: dict
    scheduler: dict
    scaler: dict | None = None
    toolkit_version: str = __version__

    @property
    def resize(self) -> Resize:
        """How its images were resized; checkpoints from before pretrained preprocessing used
        the defaults."""
        ds = self.dataset
        return Resize(
            parse_size(ds["image_size"]),
            ds.get("interpolation", "bilinear"),
            ds.get("crop_fraction", 1.0),
        )

    @property
    def fingerprint(self) -> str:
        """The content fingerprint of the data this model was trained on."""
        return self.dataset["fingerprint"]

    # --- bytes on disk -------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self._as_dict(), buffer)
        return buffer.getvalue()

    def _as_dict(self) -> dict:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {"format": FORMAT, "format_version": VERSION, **fields}

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        """Load and check `path`; anything but a toolkit checkpoint is one clear ToolkitError.

        weights_only: tensors, numbers, strings, lists and dicts only, so a file that is not a
        checkpoint (a foreign or malicious pickle) fails here without running any of its code.
        """
        path = Path(path)
        if not path.is_file():
            raise ToolkitError(f"checkpoint '{path}' not found; has this run finished an epoch?")
        try:
            with warnings.catch_warnings():  # torch's note on a foreign pickle's protocol: noise
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated file, random bytes, a foreign or malicious pickle
            raise ToolkitError(
                f"'{path}' is not a readable toolkit checkpoint ({_unreadable_reason(path, exc)})"
            ) from exc
        return cls.from_dict(raw, path)

    @classmethod
    def from_dict(cls, raw: Any, path: Path) -> Checkpoint:
        """The checkpoint a loaded dict holds, after checking its tag, version and fields."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ToolkitError(f"'{path}' is not a toolkit checkpoint (no '{FORMAT}' tag)")
        version = raw.get("format_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ToolkitError(f"'{path}' has no valid checkpoint format version ({version!r})")
        if version > VERSION:
            raise ToolkitError(
                f"'{path}' was written by toolkit {raw.get('toolkit_version')} with checkpoint "
                f"format {version}; this toolkit ({__version__}) reads up to {VERSION}. "
                "Upgrade the toolkit."
            )
        problems = [name for name, ok in _field_checks(raw).items() if not ok]
        if problems:
            raise ToolkitError(
                f"'{path}' is a damaged toolkit checkpoint (no valid {', '.join(problems)})"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    # --- the model it holds --------------------------------------------------------------

    def build_net(self) -> nn.Module:
        """The (un-normalised) network with these weights, in eval mode."""
        info = self.model
        net = create_model(
            info["name"],
            num_classes=info["num_classes"],
            input_size=info["input_size"],
            in_channels=info["in_channels"],
            **info["options"],
        )
        try:
            net.load_state_dict(self.state_dict)
        except RuntimeError as exc:
            raise ToolkitError(
                f"checkpoint weights do not fit model '{info['name']}' {info['options']}: "
                f"{error_summary(exc)}"
            ) from exc
        return net.eval()

    def build_classifier(self) -> nn.Module:
        """The network with normalisation in front: RGB in [0, 1] in, logits out."""
        return NormalizedClassifier(self.build_net(), self.dataset["mean"], self.dataset["std"])


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _has(section: Any, keys: tuple[str, ...]) -> bool:
    return isinstance(section, dict) and all(k in section for k in keys)


def _field_checks(raw: dict) -> dict[str, bool]:
    """Each field a checkpoint must hold, and whether `raw` holds it in a usable form."""
    return {
        "model": _has(raw.get("model"), MODEL_KEYS),
        "dataset": _has(raw.get("dataset"), DATASET_KEYS),
        "config": isinstance(raw.get("config"), dict),
        "epoch": isinstance(raw.get("epoch"), int),
        "metrics": isinstance(raw.get("metrics"), dict),
        "best_val_acc": _is_number(raw.get("best_val_acc")),
        "best_epoch": isinstance(raw.get("best_epoch"), int),
        "history": isinstance(raw.get("history"), list),
        "state_dict": isinstance(raw.get("state_dict"), dict),
        "optimizer": isinstance(raw.get("optimizer"), dict),
        "scheduler": isinstance(raw.get("scheduler"), dict),
        "scaler": raw.get("scaler") is None or isinstance(raw.get("scaler"), dict),
    }


def _unreadable_reason(path: Path, exc: Exception) -> str:
    if path.stat().st_size == 0:
        return "the file is empty"
    if isinstance(exc, pickle.UnpicklingError):  # what weights_only refused to unpickle
        code = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if code:
            return f"it calls Python code ({code.group(1)}); refused without running it"
        return "not a torch checkpoint file, or a damaged one; nothing in it was run"
    return error_summary(exc)
