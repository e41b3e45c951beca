"""Predicted probabilities that never saw the image, and one embedding space for every image.

K-fold cross-validation on train with the toolkit's own engine: fold k's model trains on the
other folds (stratified, seeded), so its probabilities for fold k are out of sample, which is
what confident learning needs. Val and test were seen by none of the K models: their
probabilities are the mean of the K models'. Each model also embeds every image (the input of
its last linear layer, L2-normalised); the K embeddings are concatenated and scaled by
1/sqrt(K), so the dot product of two rows is the mean of the K models' cosine similarities:
one space, less tied to one model's quirks, for near-duplicates and outliers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from toolkit.audit.rows import Rows
from toolkit.data import DataBundle, Split
from toolkit.data.mapped import take
from toolkit.progress import progress_bar
from toolkit.run.checkpoint import Checkpoint
from toolkit.train.batches import Normalizer
from toolkit.train.engine import pick_device
from toolkit.train.precision import resolve_amp

log = logging.getLogger(__name__)

BATCH = 1024


@dataclass
class ModelOutputs:
    """What the models say about every row."""

    probs: np.ndarray  # rows × classes
    embeddings: np.ndarray  # rows × D, float32; a row's dot product with itself is 1
    train_out_of_sample: bool  # False: a reused model saw train, so train probs are not used
    models: list[str]  # the run folders or model files the outputs came from


def stratified_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """The fold (0..folds-1) of each label: every class spread evenly over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        # Continue the round-robin across classes so small classes do not all start at fold 0.
        fold[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return fold


def fold_bundle(bundle: DataBundle, keep: torch.Tensor, held: torch.Tensor) -> DataBundle:
    """The bundle a fold model trains on: train without the held-out fold, no val (a
    fixed-length recipe keeps its final weights), the held-out fold as its test."""
    train = bundle.train
    empty = Split(take(train.images, held[:0]), train.labels[:0])
    return replace(
        bundle,
        train=Split(take(train.images, keep), train.labels[keep]),
        val=empty,
        test=Split(take(train.images, held), train.labels[held]),
        val_is_carved=False,
        paths={},
    )


def cross_validate(rows: Rows, config, folds: int, out_dir: Path, device: str) -> ModelOutputs:
    """Train `folds` models of `config` (a TrainConfig) and collect their outputs."""
    from toolkit.train.trainer import fit  # the trainer loads the whole engine

    train_rows = rows.where("train")
    fold_of = stratified_folds(rows.label[train_rows], folds, config.seed)
    probs = np.zeros((len(rows), len(rows.classes)), dtype=np.float64)
    unseen = np.concatenate([rows.where("val"), rows.where("test")])
    parts, models = [], []
    for k in range(folds):
        held = np.flatnonzero(fold_of == k)
        keep = np.flatnonzero(fold_of != k)
        log.info(
            "audit model %d/%d: %d train images, %d held out", k + 1, folds, len(keep), len(held)
        )
        run_dir = out_dir / f"fold-{k + 1}"
        data = fold_bundle(rows.bundle, torch.from_numpy(keep), torch.from_numpy(held))
        fit(replace(config, seed=config.seed + k), run_dir=run_dir, data=data)
        ckpt = Checkpoint.load(run_dir / "best.pt")
        fold_probs, embeddings = checkpoint_outputs(ckpt, rows, device, f"model {k + 1}/{folds}")
        probs[train_rows[held]] = fold_probs[train_rows[held]]
        probs[unseen] += fold_probs[unseen] / folds
        parts.append(embeddings)
        models.append(str(run_dir))
    return ModelOutputs(probs.astype(np.float32), join_embeddings(parts), True, models)


def join_embeddings(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate L2-normalised embeddings so that a dot product is their mean cosine."""
    return (np.concatenate(parts, axis=1) / np.sqrt(len(parts))).astype(np.float32)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def last_linear(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no linear layer to take embeddings before")
    return linears[-1]


@torch.no_grad()
def checkpoint_outputs(
    ckpt: Checkpoint, rows: Rows, device: str = "auto", what: str = "model"
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, L2-normalised embeddings) of a checkpoint for every row, each the
    mean over the image and its mirror."""
    dev = pick_device(device)
    net = ckpt.build_net().to(dev).eval()
    normalize = Normalizer(ckpt.dataset["mean"], ckpt.dataset["std"], dev)
    captured: list[torch.Tensor] = []
    hook = last_linear(net).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    precision = resolve_amp("auto", dev)
    probs = np.empty((len(rows), len(rows.classes)), dtype=np.float32)
    embeddings: np.ndarray | None = None
    try:
        with progress_bar(len(rows), f"predicting with {what}") as bar:
            for _split, at, images, local in rows.all_images():
                for start in range(0, len(local), BATCH):
                    batch = normalize(images[local[start : start + BATCH]].to(dev))
                    # The image and its mirror: steadier probabilities for one more pass.
                    with precision.autocast(dev):
                        logits = net(torch.cat([batch, batch.flip(3)])).float()
                    both = captured.pop().float().flatten(1)
                    feature = both.view(2, len(batch), -1).mean(0).cpu().numpy()
                    probs_here = torch.softmax(logits, 1).view(2, len(batch), -1).mean(0)
                    if embeddings is None:
                        embeddings = np.empty((len(rows), feature.shape[1]), dtype=np.float32)
                    rows_here = at[start : start + BATCH]
                    probs[rows_here] = probs_here.cpu().numpy()
                    embeddings[rows_here] = feature
                    bar.advance(len(rows_here))
    finally:
        hook.remove()
    return probs, normalise_rows(embeddings)
