"""The training engine: uint8 tensors on the device, augmentation on whole batches.

In the spirit of airbench/nanoGPT: no DataLoader, no per-image PIL work. A batch is indexed
out of one uint8 tensor, scaled to [0, 1], normalised, augmented with tensor ops and fed to
the net in channels_last, optionally under autocast (bf16/fp16) and torch.compile.

Under DDP (see toolkit.distributed) every rank walks the same seeded order of global
batches and trains on its contiguous chunk of each; augmentation is drawn for the whole
global batch and then sliced, so each image is augmented exactly as in a single-process run.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.data import Split
from toolkit.distributed import SINGLE, Context
from toolkit.errors import ToolkitError
from toolkit.progress import progress_bar

CROP_PADDING = 4
# No-grad evaluation needs no activations kept for backward: big batches amortise the
# per-call overhead (and on a GPU fill it) at a small, bounded memory cost.
EVAL_BATCH_SIZE = 1024
# torch.compile's backend; tests swap in "eager" to exercise the path without C++ codegen.
COMPILE_BACKEND = "inductor"
# How often (in steps) the loss is checked for divergence and the progress line refreshed:
# each check is a host-device sync, which a GPU should not pay every step.
SYNC_EVERY = 20


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ToolkitError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise ToolkitError(f"unknown device '{name}'; choose auto, cpu or cuda")
    return torch.device(name)


def configure_backends(device: torch.device) -> dict:
    """Fast kernel choices for `device`; returns what was set (recorded in config.json)."""
    if device.type != "cuda":
        return {"cudnn_benchmark": False, "tf32_matmul": False}
    # Input shapes are fixed per run, so cuDNN's one-off autotuning per shape pays back.
    torch.backends.cudnn.benchmark = True
    # TF32 for the fp32 matmuls left outside autocast (Ampere and later; cuDNN convolutions
    # already use it by default).
    torch.set_float32_matmul_precision("high")
    return {"cudnn_benchmark": True, "tf32_matmul": True}


# --- mixed precision -------------------------------------------------------------------------

AMP_MODES = ("auto", "off", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How forward passes run: under autocast to `dtype`, or in fp32 when dtype is None."""

    name: str  # "off", "bf16" or "fp16": what config.json records
    dtype: torch.dtype | None = None

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def grad_scaler(self, device: torch.device) -> torch.amp.GradScaler | None:
        """fp16's narrow exponent underflows small gradients, so it needs loss scaling;
        bf16 has fp32's range and needs none."""
        return torch.amp.GradScaler(device.type) if self.name == "fp16" else None


FP32 = Precision("off")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX), which oneDNN uses for
    convolutions and matmuls. Without them bf16 is emulated and slower than fp32."""
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_amp(mode: str, device: torch.device, bf16_supported: bool | None = None) -> Precision:
    """`--amp` -> Precision. auto: bf16 where the hardware runs it natively (CUDA GPUs from
    Ampere on, CPUs with AVX512-BF16/AMX); otherwise fp16 with loss scaling on a GPU and fp32
    on a CPU. Autocast keeps the weights and the optimizer in fp32 either way.

    `bf16_supported` defaults to asking the device; tests pass it to check the logic anywhere.
    """
    if mode not in AMP_MODES:
        raise ToolkitError(f"unknown --amp '{mode}'; choose one of: {', '.join(AMP_MODES)}")
    if mode == "off":
        return FP32
    if mode == "fp16" and device.type != "cuda":
        raise ToolkitError("--amp fp16 needs a CUDA GPU; on the CPU use --amp bf16 or --amp off")
    if mode == "auto":
        if bf16_supported is None:
            bf16_supported = (
                torch.cuda.is_bf16_supported(including_emulation=False)
                if device.type == "cuda"
                else cpu_has_native_bf16()
            )
        if bf16_supported:
            mode = "bf16"
        elif device.type == "cuda":
            mode = "fp16"  # pre-Ampere GPUs, with loss scaling
        else:
            return FP32  # emulated bf16 would be slower than fp32
    return Precision(mode, torch.bfloat16 if mode == "bf16" else torch.float16)


def compile_in_place(net: nn.Module) -> nn.Module:
    """torch.compile the module in place (nn.Module.compile): no `_orig_mod` wrapper, so its
    state_dict and checkpoints keep the plain names, and DDP can wrap it as documented."""
    net.compile(backend=COMPILE_BACKEND)
    return net


# --- data on the device, batches, augmentation -----------------------------------------------


def on_device(split: Split, device: torch.device) -> Split:
    """The split's uint8 images and labels moved to `device` once, for the whole run."""
    return Split(split.images.to(device), split.labels.to(device))


def epoch_batches(
    n: int, batch_size: int, generator: torch.Generator, world_size: int = 1
) -> list[torch.Tensor]:
    """A seeded random order of range(n), cut into global batches of `batch_size`.

    A last batch too small to give every rank two images is dropped (BatchNorm cannot train
    on one image; with one process this drops only a batch of one).
    """
    batches = list(torch.randperm(n, generator=generator).split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2 * world_size:
        batches.pop()
    return batches


def steps_per_epoch(n: int, batch_size: int, world_size: int = 1) -> int:
    """len(epoch_batches(n, batch_size, ..., world_size)) without drawing an order."""
    steps = math.ceil(n / batch_size)
    last = n - (steps - 1) * batch_size
    if steps > 1 and last < 2 * world_size:
        steps -= 1
    return steps


@dataclass(frozen=True)
class BatchAugment:
    """Per-image augmentation parameters of one batch: crop offsets, flips, cutout corners.

    Drawn for the global batch, then `select`ed per rank, so the augmentation an image gets
    does not depend on how many processes train.
    """

    dy: torch.Tensor | None = None  # crop offsets in [0, 2 * CROP_PADDING]
    dx: torch.Tensor | None = None
    flip: torch.Tensor | None = None  # bool
    cut_y: torch.Tensor | None = None  # top-left corner of the cutout square
    cut_x: torch.Tensor | None = None
    cutout: int = 0

    @classmethod
    def draw(
        cls, n: int, size: tuple[int, int], generator: torch.Generator, crop_flip: bool, cutout: int
    ) -> BatchAugment:
        h, w = size
        values: dict = {"cutout": cutout}
        if crop_flip:
            values["dy"] = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator)
            values["dx"] = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator)
            values["flip"] = torch.rand(n, generator=generator) < 0.5
        if cutout:
            if cutout > min(h, w):
                raise ValueError(f"cutout {cutout} is larger than the {h}x{w} images")
            values["cut_y"] = torch.randint(0, h - cutout + 1, (n,), generator=generator)
            values["cut_x"] = torch.randint(0, w - cutout + 1, (n,), generator=generator)
        return cls(**values)

    def select(self, part: slice) -> BatchAugment:
        """The parameters of the images `part` of the batch."""
        pick = {k: getattr(self, k) for k in ("dy", "dx", "flip", "cut_y", "cut_x")}
        return BatchAugment(
            **{k: v[part] if v is not None else None for k, v in pick.items()}, cutout=self.cutout
        )

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        if self.dy is not None:
            images = _crop_flip(images, self.dy, self.dx, self.flip)
        if self.cutout:
            images = _cutout(images, self.cut_y, self.cut_x, self.cutout)
        return images


def _crop_flip(images: torch.Tensor, dy, dx, flip) -> torch.Tensor:
    """Random crop with reflect padding + horizontal flip, per image, on a float batch.

    Two gathers (rows, then columns) instead of a Python loop over images: the same code is
    fast on the CPU and needs no host sync on a GPU.
    """
    n, c, h, w = images.shape
    p = CROP_PADDING
    device = images.device
    dy, dx, flip = dy.to(device), dx.to(device), flip.to(device)
    padded = F.pad(images, (p, p, p, p), mode="reflect")
    rows = (dy[:, None] + torch.arange(h, device=device))[:, None, :, None]
    cropped = padded.gather(2, rows.expand(n, c, h, w + 2 * p))
    cols = (dx[:, None] + torch.arange(w, device=device))[:, None, None, :]
    cropped = cropped.gather(3, cols.expand(n, c, h, w))
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def _cutout(images: torch.Tensor, cut_y, cut_x, size: int) -> torch.Tensor:
    """Zero a size×size square per image: in normalised space 0 is the dataset's mean colour."""
    _, _, h, w = images.shape
    device = images.device
    ys = torch.arange(h, device=device)[None, :, None]
    xs = torch.arange(w, device=device)[None, None, :]
    y0, x0 = cut_y.to(device)[:, None, None], cut_x.to(device)[:, None, None]
    inside = (ys >= y0) & (ys < y0 + size) & (xs >= x0) & (xs < x0 + size)
    return images.masked_fill(inside[:, None], 0.0)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (reflect padding) + horizontal flip of every image of a float batch."""
    params = BatchAugment.draw(len(images), images.shape[-2:], generator, True, 0)
    return params.apply(images)


class Normalizer:
    """uint8 batch -> normalised float batch, with mean/std kept on the device."""

    def __init__(self, mean, std, device: torch.device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float().div_(255) - self.mean) / self.std
        return to_channels_last(x)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    # Convolutions run ~2x faster in channels_last on the CPU (oneDNN) and on CUDA (tensor
    # cores); the nets are moved to it too, so no layout conversion happens inside them.
    return x.contiguous(memory_format=torch.channels_last)


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
    augment: bool = False  # crop + flip
    cutout: int = 0  # side of the zeroed square, 0: off
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    precision: Precision = FP32
    # --on-nan skip: a batch whose loss or gradients are not finite takes no step (costs one
    # host sync per batch); off, divergence is caught every SYNC_EVERY steps and stops.
    skip_nonfinite: bool = False


class _QuietBar:
    def advance(self, n: int = 1, **fields) -> None: ...

    def update(self, **fields) -> None: ...


def _progress(show: bool, total: int, description: str):
    return progress_bar(total, description) if show else contextlib.nullcontext(_QuietBar())


def _backward(loss, optimizer, scaler) -> None:
    optimizer.zero_grad(set_to_none=True)
    (loss if scaler is None else scaler.scale(loss)).backward()


def _step(net, optimizer, scaler, grad_clip: float) -> None:
    if scaler is None:
        if grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
        optimizer.step()
        return
    if grad_clip:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    scaler.step(optimizer)  # skips the step when the scaled gradients overflowed
    scaler.update()


def _backward_and_step(loss, net, optimizer, scaler, grad_clip: float) -> None:
    _backward(loss, optimizer, scaler)
    _step(net, optimizer, scaler, grad_clip)


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
    if scaler is None:
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


def _optimise(loss, net, optimizer, scaler, options: StepOptions, guard, dist) -> bool:
    """Backward and step; returns False when skip mode left the batch out instead."""
    if guard is None:
        _backward_and_step(loss, net, optimizer, scaler, options.grad_clip)
        return True
    _backward(loss, optimizer, scaler)
    if _all_finite(loss, optimizer, scaler, dist):
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
    if options.augment or options.cutout:
        # Drawn for the whole global batch (the generator advances alike on every rank).
        size = tuple(split.images.shape[-2:])
        params = BatchAugment.draw(len(batch), size, generator, options.augment, options.cutout)
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
) -> EpochResult:
    """One pass over `split` in a seeded random order; the scheduler steps every batch.

    `net` may be DDP-wrapped; the returned loss and accuracy are over all ranks' images.
    """
    net.train()
    batches = epoch_batches(len(split), options.batch_size, generator, dist.world_size)
    guard = _BufferGuard(net) if options.skip_nonfinite else None
    total_loss = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.float64)
    seen = skipped = 0
    start = time.perf_counter()
    with _progress(dist.is_main, len(batches), description) as bar:
        for step, batch in enumerate(batches):
            part = dist.shard(len(batch))
            x, labels = _rank_inputs(split, batch, part, normalize, options, generator, device)
            if guard is not None:
                guard.save()
            with options.precision.autocast(device):
                logits = net(x)
                loss = F.cross_entropy(logits, labels, label_smoothing=options.label_smoothing)
            # DDP averages the ranks' gradients; weighting each rank's mean by its share of
            # the batch makes that average the whole batch's mean even when chunks differ.
            weight = len(labels) * dist.world_size / len(batch) if dist.is_distributed else 1.0
            weighted = loss * weight if weight != 1.0 else loss
            if _optimise(weighted, net, optimizer, scaler, options, guard, dist):
                total_loss += loss.detach().double() * len(labels)
                correct += (logits.argmax(1) == labels).sum()
                seen += len(labels)
                scheduler.step()
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
    batch_size: int = EVAL_BATCH_SIZE,
) -> torch.Tensor:
    """Logits for a uint8 N×C×H×W tensor, in large no-grad batches; returned on the CPU.

    Puts `net` in eval mode: BatchNorm uses (and does not update) its running statistics.
    """
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
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy) on a split, no label smoothing."""
    logits = predict_logits(net, split.images, normalize, device, batch_size)
    labels = split.labels.cpu()
    loss = F.cross_entropy(logits, labels).item()
    acc = (logits.argmax(1) == labels).float().mean().item()
    return loss, acc
