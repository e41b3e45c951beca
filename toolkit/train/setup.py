"""What `fit` checks and builds before the first epoch: the data against the config, the run
folder and its free space, then the model, optimizer, schedule and loss scaler.

Under torchrun rank 0 checks the run folder and every rank gets its verdict, so no rank is
left waiting for the others when one of them fails.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from toolkit.atomic import atomic_write_json
from toolkit.data import DataBundle
from toolkit.data.specs import size_label
from toolkit.errors import ToolkitError, error_summary
from toolkit.models import count_parameters, create_model
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import check_free_space, check_writable, new_run_dir
from toolkit.train.balance import balance_weights
from toolkit.train.batches import Normalizer
from toolkit.train.config import TrainConfig
from toolkit.train.distributed import Context
from toolkit.train.engine import compile_in_place
from toolkit.train.fit_data import steps_per_epoch
from toolkit.train.optim import Lookahead, freeze_bn_scales, lr_factors, make_optimizer
from toolkit.train.precision import Precision
from toolkit.train.warm_start import load_matching_weights
from toolkit.version import __version__

# What a run writes besides its checkpoints (logs, TensorBoard, eval/ and export/ later).
FREE_SPACE_MARGIN = 64 * 2**20
# Optimizer state per weight in a checkpoint: Adam keeps two moments, SGD one momentum
# (and the lookahead one EMA).
OPTIMIZER_SLOTS = 2
# The first this many training images are what a model's `prepare(images)` hook sees
# (speedrun's whitening layer estimates its patch covariance from them).
PREPARE_IMAGES = 5000


@dataclass
class Setup:
    """Everything training builds before the first epoch."""

    net: nn.Module  # the plain model: evaluated and checkpointed
    train_net: nn.Module  # what the optimizer steps through (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    precision: Precision
    model_info: dict  # the checkpoint's "model" section
    lookahead: Lookahead  # --lookahead (a no-op at 0)
    initialised_from: dict | None = None  # what --init-from loaded (warm_start)
    prepare_seconds: float = 0.0  # the model's data-dependent init (timed as training)
    balance: dict = field(default_factory=dict)  # --balance's StepOptions, for every epoch


def check_data(
    config: TrainConfig, data: DataBundle, resumed: Checkpoint | None, dist: Context, run_dir
) -> None:
    """The data must be what a resumed run started on, the same on every rank, and fit
    the batch/cutout settings."""
    if resumed is not None and resumed.fingerprint != data.fingerprint:
        raise ToolkitError(
            f"the data of '{run_dir}' has changed since it started (fingerprint "
            f"{data.fingerprint[:12]} != {resumed.fingerprint[:12]}); resume needs the same files"
        )
    if len(set(dist.gather_objects(data.fingerprint))) > 1:
        raise ToolkitError(
            "the ranks loaded different data; every machine needs the same files "
            "(--data-dir / --splits / --data-root)"
        )
    if config.cutout > min(data.size_hw):
        raise ToolkitError(
            f"--cutout {config.cutout} is larger than the {size_label(data.size_hw)}px images"
        )
    need = 2 * dist.world_size  # every rank needs two images per step for BatchNorm
    if dist.is_distributed and (config.batch_size < need or len(data.train) < need):
        raise ToolkitError(
            f"--batch-size {config.batch_size} is the global batch, split over "
            f"{dist.world_size} processes; each needs at least 2 images per step: use "
            f"--batch-size {need} or more (and at least {need} training images)"
        )


def agree_run_dir(
    run_dir: Path | None, config: TrainConfig, data: DataBundle, dist: Context
) -> Path:
    """Rank 0 picks (default name: runs/<dataset>-<model>-<time>) and checks the run folder;
    every rank gets its path."""
    picked, error = None, None
    if dist.is_main:
        try:
            picked = Path(run_dir) if run_dir else new_run_dir(data.spec.name, config.model)
            check_writable(picked, "run folder", "--run-dir")
        except ToolkitError as exc:
            error = str(exc)
    picked, error = dist.broadcast_object((str(picked) if picked else None, error))
    if error:
        raise ToolkitError(error)
    return Path(picked)


def check_run_space(run_dir: Path, net: nn.Module, resuming: bool, dist: Context) -> None:
    """Refuse to start a run its disk cannot hold, rather than fail at a checkpoint later."""
    error = None
    if dist.is_main:
        fix = (
            "free some space, then resume"
            if resuming
            else "free some space or pass --run-dir a folder on another disk"
        )
        try:
            check_free_space(run_dir, _bytes_needed(net, resuming), "run folder", fix)
        except ToolkitError as exc:
            error = str(exc)
    error = dist.broadcast_object(error)
    if error:
        raise ToolkitError(error)


def _bytes_needed(net: nn.Module, resuming: bool) -> int:
    """What training adds to the run folder at its peak: best.pt, last.pt and the temporary
    copy of one being rewritten (a resumed run has the first two already), each with the
    weights and optimizer state, plus a margin for logs and later eval/ and export/."""
    weights = sum(t.numel() * t.element_size() for t in net.state_dict().values())
    checkpoint = weights * (1 + OPTIMIZER_SLOTS)
    return checkpoint * (1 if resuming else 3) + FREE_SPACE_MARGIN


def build(
    config: TrainConfig,
    data: DataBundle,
    resumed: Checkpoint | None,
    dist: Context,
    device: torch.device,
    precision: Precision,
    pretrained=None,
) -> Setup:
    """The model (seeded: the same on every rank), optimizer, schedule and loss scaler, with
    a resumed run's state, or the `pretrained` weights (models.pretrained.Fetched), loaded
    into them."""
    torch.manual_seed(config.seed)
    model_info = {
        "name": config.model,
        "options": config.model_options,
        "num_classes": data.spec.num_classes,
        "input_size": data.image_size,
        "in_channels": data.spec.channels,
    }
    net = create_model(
        config.model,
        num_classes=model_info["num_classes"],
        input_size=model_info["input_size"],
        in_channels=model_info["in_channels"],
        **config.model_options,
    )
    prepare_seconds = 0.0
    if resumed is None and hasattr(net, "prepare"):  # a resumed run's weights are in last.pt
        start = time.perf_counter()
        sample = data.train.images[:PREPARE_IMAGES]
        net.prepare(Normalizer(data.mean, data.std, torch.device("cpu"))(sample))
        prepare_seconds = time.perf_counter() - start
    if config.freeze_bn_scale:
        freeze_bn_scales(net)
    warm = None
    if resumed is None and config.init_from:  # a resumed run has its own weights in last.pt
        warm = load_matching_weights(net, config.init_from, config.model, data.spec.classes)
    if pretrained is not None:
        warm = _load_pretrained(net, config, model_info, pretrained)
    net.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, net)
    steps = steps_per_epoch(len(data.train), config.batch_size, dist.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factors(config, steps, optimizer))
    lookahead = Lookahead(optimizer, config.lookahead, config.epochs * steps)
    scaler = precision.grad_scaler(device)
    if resumed is not None:
        _load_training_state(resumed, net, optimizer, scheduler, scaler)
    if config.compile:
        compile_in_place(net)  # before DDP, as torch's docs advise
    return Setup(
        net=net,
        train_net=dist.wrap(net, device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        precision=precision,
        model_info=model_info,
        lookahead=lookahead,
        initialised_from=warm,
        prepare_seconds=prepare_seconds,
        balance=balance_weights(
            config.balance, data.train.labels.cpu(), model_info["num_classes"], device
        ),
    )


def _load_pretrained(net: nn.Module, config: TrainConfig, model_info: dict, fetched) -> dict:
    from toolkit.models.pretrained import load_pretrained  # timm: only --pretrained needs it

    dropout = config.model_options.get("dropout", 0.0)
    return load_pretrained(net, config.model, fetched, model_info, dropout)


def _load_training_state(ckpt: Checkpoint, net, optimizer, scheduler, scaler) -> None:
    """Weights, optimizer, schedule and loss scale from last.pt; a mismatch is one clear line."""
    try:
        net.load_state_dict(ckpt.state_dict)
        optimizer.load_state_dict(ckpt.optimizer)
        scheduler.load_state_dict(ckpt.scheduler)
        if ckpt.scaler:  # empty (or absent) when the run had no fp16 loss scaling
            scaler.load_state_dict(ckpt.scaler)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ToolkitError(
            f"last.pt does not fit the model it names ({ckpt.model.get('name')} "
            f"{ckpt.model.get('options')}): {error_summary(exc)}; the file is damaged, "
            "start a new run"
        ) from exc


def selection(data: DataBundle) -> str:
    """How best.pt is chosen, as config.json records it."""
    if len(data.val) == 0:
        return "none: no val split (--val-fraction 0), best.pt holds the final weights"
    return "best val accuracy (the first epoch reaching it)"


def write_config(run_dir: Path, config: TrainConfig, setup: Setup, data, engine: dict) -> None:
    """config.json: every resolved option, plus what the run found (data, engine, versions)."""
    atomic_write_json(
        run_dir / "config.json",
        {
            **asdict(config),
            "num_params": count_parameters(setup.net),
            "dataset_info": data.info(),
            "val_is_carved": data.val_is_carved,
            "test_is_carved": data.test_is_carved,
            "sizes": data.sizes(),
            "class_counts": data.class_counts(),
            "initialised_from": setup.initialised_from,
            "prepare_seconds": setup.prepare_seconds,
            "selection": selection(data),
            "engine": engine,
            "toolkit_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.now().isoformat(timespec="seconds"),
        },
    )
