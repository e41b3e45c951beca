"""Exact k-nearest neighbours, in blocks: near-duplicate pairs and outlier scores.

The space joins two views of an image with equal weight, so a dot product is the mean of two
cosine similarities: the models' embeddings (what the picture shows) and a coarse colour
thumbnail (PIXEL_GRID² cells, its mean and scale removed: how the picture looks, whatever
its brightness or contrast, and blurred enough that a 1-2 px shift or a re-encode barely
moves it). A classifier's embedding alone puts every confident image of a class close to
every other (its classes collapse), and a thumbnail alone matches unrelated pictures of the
same layout; a near-duplicate is close in both.

Rows are L2-normalised, so similarity is a dot product; a block of queries against every row
is one matrix product (60,000 × 60,000 takes well under a minute on two cores), and nothing
approximate is needed at this scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.progress import progress_bar

QUERY_BLOCK = 1024
DUPLICATE_NEIGHBOURS = 5  # a picture copied more often than this is still found, pairwise
OUTLIER_NEIGHBOURS = 10


PIXEL_GRID = 8


def pixel_descriptors(images) -> np.ndarray:
    """N×C×H×W uint8 -> N×(C·PIXEL_GRID²) rows, mean-free and L2-normalised."""
    out = []
    for start in range(0, len(images), 4096):
        block = torch.as_tensor(np.asarray(images[start : start + 4096])).float()
        cells = torch.nn.functional.adaptive_avg_pool2d(block, PIXEL_GRID).flatten(1)
        cells = cells - cells.mean(1, keepdim=True)
        out.append(torch.nn.functional.normalize(cells, dim=1).numpy())
    return np.concatenate(out) if out else np.empty((0, 3 * PIXEL_GRID**2), np.float32)


def joint_space(embeddings: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Rows whose dot product is the mean of the two cosine similarities."""
    return (np.concatenate([embeddings, pixels], axis=1) / np.sqrt(2)).astype(np.float32)


@dataclass
class Neighbours:
    index: np.ndarray  # rows × k: each row's nearest other rows, nearest first
    similarity: np.ndarray  # rows × k
    outlier_score: np.ndarray  # rows: 1 - mean similarity to the nearest train rows


def nearest(embeddings: np.ndarray, train: np.ndarray, k: int = DUPLICATE_NEIGHBOURS) -> Neighbours:
    """Each row's k nearest other rows (any split), and its mean similarity to its
    OUTLIER_NEIGHBOURS nearest train rows (itself left out)."""
    emb = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    n = len(emb)
    train_t = torch.from_numpy(train)
    k = min(k, n - 1)
    k_out = min(OUTLIER_NEIGHBOURS, len(train) - 1)
    index = np.empty((n, k), dtype=np.int64)
    similarity = np.empty((n, k), dtype=np.float32)
    outlier = np.empty(n, dtype=np.float32)
    with progress_bar(n, "nearest neighbours") as bar:
        for start in range(0, n, QUERY_BLOCK):
            stop = min(start + QUERY_BLOCK, n)
            sims = emb[start:stop] @ emb.T
            own = torch.arange(start, stop)
            sims[own - start, own] = -np.inf  # a row is not its own neighbour
            top = sims.topk(k, dim=1)
            index[start:stop] = top.indices.numpy()
            similarity[start:stop] = top.values.numpy()
            to_train = sims[:, train_t].topk(k_out, dim=1).values
            outlier[start:stop] = 1 - to_train.mean(1).numpy()
            bar.advance(stop - start)
    return Neighbours(index, similarity, outlier)


# Pairs this close in the joint space are verified pixel by pixel. On CIFAR-10 with planted
# near-duplicates (benchmarks/audit.md) 99 % of them had their original among their 5
# nearest neighbours at 0.85 or more; the verification, not this, decides.
CANDIDATE_SIMILARITY = 0.85
MAX_SHIFT = 2  # px of the VERIFY_SIZE copy: the offsets tried when aligning a pair
VERIFY_SIZE = 32


def small_copies(images) -> torch.Tensor:
    """N×C×H×W uint8 images as uint8 VERIFY_SIZE² copies (area-averaged when larger)."""
    out = []
    for start in range(0, len(images), 4096):
        block = torch.as_tensor(np.asarray(images[start : start + 4096]))
        if block.shape[-1] != VERIFY_SIZE or block.shape[-2] != VERIFY_SIZE:
            block = torch.nn.functional.interpolate(block.float(), size=VERIFY_SIZE, mode="area")
            block = block.round().clamp(0, 255).to(torch.uint8)
        out.append(block)
    return (
        torch.cat(out) if out else torch.empty((0, 3, VERIFY_SIZE, VERIFY_SIZE), dtype=torch.uint8)
    )


def pair_correlations(small: torch.Tensor, pairs: np.ndarray, batch: int = 4096) -> np.ndarray:
    """`aligned_correlation` of each pair (i, j) of rows of `small` (from `small_copies`)."""
    out = np.empty(len(pairs), dtype=np.float32)
    for start in range(0, len(pairs), batch):
        i = torch.from_numpy(pairs[start : start + batch, 0])
        j = torch.from_numpy(pairs[start : start + batch, 1])
        out[start : start + batch] = aligned_correlation(small[i].float(), small[j].float()).numpy()
    return out


def aligned_correlation(a: torch.Tensor, b: torch.Tensor, shift: int = MAX_SHIFT) -> torch.Tensor:
    """For pairs of N×C×H×W images, the best Pearson correlation of their pixels over every
    offset of up to `shift` px (on the overlap): 1 for the same picture whatever its
    brightness and contrast, barely less after a re-encode, a resize or a small shift."""
    h, w = a.shape[-2:]
    best = torch.full((len(a),), -1.0)
    for dy in range(-shift, shift + 1):
        for dx in range(-shift, shift + 1):
            x = a[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)]
            y = b[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
            # Each channel centred on its own: two pictures sharing only a colour cast (or a
            # class's hue) do not correlate.
            x = (x - x.mean((2, 3), keepdim=True)).flatten(1)
            y = (y - y.mean((2, 3), keepdim=True)).flatten(1)
            r = (x * y).sum(1) / (x.norm(dim=1) * y.norm(dim=1)).clamp_min(1e-6)
            best = torch.maximum(best, r)
    return best


def similar_pairs(neighbours: Neighbours, threshold: float) -> list[tuple[int, int, float]]:
    """(i, j, similarity) with i < j for every neighbour pair at or above `threshold`, once
    each, most similar first."""
    pairs: dict[tuple[int, int], float] = {}
    rows, cols = np.nonzero(neighbours.similarity >= threshold)
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        j = int(neighbours.index[r, c])
        key = (min(r, j), max(r, j))
        pairs[key] = max(pairs.get(key, -1.0), float(neighbours.similarity[r, c]))
    return sorted(((i, j, s) for (i, j), s in pairs.items()), key=lambda p: -p[2])


def outlier_fence(train_scores: np.ndarray, z: float = 3.5) -> float:
    """The score past which a row is an outlier: a modified z-score (distance from the train
    rows' median in units of 1.4826·MAD, a robust standard deviation) above 3.5, Iglewicz and
    Hoaglin's rule. Robust: the outliers themselves barely move the median and the MAD."""
    median = float(np.median(train_scores))
    spread = 1.4826 * float(np.median(np.abs(train_scores - median)))
    return median + z * max(spread, 1e-6)
