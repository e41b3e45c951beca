"""The training engine: uint8 tensors on the device, augmentation on whole batches.

In the spirit of airbench/nanoGPT: no DataLoader, no per-image PIL work. A batch is indexed
out of one uint8 tensor, augmented with tensor ops, scaled to [0, 1] and normalised.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data import Split
from toolkit.progress import progress_bar

CROP_PADDING = 4


def pick_device(name: str = "auto") -> torch.device:
    from toolkit.errors import ToolkitError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device '{name}'; choose auto, cpu or cuda")
    return torch.device(name)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding + horizontal flip, per image, on a float batch.

    Two gathers (rows, then columns) instead of a Python loop over images: the same code is
    fast on the CPU and needs no host sync on a GPU.
    """
    n, c, h, w = images.shape
    p = CROP_PADDING
    device = images.device
    padded = F.pad(images, (p, p, p, p), mode="reflect")
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(device)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cropped = padded.gather(2, rows.expand(n, c, h, w + 2 * p))
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    cropped = cropped.gather(3, cols.expand(n, c, h, w))
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


class Normalizer:
    """uint8 batch -> normalised float batch, with mean/std kept on the device."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last: convolutions run ~2x faster in it on the CPU, and on CUDA too.
        x = (images.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last)


@dataclass
class EpochResult:
    loss: float
    acc: float
    seconds: float
    images_per_second: float


def train_one_epoch(
    net: nn.Module,
    split: Split,
    normalize: Normalizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    batch_size: int,
    augment: bool,
    label_smoothing: float,
    grad_clip: float | None,
    generator: torch.Generator,
    device: torch.device,
    description: str = "train",
) -> EpochResult:
    """One pass over `split` in a seeded random order; the scheduler steps every batch."""
    net.train()
    n = len(split)
    order = torch.randperm(n, generator=generator)
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches.pop()  # BatchNorm cannot train on a batch of one
    total_loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    start = time.perf_counter()
    with progress_bar(len(batches), description) as bar:
        for step, idx in enumerate(batches):
            images = split.images[idx].to(device, non_blocking=True)
            labels = split.labels[idx].to(device, non_blocking=True)
            x = normalize(images)
            if augment:
                x = random_crop_flip(x, generator)
            logits = net(x)
            loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss became {loss.item()} at batch {step}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizer.step()
            scheduler.step()
            total_loss += loss.detach() * len(idx)
            correct += (logits.argmax(1) == labels).sum()
            seen += len(idx)
            if step % 20 == 0 or step == len(batches) - 1:
                elapsed = time.perf_counter() - start
                bar.update(
                    status=f"loss {total_loss.item() / seen:.3f} "
                    f"acc {correct.item() / seen:.3f} {seen / elapsed:,.0f} img/s"
                )
            bar.advance(1)
    seconds = time.perf_counter() - start
    return EpochResult(total_loss.item() / seen, correct.item() / seen, seconds, seen / seconds)


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    images: torch.Tensor,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int = 1000,
) -> torch.Tensor:
    """Logits for a uint8 N×C×H×W tensor, in large no-grad batches; returned on the CPU."""
    net.eval()
    out = [
        net(normalize(images[i : i + batch_size].to(device))).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0)


def evaluate_split(
    net: nn.Module,
    split: Split,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int = 1000,
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) on a split, no label smoothing."""
    logits = predict_logits(net, split.images, normalize, device, batch_size)
    loss = F.cross_entropy(logits, split.labels).item()
    acc = (logits.argmax(1) == split.labels).float().mean().item()
    return loss, acc
