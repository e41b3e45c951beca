"""The training engine: `train_one_epoch` and `predict_logits` / `evaluate_split`.

In the spirit of torchvision's reference loop and airbench: small functions, no DataLoader.
Batches come out of one uint8 tensor on the device (toolkit.train.batches), the forward pass
runs in channels_last, optionally under autocast (toolkit.train.precision) and
torch.compile. Under DDP (toolkit.train.distributed) every rank walks the same seeded order
of global batches and trains on its contiguous chunk of each.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import seams
from toolkit.data import Split
from toolkit.errors import ToolkitError
from toolkit.progress import progress_bar
from toolkit.train.batches import (
    BatchAugment,
    Normalizer,
    epoch_batches,
    ghost_batches,
    to_channels_last,
)
from toolkit.train.distributed import SINGLE, Context
from toolkit.train.precision import FP32, Precision

# No-grad evaluation keeps no activations for backward, so a GPU is filled by big batches
# at a small, bounded memory cost. The CPU is not: there a batch's activations should stay in
# its caches. At 256 (against 1024) net evaluates 1.8x, resnet10 2.3x, lenet5 1.35x and
# speedrun 1.2x faster on a 2-core AVX2 EPYC.
EVAL_BATCH_SIZE = 1024
CPU_EVAL_BATCH_SIZE = 256
# torch.compile's backend; tests swap in "eager" to exercise the path without C++ codegen.
COMPILE_BACKEND = "inductor"
# How often (in steps) the loss is checked for divergence and the progress line refreshed:
# each check is a host-device sync, which a GPU should not pay every step.
SYNC_EVERY = 20


def eval_batch_size(device: torch.device) -> int:
    """Images per no-grad evaluation batch on `device`."""
    return CPU_EVAL_BATCH_SIZE if device.type == "cpu" else EVAL_BATCH_SIZE


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device '{name}'; choose auto, cpu or cuda")
    return torch.device(name)


# glibc's malloc hands blocks above its mmap threshold (128 KB at first) straight back to the
# OS when they are freed, so a CPU step that allocates its activations afresh page-faults
# every page of them: `net`'s steps took 26 ms instead of 16 ms through its first epoch here
# (until the threshold grew on its own). At glibc's maximum threshold and with no trimming the
# heap keeps them for the next step, as jemalloc or tcmalloc would.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
_MMAP_THRESHOLD_MAX = 32 * 2**20  # glibc's ceiling on 64-bit
_TRIM_THRESHOLD = 2**30


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse; False where it is not glibc."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # macOS, Windows, musl
        return False
    kept = mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    return bool(kept and mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))


def configure_backends(device: torch.device) -> dict:
    """Fast kernel choices for `device`; returns what was set (recorded in config.json)."""
    if device.type != "cuda":
        return {"cudnn_benchmark": False, "tf32_matmul": False, "heap_kept": keep_freed_memory()}
    # Input shapes are fixed per run, so cuDNN's one-off autotuning per shape pays back.
    torch.backends.cudnn.benchmark = True
    # TF32 for the fp32 matmuls left outside autocast (Ampere and later; cuDNN convolutions
    # already use it by default).
    torch.set_float32_matmul_precision("high")
    return {"cudnn_benchmark": True, "tf32_matmul": True}


def compile_in_place(net: nn.Module) -> nn.Module:
    """torch.compile the module in place (nn.Module.compile): no `_orig_mod` wrapper, so its
    state_dict and checkpoints keep the plain names, and DDP can wrap it as documented."""
    net.compile(backend=COMPILE_BACKEND)
    return net


# --- one epoch -------------------------------------------------------------------------------


@dataclass
class EpochResult:
    loss: float  # over the batches that stepped
    acc: float
    seconds: float
    images_per_second: float
    skipped: int = 0  # batches left out for a non-finite loss or gradient (skip_nonfinite)
    batches: int = 0


@dataclass(frozen=True)
class StepOptions:
    """What shapes one optimisation step besides the net and the data."""

    batch_size: int  # global: split across ranks
    # --micro-batch: forward and backward at most this many images at a time, one optimizer
    # step per batch (0: the whole batch in one pass)
    micro_batch: int = 0
    augment: bool = False  # crop + flip
    cutout: int = 0  # side of the zeroed square, 0: off
    translate: int = 0  # crop of the N-px padded image instead of augment's 4 px, 0: off
    # --alt-flip: this epoch's flip of every image of the split (batches.alternating_flips)
    flips: torch.Tensor | None = None
    # --resized-crop: the smallest share of an image's area a random crop keeps, 0: off
    resized_crop: float = 0.0
    label_smoothing: float = 0.0
    # --balance weights: the loss's weight per class; --balance sampler: each training
    # image's chance of being drawn (batches.epoch_batches)
    class_weights: torch.Tensor | None = None
    sample_weights: torch.Tensor | None = None
    grad_clip: float = 0.0
    precision: Precision = FP32
    # --on-nan skip: a batch whose loss or gradients are not finite takes no step (costs one
    # host sync per batch); off, divergence is caught every SYNC_EVERY steps and stops.
    skip_nonfinite: bool = False


def _step(net, optimizer, scaler: torch.amp.GradScaler, grad_clip: float) -> None:
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    scaler.step(optimizer)  # skips the step when fp16's scaled gradients overflowed
    scaler.update()


class _BufferGuard:
    """The net's buffers (BatchNorm running statistics) as they were before a batch's
    forward pass, so a skipped batch leaves no trace in them either."""

    def __init__(self, net: nn.Module):
        self.buffers = list(net.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]

    def save(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers, strict=True):
            saved.copy_(buffer)

    def restore(self) -> None:
        for saved, buffer in zip(self.saved, self.buffers, strict=True):
            buffer.copy_(saved)


def _all_finite(loss, optimizer, scaler, dist: Context) -> bool:
    """Whether this batch's loss, and its gradients, are finite on every rank.

    With loss scaling (fp16) inf gradients are the scaler's business: it skips that step and
    lowers the scale, so only the loss is checked. Under DDP the gradients are already
    averaged (identical on every rank) but losses are per rank, so the verdict is summed:
    every rank then skips, or steps, alike.
    """
    finite = torch.isfinite(loss.detach()).all()
    if not scaler.is_enabled():
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads:
            finite = finite & torch.stack([g.isfinite().all() for g in grads]).all()
    votes = dist.sum(finite.to(torch.float32).reshape(1))
    return bool(votes.item() == dist.world_size)  # the host sync skip mode pays per batch


def _advance_schedule(scheduler) -> None:
    """Step the schedule for a skipped batch: the epoch keeps its length, a resumed run its
    exact schedule. Torch warns about a scheduler step before any optimizer step, which is
    exactly what skipping the first batches means here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
        scheduler.step()


def _forward_backward(
    net, x, labels, options: StepOptions, optimizer, scaler, weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch's mean loss and its logits (both detached), with its gradients left in the
    parameters: in one pass, or --micro-batch images at a time, each chunk's loss weighted by
    its share of the batch, so the gradients are the batch's mean either way.

    `weight` scales the loss that is backpropagated (DDP: this rank's share of the batch).
    """
    optimizer.zero_grad(set_to_none=True)
    size = options.micro_batch or len(x)
    chunks = list(zip(x.split(size), labels.split(size), strict=True))
    losses, outputs = [], []
    for i, (images, targets) in enumerate(chunks):
        # Under DDP the ranks average their gradients once, in the last chunk's backward.
        last = i == len(chunks) - 1
        sync = net.no_sync() if hasattr(net, "no_sync") and not last else contextlib.nullcontext()
        with sync:
            with options.precision.autocast(x.device):
                logits = net(images)
                loss = F.cross_entropy(
                    logits,
                    targets,
                    weight=options.class_weights,
                    label_smoothing=options.label_smoothing,
                )
            share = weight * len(targets) / len(x)
            # A disabled scaler (no fp16) passes the loss through.
            scaler.scale(loss * share if share != 1.0 else loss).backward()
        losses.append(loss.detach() * (len(targets) / len(x)))  # x 1.0: one chunk's is exact
        outputs.append(logits.detach())
    return sum(losses), torch.cat(outputs)


def _optimise(loss, net, optimizer, scaler, options: StepOptions, guard, dist) -> bool:
    """Step on the gradients the batch left; returns False when skip mode left the batch out
    instead."""
    if guard is None or _all_finite(loss, optimizer, scaler, dist):
        _step(net, optimizer, scaler, options.grad_clip)
        return True
    optimizer.zero_grad(set_to_none=True)  # no non-finite gradient may reach a later step
    guard.restore()
    return False


def _rank_inputs(
    split: Split, batch, part: slice, normalize, options: StepOptions, generator, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's normalised, augmented images and labels of the global `batch`."""
    idx = batch[part].to(split.images.device)
    x = normalize(split.images[idx].to(device, non_blocking=True))
    labels = split.labels[idx].to(device, non_blocking=True)
    flips = options.flips
    if (
        options.augment
        or options.cutout
        or options.translate
        or options.resized_crop
        or (flips is not None)
    ):
        # Drawn for the whole global batch (the generator advances alike on every rank).
        size = tuple(split.images.shape[-2:])
        params = BatchAugment.draw(
            len(batch),
            size,
            generator,
            options.augment,
            options.cutout,
            translate=options.translate,
            flips=flips[batch] if flips is not None else None,
            resized_crop=options.resized_crop,
        )
        x = to_channels_last(params.select(part).apply(x))
    return x, labels


def train_one_epoch(
    net: nn.Module,
    split: Split,
    normalize: Normalizer,
    optimizer: torch.optim.Optimizer,
    scheduler,
    options: StepOptions,
    *,
    generator: torch.Generator,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
    dist: Context = SINGLE,
    description: str = "train",
    after_step: Callable[[int], None] = lambda step: None,
) -> EpochResult:
    """One pass over `split` in a seeded random order; the scheduler steps every batch.

    `net` may be DDP-wrapped; the returned loss and accuracy are over all ranks' images.
    `scaler` is fp16's loss scaler (Precision.grad_scaler); None means no loss scaling.
    `after_step(n)` runs after the run's n-th step (counted by the schedule), e.g. the
    lookahead (toolkit.train.optim.Lookahead).
    """
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    net.train()
    batches = epoch_batches(
        len(split), options.batch_size, generator, dist.world_size, options.sample_weights
    )
    guard = _BufferGuard(net) if options.skip_nonfinite else None
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    seen = skipped = 0
    start = time.perf_counter()
    per_rank = math.ceil(options.batch_size / dist.world_size)
    ghost = ghost_batches(net, math.ceil(per_rank / (options.micro_batch or per_rank)))
    with progress_bar(len(batches), description, enabled=dist.is_main) as bar, ghost:
        for step, batch in enumerate(batches):
            part = dist.shard(len(batch))
            x, labels = _rank_inputs(split, batch, part, normalize, options, generator, device)
            seams.TRAIN_BATCH(step=step + 1, images=x)
            if guard is not None:
                guard.save()
            # DDP averages the ranks' gradients; weighting each rank's mean by its share of
            # the batch makes that average the whole batch's mean even when the parts differ.
            weight = len(labels) * dist.world_size / len(batch) if dist.is_distributed else 1.0
            loss, logits = _forward_backward(net, x, labels, options, optimizer, scaler, weight)
            if _optimise(loss, net, optimizer, scaler, options, guard, dist):
                total_loss += loss.double() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                seen += len(labels)
                scheduler.step()
                after_step(scheduler.last_epoch)
            else:
                skipped += 1
                _advance_schedule(scheduler)
            if step % SYNC_EVERY == 0 or step == len(batches) - 1:
                # A NaN anywhere in the epoch stays in the running sum: checking it here
                # catches divergence without a host sync every step.
                if not torch.isfinite(total_loss):
                    raise FloatingPointError(f"loss became {total_loss.item()} by batch {step}")
                elapsed = time.perf_counter() - start
                shown, rate = max(seen, 1), seen * dist.world_size / elapsed
                bar.update(
                    status=f"loss {total_loss.item() / shown:.3f} "
                    f"acc {correct.item() / shown:.3f} {rate:,.0f} img/s"
                )
            bar.advance(1)
    if skipped and skipped == len(batches):  # verdicts are global: every rank raises alike
        raise FloatingPointError(f"the loss or gradients were not finite in all {skipped} batches")
    totals = dist.sum(torch.stack([total_loss, correct, total_loss.new_tensor(seen)]))
    loss_sum, correct_sum, seen_all = totals.tolist()
    seconds = time.perf_counter() - start
    return EpochResult(
        loss_sum / seen_all,
        correct_sum / seen_all,
        seconds,
        seen_all / seconds,
        skipped=skipped,
        batches=len(batches),
    )


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def predict_logits(
    net: nn.Module,
    images: torch.Tensor,
    normalize: Normalizer,
    device: torch.device,
    batch_size: int | None = None,
) -> torch.Tensor:
    """Logits for a uint8 N×C×H×W tensor, in no-grad batches (default: the device's
    eval_batch_size); returned on the CPU.

    Puts `net` in eval mode: BatchNorm uses (and does not update) its running statistics.
    """
    net.eval()
    batch_size = batch_size or eval_batch_size(device)
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
    batch_size: int | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) on a split, no label smoothing."""
    logits = predict_logits(net, split.images, normalize, device, batch_size)
    labels = split.labels.cpu()
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc
