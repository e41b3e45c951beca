"""`fit`: wire data, model, optimiser and schedule together and write the run folder.

The pieces it wires are small and pure (engine.train_one_epoch, engine.evaluate_split); this
module fills the run folder that toolkit.runs lays out (config.json, metrics.csv, train.log,
TensorBoard events, best.pt / last.pt) and resumes exactly. Under torchrun every rank runs
`fit`; rank 0 alone writes the run folder (see toolkit.distributed for the conventions).
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path

import torch
from torch import nn

from toolkit import __version__, distributed, recipes
from toolkit.atomic import (
    WriteError,
    atomic_write_bytes,
    atomic_write_json,
)
from toolkit.data import DataBundle, DataOptions, load_data
from toolkit.engine import (
    EVAL_BATCH_SIZE,
    Normalizer,
    Precision,
    StepOptions,
    compile_in_place,
    configure_backends,
    evaluate_split,
    on_device,
    pick_device,
    resolve_amp,
    steps_per_epoch,
    train_one_epoch,
)
from toolkit.errors import ToolkitError, error_summary
from toolkit.models import count_parameters, create_model, resolve_options
from toolkit.recipes import lr_factor, make_optimizer
from toolkit.resume import load_resume_state, repair_run_folder
from toolkit.runs import (
    RunLog,
    check_free_space,
    check_writable,
    make_checkpoint,
    new_run_dir,
    open_tensorboard,
    write_metrics,
)

log = logging.getLogger("toolkit.train")

ON_NAN = ("stop", "skip")  # --on-nan: what a non-finite loss does
# What a run writes besides its checkpoints (logs, TensorBoard, eval/ and export/ later).
FREE_SPACE_MARGIN = 64 * 2**20
# Optimizer state per weight in a checkpoint: Adam keeps two moments, SGD one momentum.
OPTIMIZER_SLOTS = 2


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
    cutout: int = 0
    label_smoothing: float = 0.1
    grad_clip: float = 0.0
    on_nan: str = "stop"  # "skip": a batch with a non-finite loss takes no step (ON_NAN)
    seed: int = 0
    device: str = "auto"
    # How the engine runs, not what it learns: --recipe seed keeps its meaning with any of
    # these (config.json's "engine" block records what they resolved to).
    amp: str = "auto"
    compile: bool = False

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["data"] = DataOptions(**d["data"])
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_recipe(
        cls,
        model: str,
        recipe: str,
        data: DataOptions,
        model_options: dict | None = None,
        overrides: dict | None = None,
        **engine,
    ) -> TrainConfig:
        """What `toolkit train MODEL --recipe RECIPE ...` builds: the model's options checked
        against the registry, the recipe's values, then every override that is not None.
        `engine` takes the fields no recipe sets (device, amp, compile)."""
        options = resolve_options(model, **(model_options or {}))
        values = recipes.resolve(recipe, model, overrides or {})
        return cls(model=model, model_options=options, data=data, recipe=recipe, **engine, **values)


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
    is_main: bool = True  # False on the ranks > 0 of a torchrun group, which print nothing


def fit(
    config: TrainConfig,
    run_dir: Path | None = None,
    data: DataBundle | None = None,
    resume: Path | None = None,
) -> RunResult:
    """Train `config` into `run_dir` (or continue `resume`); returns the run's summary.

    Under torchrun (WORLD_SIZE > 1) this joins the process group and trains with DDP.
    """
    state = None
    if resume is not None:
        run_dir = Path(resume)
        state = load_resume_state(run_dir)  # every rank reads it: no broadcast
        config = TrainConfig.from_dict(state["config"])
    resolve_options(config.model, **config.model_options)  # bad options fail before the group
    if config.on_nan not in ON_NAN:
        raise ToolkitError(
            f"unknown --on-nan '{config.on_nan}'; choose one of: {', '.join(ON_NAN)}"
        )
    with distributed.session(pick_device(config.device)) as (dist, device):
        return _fit(config, run_dir, data, state, dist, device)


@dataclass
class _Setup:
    """Everything `_fit` builds before the first epoch."""

    net: nn.Module  # the plain model: evaluated and checkpointed
    train_net: nn.Module  # what the optimizer steps through (DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    precision: Precision
    model_info: dict


def _fit(config, run_dir, data, state, dist: distributed.Context, device) -> RunResult:
    precision = resolve_amp(config.amp, device)
    backends = configure_backends(device)
    if data is None:
        with dist.local_main_first():  # one decode per machine; the others read the cache
            data = load_data(config.data, seed=config.seed)
    _check_data(config, data, state, dist, run_dir)
    run_dir = _agree_run_dir(run_dir, config, dist)
    setup = _build(config, data, state, dist, device, precision)
    _check_free_space(run_dir, setup.net, state is not None, dist)
    config_dict = asdict(config)
    if state is None and dist.is_main:
        engine = {
            "device": str(device),
            "amp": precision.name,
            "compile": config.compile,
            "channels_last": True,
            **backends,
            "eval_batch_size": EVAL_BATCH_SIZE,
            "world_size": dist.world_size,
            "distributed_backend": dist.backend,
            "global_batch_size": config.batch_size,  # split across the processes
        }
        _write_config(run_dir, config_dict, setup, data, engine)
    history = list(state["history"]) if state else []
    # -1, not 0: a first epoch at 0 % val accuracy still writes best.pt.
    best = (state["best_val_acc"], state["best_epoch"]) if state else (-1.0, 0)
    start_epoch = state["epoch"] + 1 if state else 1
    writer = open_tensorboard(run_dir) if dist.is_main else None
    interrupted = False
    epoch = start_epoch - 1
    with RunLog(run_dir) if dist.is_main else contextlib.nullcontext():
        log.info(
            "run %s: %s %s on %s (%d train / %d val), %d params, device %s, amp %s, "
            "compile %s, %d process(es)",
            run_dir,
            config.model,
            setup.model_info["options"],
            data.spec.name,
            len(data.train),
            len(data.val),
            count_parameters(setup.net),
            device,
            precision.name,
            config.compile,
            dist.world_size,
        )
        if state is not None and dist.is_main:
            repair_run_folder(run_dir, state)
        train, val = on_device(data.train, device), on_device(data.val, device)
        normalize = Normalizer(data.mean, data.std, device)
        try:
            for epoch in range(start_epoch, config.epochs + 1):
                lr = setup.optimizer.param_groups[0]["lr"]  # the lr the epoch starts with
                result = _train_epoch(config, setup, train, normalize, epoch, dist, device, run_dir)
                if result.skipped and dist.is_main:
                    log.warning(
                        "epoch %d: skipped %d of %d batches whose loss or gradients were not "
                        "finite (--on-nan skip)",
                        epoch,
                        result.skipped,
                        result.batches,
                    )
                # DDP synchronised the parameters; this syncs BatchNorm's running statistics,
                # so every rank evaluates (and rank 0 saves) one and the same model.
                dist.broadcast_buffers(setup.net)
                # fp32, like `toolkit evaluate` and the ONNX export: best.pt's val accuracy is
                # the one those report.
                val_loss, val_acc = evaluate_split(setup.net, val, normalize, device)
                row = _metrics_row(epoch, result, val_loss, val_acc, lr)
                history.append(row)
                if val_acc > best[0]:
                    best = (val_acc, epoch)
                if dist.is_main:
                    _record_epoch(run_dir, writer, setup, data, config_dict, history, best)
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
        if dist.is_distributed and not interrupted:
            _check_replicas(setup.net, dist)

    best_file = run_dir / "best.pt"
    return RunResult(
        run_dir=run_dir,
        best_val_acc=best[0],
        best_epoch=best[1],
        epochs_done=len(history),
        train_seconds=sum(r["seconds"] for r in history),
        num_params=count_parameters(setup.net),
        checkpoint_bytes=best_file.stat().st_size if best_file.exists() else 0,
        interrupted=interrupted,
        is_main=dist.is_main,
    )


def _check_data(config: TrainConfig, data: DataBundle, state, dist, run_dir) -> None:
    """The data must be what a resumed run started on, the same on every rank, and fit
    the batch/cutout settings."""
    if state is not None and state["dataset"]["fingerprint"] != data.fingerprint:
        raise ToolkitError(
            f"the data of '{run_dir}' has changed since it started (fingerprint "
            f"{data.fingerprint[:12]} != {state['dataset']['fingerprint'][:12]}); "
            "resume needs the same files"
        )
    if len(set(dist.gather_objects(data.fingerprint))) > 1:
        raise ToolkitError(
            "the ranks loaded different data; every machine needs the same files "
            "(--data-dir / --splits / --data-root)"
        )
    if config.cutout > data.image_size:
        raise ToolkitError(
            f"--cutout {config.cutout} is larger than the {data.image_size}px images"
        )
    need = 2 * dist.world_size  # every rank needs two images per step for BatchNorm
    if dist.is_distributed and (config.batch_size < need or len(data.train) < need):
        raise ToolkitError(
            f"--batch-size {config.batch_size} is the global batch, split over "
            f"{dist.world_size} processes; each needs at least 2 images per step: use "
            f"--batch-size {need} or more (and at least {need} training images)"
        )


def _agree_run_dir(run_dir: Path | None, config: TrainConfig, dist) -> Path:
    """Rank 0 picks (default name) and checks the run folder; every rank gets its path, or
    the same error, so no rank is left waiting for the others."""
    picked, error = None, None
    if dist.is_main:
        try:
            picked = Path(run_dir) if run_dir else new_run_dir(config.data.dataset, config.model)
            check_writable(picked, "run folder", "--run-dir")
        except ToolkitError as exc:
            error = str(exc)
    picked, error = dist.broadcast_object((str(picked) if picked else None, error))
    if error:
        raise ToolkitError(error)
    return Path(picked)


def _check_free_space(run_dir: Path, net: nn.Module, resuming: bool, dist) -> None:
    """Refuse to start a run its disk cannot hold, rather than fail at a checkpoint later.

    Rank 0 checks; every rank gets the verdict, so none is left waiting for the others.
    """
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


def _build(config, data: DataBundle, state, dist, device, precision: Precision) -> _Setup:
    options = resolve_options(config.model, **config.model_options)
    torch.manual_seed(config.seed)  # initial weights: the same on every rank
    net = create_model(
        config.model,
        num_classes=data.spec.num_classes,
        input_size=data.image_size,
        in_channels=data.spec.channels,
        **options,
    )
    net.to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(config, net)
    steps = steps_per_epoch(len(data.train), config.batch_size, dist.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config, steps))
    scaler = precision.grad_scaler(device)
    if state is not None:
        _load_training_state(state, net, optimizer, scheduler, scaler)
    if config.compile:
        compile_in_place(net)  # before DDP, as torch's docs advise
    model_info = {
        "name": config.model,
        "options": options,
        "num_classes": data.spec.num_classes,
        "input_size": data.image_size,
        "in_channels": data.spec.channels,
    }
    return _Setup(
        net=net,
        train_net=dist.wrap(net, device),
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        precision=precision,
        model_info=model_info,
    )


def _load_training_state(state: dict, net, optimizer, scheduler, scaler) -> None:
    """Weights, optimizer, schedule and loss scale from last.pt; a mismatch is one clear line."""
    try:
        net.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ToolkitError(
            f"last.pt does not fit the model it names ({state['model'].get('name')} "
            f"{state['model'].get('options')}): {error_summary(exc)}; the file is damaged, "
            "start a new run"
        ) from exc


def _write_config(run_dir: Path, config_dict: dict, setup: _Setup, data, engine: dict) -> None:
    atomic_write_json(
        run_dir / "config.json",
        {
            **config_dict,
            "model_options": setup.model_info["options"],
            "num_params": count_parameters(setup.net),
            "dataset_info": data.info(),
            "val_is_carved": data.val_is_carved,
            "sizes": {
                "train": len(data.train),
                "val": len(data.val),
                "test": len(data.test) if data.test is not None else 0,
            },
            "engine": engine,
            "toolkit_version": __version__,
            "torch_version": torch.__version__,
            "created": datetime.now().isoformat(timespec="seconds"),
        },
    )


def _train_epoch(config, setup: _Setup, train, normalize, epoch, dist, device, run_dir):
    """One epoch, seeded from (seed, epoch); failures become ToolkitErrors naming the fix."""
    # Every epoch re-seeds from (seed, epoch): order, augmentation and dropout do not depend
    # on what ran before, so a resumed run is bit-identical. The order and augmentation
    # generator is the same on every rank (they shard one global order); dropout gets a
    # stream per rank, rank 0 keeping the single-process one.
    epoch_seed = config.seed * 100_003 + epoch
    generator = torch.Generator().manual_seed(epoch_seed)
    torch.manual_seed(epoch_seed + dist.rank * 2**32)
    options = StepOptions(
        batch_size=config.batch_size,
        augment=config.augment,
        cutout=config.cutout,
        label_smoothing=config.label_smoothing,
        grad_clip=config.grad_clip,
        precision=setup.precision,
        skip_nonfinite=config.on_nan == "skip",
    )
    try:
        return train_one_epoch(
            setup.train_net,
            train,
            normalize,
            setup.optimizer,
            setup.scheduler,
            options,
            generator=generator,
            device=device,
            scaler=setup.scaler,
            dist=dist,
            description=f"epoch {epoch}/{config.epochs}",
        )
    except FloatingPointError as exc:
        hint = "try a lower --lr"
        if config.on_nan == "stop":
            hint += ", or --on-nan skip to step over rare bad batches"
        raise ToolkitError(
            f"training diverged in epoch {epoch} ({exc}); {_last_good(run_dir, epoch)}; {hint}"
        ) from exc
    except Exception as exc:
        if config.compile and _is_compile_failure(exc):
            raise ToolkitError(
                f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                "train without --compile"
            ) from exc
        raise


def _last_good(run_dir: Path, epoch: int) -> str:
    if epoch == 1:
        return f"no epoch finished, so there is no {run_dir / 'last.pt'} to go back to"
    return f"the last good checkpoint is {run_dir / 'last.pt'} (epoch {epoch - 1})"


def _is_compile_failure(exc: Exception) -> bool:
    # Dynamo/Inductor errors (no C++ compiler, an unsupported op...) all derive from this.
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException)


def _metrics_row(epoch: int, result, val_loss: float, val_acc: float, lr: float) -> dict:
    """One metrics.csv row (METRIC_COLUMNS)."""
    return {
        "epoch": epoch,
        "train_loss": result.loss,
        "train_acc": result.acc,
        "val_loss": val_loss,
        "val_acc": val_acc,
        "lr": lr,
        "seconds": result.seconds,
        "img_per_s": result.images_per_second,
        # Not a metrics.csv column (its format stays fixed): kept in the checkpoint's history.
        "skipped_batches": result.skipped,
    }


def _record_epoch(run_dir, writer, setup: _Setup, data, config_dict, history, best) -> None:
    """Log an epoch and write its files: TensorBoard, best.pt / last.pt, metrics.csv."""
    row = history[-1]
    epoch = row["epoch"]
    log.info(
        "epoch %d: train loss %.4f acc %.4f | val loss %.4f acc %.4f | %.1fs",
        epoch,
        row["train_loss"],
        row["train_acc"],
        row["val_loss"],
        row["val_acc"],
        row["seconds"],
    )
    if writer is not None:
        for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
            group, name = key.split("_", 1) if key != "lr" else ("opt", "lr")
            writer.add_scalar(f"{name}/{group}", row[key], epoch)
        if config_dict.get("on_nan") == "skip":
            writer.add_scalar("skipped_batches/train", row["skipped_batches"], epoch)
        writer.flush()
    ckpt = make_checkpoint(
        net=setup.net,
        model_info=setup.model_info,
        dataset_info=data.info(),
        epoch=epoch,
        metrics=row,
        best_val_acc=best[0],
        best_epoch=best[1],
        config=config_dict,
        optimizer=setup.optimizer,
        scheduler=setup.scheduler,
    )
    ckpt["history"] = history
    if setup.scaler is not None:
        ckpt["scaler"] = setup.scaler.state_dict()
    # last.pt first: it is the epoch's commit point. A kill before its rename loses this
    # epoch only; a kill after it leaves best.pt / metrics.csv behind, which resume repairs
    # from last.pt (toolkit.resume.repair_run_folder).
    # Serialized once: an improving epoch's best.pt is last.pt byte for byte, which is also
    # what repair_run_folder restores it from.
    buffer = io.BytesIO()
    torch.save(ckpt, buffer)
    try:
        atomic_write_bytes(run_dir / "last.pt", buffer.getvalue())
        if best[1] == epoch:
            atomic_write_bytes(run_dir / "best.pt", buffer.getvalue())
        write_metrics(run_dir, history)
    except WriteError as exc:
        raise ToolkitError(f"{exc}; fix that, then: toolkit train --resume {run_dir}") from exc


def _check_replicas(net: nn.Module, dist: distributed.Context) -> None:
    """Log every rank's weights digest (train.log): equal digests prove the replicas agree."""
    digests = dist.gather_objects(distributed.state_digest(net))
    log.info("final weights sha1 by rank: %s", " ".join(digests))
    if len(set(digests)) > 1:
        log.error("the DDP replicas ended with different weights; report this as a bug")
