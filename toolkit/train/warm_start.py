"""`--init-from RUN|best.pt`: start a run from another run's weights (fine-tuning).

Every tensor whose name and shape match is loaded, except the classifier head when the
classes differ: its rows score the source's classes, so for other classes (even as many, as
CIFAR-10 and ten digits) it starts fresh; only a run on the same class names keeps it. The
rest keep their fresh initialisation too (a wider model's convolutions). The architecture
must be the same model: loading a resnet10's tensors into a lenet5 would match nothing useful,
so that is one clear error instead of a run that silently trains from scratch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from toolkit.errors import ToolkitError
from toolkit.models.registry import head_prefix
from toolkit.run.checkpoint import Checkpoint

log = logging.getLogger(__name__)


def checkpoint_path(source: str | Path) -> Path:
    """A run folder means its best.pt (the model chosen on val); a file is itself."""
    source = Path(source)
    return source / "best.pt" if source.is_dir() else source


def load_matching_weights(
    net: nn.Module, source: str | Path, model: str, classes: list[str]
) -> dict:
    """Copy into `net` every tensor of `source`'s checkpoint with the same name and shape
    (the head only for the same `classes`); what config.json records about it."""
    path = checkpoint_path(source)
    if not path.is_file():
        raise ToolkitError(
            f"--init-from: '{path}' not found; pass a run folder (with best.pt) or a .pt file"
        )
    ckpt = Checkpoint.load(path)
    if ckpt.model["name"] != model:
        raise ToolkitError(
            f"--init-from: '{path}' is a {ckpt.model['name']} checkpoint and this run trains "
            f"{model}; pass a {model} run, or train {ckpt.model['name']}"
        )
    own = net.state_dict()
    same_classes = list(ckpt.dataset["classes"]) == list(classes)
    head = head_prefix(net)
    loaded = {
        k: v
        for k, v in ckpt.state_dict.items()
        if k in own and own[k].shape == v.shape and (same_classes or not k.startswith(head))
    }
    fresh = sorted(k for k in own if k not in loaded)
    if not loaded:
        raise ToolkitError(
            f"--init-from: no tensor of '{path}' fits this {model} (other model options?); "
            f"it was trained with {ckpt.model['options']}"
        )
    net.load_state_dict({**own, **loaded})
    log.info(
        "initialised %d of %d tensors from %s (epoch %d, %d classes); fresh: %s",
        len(loaded),
        len(own),
        path,
        ckpt.epoch,
        ckpt.model["num_classes"],
        ", ".join(fresh) or "none",
    )
    return {
        "checkpoint": str(path.resolve()),
        "epoch": ckpt.epoch,
        "dataset": ckpt.dataset["name"],
        "classes": list(ckpt.dataset["classes"]),
        "loaded": len(loaded),
        "fresh": fresh,
        "head": "loaded (same classes)" if same_classes else "fresh (other classes)",
    }
