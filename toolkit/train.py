"""`fit`: wire data, model, optimiser and schedule together and write the run folder.

The pieces it wires are small and pure (engine.train_one_epoch, engine.evaluate_split); this
module owns the run folder: config.json, metrics.csv, train.log, TensorBoard events,
best.pt / last.pt, and exact resume.
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from toolkit import __version__
from toolkit.data import DataBundle, DataOptions, load_data
from toolkit.engine import Normalizer, evaluate_split, pick_device, train_one_epoch
from toolkit.errors import ToolkitError
from toolkit.models import count_parameters, create_model, resolve_options
from toolkit.runs import (
    atomic_torch_save,
    atomic_write_json,
    load_checkpoint,
    make_checkpoint,
    new_run_dir,
    write_csv_rows,
)

log = logging.getLogger("toolkit.train")

METRIC_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "img_per_s",
)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a run, resolved (recipe + overrides); config.json is its asdict()."""

    model: str
    model_options: dict = field(default_factory=dict)
    data: DataOptions = field(default_factory=DataOptions)
    recipe: str = "default"
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    l2: float = 5e-4
    schedule: str = "onecycle"
    step_size: int = 20
    gamma: float = 0.5
    warmup_epochs: float = 0.0
    augment: bool = True
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["data"] = DataOptions(**d["data"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def make_optimizer(config: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    params = net.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov and config.momentum > 0,
            weight_decay=config.l2,
        )
    if config.optimizer == "adam":  # coupled L2, as the reference's Adam(weight_decay=...)
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.l2)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.l2)


def lr_factor(config: TrainConfig, steps_per_epoch: int):
    """Multiplier of the base lr at optimizer step `step` (LambdaLR: resumes from a counter)."""
    total = config.epochs * steps_per_epoch
    warmup = int(config.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if config.schedule == "none":
            return 1.0
        if config.schedule == "step":  # StepLR stepped per epoch, as the reference
            return config.gamma ** ((step // steps_per_epoch) // config.step_size)
        if config.schedule == "onecycle":
            # Linear up to the peak at 25 % of training, linear down to zero.
            peak = max(1, int(0.25 * total))
            if step < peak:
                return 0.04 + 0.96 * step / peak
            return max(0.0, (total - step) / max(1, total - peak))
        # cosine, with an optional linear warm-up
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class RunResult:
    run_dir: Path
    best_val_acc: float
    best_epoch: int
    epochs_done: int
    train_seconds: float
    num_params: int
    checkpoint_bytes: int
    interrupted: bool = False


class _RunLog:
    """train.log in the run folder for the duration of a run."""

    def __init__(self, run_dir: Path):
        self.handler = logging.FileHandler(run_dir / "train.log")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.logger = logging.getLogger("toolkit")

    def __enter__(self):
        self.logger.addHandler(self.handler)
        if self.logger.level == logging.NOTSET or self.logger.level > logging.INFO:
            self.logger.setLevel(logging.INFO)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.handler.close()


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
        log.warning("tensorboard not installed; skipping TensorBoard events")
        return None


def _check_writable(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as exc:
        raise ToolkitError(f"cannot write to run folder '{run_dir}': {exc.strerror}") from exc


def fit(
    config: TrainConfig,
    run_dir: Path | None = None,
    data: DataBundle | None = None,
    resume: Path | None = None,
) -> RunResult:
    """Train `config` into `run_dir` (or continue `resume`); returns the run's summary."""
    start_epoch, history, best, state = 1, [], (0.0, 0), None
    if resume is not None:
        run_dir = Path(resume)
        state = load_checkpoint(run_dir / "last.pt")
        config = TrainConfig.from_dict(state["config"])
        start_epoch = state["epoch"] + 1
        history = list(state["history"])
        best = (state["best_val_acc"], state["best_epoch"])
    options = resolve_options(config.model, **config.model_options)
    device = pick_device(config.device)
    if data is None:
        data = load_data(config.data, seed=config.seed)
    if state is not None and state["dataset"]["fingerprint"] != data.fingerprint:
        raise ToolkitError(
            f"the data of '{run_dir}' has changed since it started; resume needs the same files"
        )
    run_dir = Path(run_dir) if run_dir else new_run_dir(config.data.dataset, config.model)
    _check_writable(run_dir)

    torch.manual_seed(config.seed)  # initial weights
    net = create_model(
        config.model,
        num_classes=data.spec.num_classes,
        input_size=data.image_size,
        in_channels=data.spec.channels,
        **options,
    )
    net.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, net)
    steps_per_epoch = _steps_per_epoch(len(data.train), config.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps_per_epoch))
    if state is not None:
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])

    num_params = count_parameters(net)
    model_info = {
        "name": config.model,
        "options": options,
        "num_classes": data.spec.num_classes,
        "input_size": data.image_size,
        "in_channels": data.spec.channels,
    }
    config_dict = asdict(config)
    if state is None:
        atomic_write_json(
            run_dir / "config.json",
            {
                **config_dict,
                "model_options": options,
                "num_params": num_params,
                "dataset_info": data.info(),
                "val_is_carved": data.val_is_carved,
                "sizes": {
                    "train": len(data.train),
                    "val": len(data.val),
                    "test": len(data.test) if data.test is not None else 0,
                },
                "toolkit_version": __version__,
                "torch_version": torch.__version__,
                "created": datetime.now().isoformat(timespec="seconds"),
            },
        )

    normalize = Normalizer(data.mean, data.std, device)
    writer = _tensorboard(run_dir)
    interrupted = False
    epoch = start_epoch - 1
    with _RunLog(run_dir):
        log.info(
            "run %s: %s %s on %s (%d train / %d val), %d params, device %s",
            run_dir,
            config.model,
            options,
            data.spec.name,
            len(data.train),
            len(data.val),
            num_params,
            device,
        )
        try:
            for epoch in range(start_epoch, config.epochs + 1):
                # Every epoch re-seeds from (seed, epoch): order, augmentation and dropout do
                # not depend on what ran before, so a resumed run is bit-identical.
                generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
                torch.manual_seed(config.seed * 100_003 + epoch)
                lr = optimizer.param_groups[0]["lr"]
                try:
                    result = train_one_epoch(
                        net,
                        data.train,
                        normalize,
                        optimizer,
                        scheduler,
                        batch_size=config.batch_size,
                        augment=config.augment,
                        label_smoothing=config.label_smoothing,
                        grad_clip=config.grad_clip,
                        generator=generator,
                        device=device,
                        description=f"epoch {epoch}/{config.epochs}",
                    )
                except FloatingPointError as exc:
                    raise ToolkitError(
                        f"training diverged in epoch {epoch} ({exc}); the last good checkpoint "
                        f"is {run_dir / 'last.pt'} (epoch {epoch - 1}); try a lower --lr"
                    ) from exc
                val_loss, val_acc = evaluate_split(net, data.val, normalize, device)
                row = {
                    "epoch": epoch,
                    "train_loss": result.loss,
                    "train_acc": result.acc,
                    "val_loss": val_loss,
                    "val_acc": val_acc,
                    "lr": lr,
                    "seconds": result.seconds,
                    "img_per_s": result.images_per_second,
                }
                history.append(row)
                log.info(
                    "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs",
                    epoch,
                    result.loss,
                    result.acc,
                    val_loss,
                    val_acc,
                    result.seconds,
                )
                if writer is not None:
                    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
                        group, name = key.split("_", 1) if key != "lr" else ("opt", "lr")
                        writer.add_scalar(f"{name}/{group}", row[key], epoch)
                    writer.flush()
                if val_acc > best[0]:
                    best = (val_acc, epoch)
                ckpt = make_checkpoint(
                    net=net,
                    model_info=model_info,
                    dataset_info=data.info(),
                    epoch=epoch,
                    metrics=row,
                    best_val_acc=best[0],
                    best_epoch=best[1],
                    config=config_dict,
                    optimizer=optimizer,
                    scheduler=scheduler,
                )
                ckpt["history"] = history
                if best[1] == epoch:
                    atomic_torch_save(run_dir / "best.pt", ckpt)
                atomic_torch_save(run_dir / "last.pt", ckpt)
                write_csv_rows(
                    run_dir / "metrics.csv",
                    METRIC_COLUMNS,
                    [[r[c] for c in METRIC_COLUMNS] for r in history],
                )
        except KeyboardInterrupt:
            interrupted = True
            log.warning(
                "interrupted in epoch %d; last.pt holds epoch %d. Continue with: "
                "toolkit train --resume %s",
                epoch,
                epoch - 1,
                run_dir,
            )
        finally:
            if writer is not None:
                writer.close()

    best_file = run_dir / "best.pt"
    return RunResult(
        run_dir=run_dir,
        best_val_acc=best[0],
        best_epoch=best[1],
        epochs_done=len(history),
        train_seconds=sum(r["seconds"] for r in history),
        num_params=num_params,
        checkpoint_bytes=best_file.stat().st_size if best_file.exists() else 0,
        interrupted=interrupted,
    )


def _steps_per_epoch(n: int, batch_size: int) -> int:
    steps = math.ceil(n / batch_size)
    if steps > 1 and n % batch_size == 1:
        steps -= 1  # the batch of one that train_one_epoch drops
    return steps


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.csv as a list of dicts with float values (epoch as int)."""
    path = Path(run_dir) / "metrics.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [
            {k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()}
            for row in csv.DictReader(f)
        ]
