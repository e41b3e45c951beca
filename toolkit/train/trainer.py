"""`fit(config, run_dir)` trains a new run; `resume(run_dir)` continues one exactly.

Both fill the run folder (toolkit.run.folder): config.json, metrics.csv, train.log,
TensorBoard events, and every epoch one Checkpoint written to last.pt, and to best.pt when
the epoch is the best so far (toolkit.run.state.best_row decides, for every reader alike).
Under torchrun every rank runs this code; rank 0 alone writes the run folder (see
toolkit.train.distributed for the conventions).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from toolkit import seams
from toolkit.atomic import WriteError, atomic_write_bytes
from toolkit.data import DataBundle, load_data
from toolkit.errors import ToolkitError, first_line
from toolkit.evaluate.chance import learned_nothing
from toolkit.models import count_parameters, resolve_options
from toolkit.run.checkpoint import Checkpoint
from toolkit.run.folder import RunLog, open_tensorboard, write_metrics
from toolkit.run.resume import load_resume_state, repair_run_folder
from toolkit.run.state import best_row
from toolkit.train import distributed
from toolkit.train.batches import Normalizer, alternating_flips, on_device
from toolkit.train.caveats import log_data_caveats
from toolkit.train.config import TrainConfig
from toolkit.train.engine import (
    StepOptions,
    configure_backends,
    eval_batch_size,
    evaluate_split,
    pick_device,
    predict_logits,
    train_one_epoch,
)
from toolkit.train.fit_data import fit_to_data
from toolkit.train.precision import resolve_amp
from toolkit.train.setup import (
    Setup,
    agree_run_dir,
    build,
    check_data,
    check_run_space,
    write_config,
)

log = logging.getLogger("toolkit.train")


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
    learned_nothing: str | None = None  # why val says the model is at chance (evaluate.chance)


def fit(config: TrainConfig, run_dir: Path | None = None, data: DataBundle | None = None):
    """Train `config` into `run_dir` (default runs/<dataset>-<model>-<time>); the summary.

    `data` is the already loaded bundle of `config.data`, when the caller has one. Under
    torchrun (WORLD_SIZE > 1) this joins the process group and trains with DDP.
    """
    return _run(config, run_dir, data, resumed=None)


def resume(run_dir: Path, data: DataBundle | None = None) -> RunResult:
    """Continue the run in `run_dir` from its last.pt, with the options it started with."""
    run_dir = Path(run_dir)
    resumed = load_resume_state(run_dir)  # every rank reads it: no broadcast
    return _run(TrainConfig.from_dict(resumed.config), run_dir, data, resumed)


def _run(config, run_dir, data, resumed: Checkpoint | None) -> RunResult:
    # The model's options with their defaults; bad ones fail here, before the process group.
    config = replace(config, model_options=resolve_options(config.model, **config.model_options))
    pretrained = _fetch_pretrained(config) if resumed is None and config.pretrained else None
    with distributed.session(pick_device(config.device)) as (dist, device):
        return _train(config, run_dir, data, resumed, dist, device, pretrained)


def _fetch_pretrained(config: TrainConfig):
    from toolkit.models.pretrained import fetch  # timm: only --pretrained runs import it

    return fetch(config.model, config.pretrained)


def _train(config, run_dir, data, resumed, dist, device, pretrained) -> RunResult:
    precision = resolve_amp(config.amp, device)
    backends = configure_backends(device)
    if data is None:
        with dist.local_main_first():  # one decode per machine; the others read the cache
            data = load_data(config.data, seed=config.seed)
    if config.normalization:  # pretrained weights expect their own mean/std, not the data's
        norm = config.normalization
        data = replace(data, mean=tuple(norm["mean"]), std=tuple(norm["std"]))
    if resumed is None:
        config = fit_to_data(config, len(data.train))
    check_data(config, data, resumed, dist, run_dir)
    run_dir = agree_run_dir(run_dir, config, data, dist)
    setup = build(config, data, resumed, dist, device, precision, pretrained)
    check_run_space(run_dir, setup.net, resumed is not None, dist)
    if resumed is None and dist.is_main:
        engine = {
            "device": str(device),
            "amp": precision.name,
            "compile": config.compile,
            "channels_last": True,
            **backends,
            "eval_batch_size": eval_batch_size(device),
            "world_size": dist.world_size,
            "distributed_backend": dist.backend,
            "global_batch_size": config.batch_size,  # split across the processes
        }
        write_config(run_dir, config, setup, data, engine)
    history = list(resumed.history) if resumed else []
    start_epoch = resumed.epoch + 1 if resumed else 1
    writer = open_tensorboard(run_dir) if dist.is_main else None
    interrupted = False
    epoch = start_epoch - 1
    with RunLog(run_dir) if dist.is_main else contextlib.nullcontext():
        log.info(
            "run %s: %s %s on %s (%d train / %d val), %d params, device %s, amp %s, "
            "compile %s, %d process(es)",
            run_dir,
            config.model,
            config.model_options,
            data.spec.name,
            len(data.train),
            len(data.val),
            count_parameters(setup.net),
            device,
            precision.name,
            config.compile,
            dist.world_size,
        )
        if dist.is_main:
            log_data_caveats(data, config, resumed is not None)
        if resumed is not None and dist.is_main:
            repair_run_folder(run_dir, resumed)
        train, val = on_device(data.train, device), on_device(data.val, device)
        normalize = Normalizer(data.mean, data.std, device)
        try:
            for epoch in range(start_epoch, config.epochs + 1):
                seams.EPOCH_START(epoch=epoch)
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
                # the one those report. No val (--val-fraction 0): NaN, not a made-up number.
                val_loss, val_acc = (
                    evaluate_split(setup.net, val, normalize, device)
                    if len(val)
                    else (float("nan"), float("nan"))
                )
                history.append(_metrics_row(epoch, result, val_loss, val_acc, lr))
                if dist.is_main:
                    _record_epoch(run_dir, writer, config, setup, data, history)
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
        verdict = None
        if dist.is_main and not interrupted and len(val):
            # best.pt's answers: the model evaluate, export and the app will use.
            best_net = Checkpoint.load(run_dir / "best.pt").build_net().to(device)
            predicted = predict_logits(best_net, val.images, normalize, device).argmax(1)
            verdict = learned_nothing(predicted, val.labels.cpu(), data.spec.classes)
            if verdict:
                log.warning("no sign this run learned anything: on val %s", verdict)

    best = best_row(history) or {"val_acc": 0.0, "epoch": 0}  # stopped in epoch 1
    best_file = run_dir / "best.pt"
    return RunResult(
        run_dir=run_dir,
        best_val_acc=best["val_acc"],
        best_epoch=best["epoch"],
        epochs_done=len(history),
        train_seconds=sum(r["seconds"] for r in history),
        num_params=count_parameters(setup.net),
        checkpoint_bytes=best_file.stat().st_size if best_file.exists() else 0,
        interrupted=interrupted,
        is_main=dist.is_main,
        learned_nothing=verdict,
    )


def _train_epoch(config, setup: Setup, train, normalize, epoch, dist, device, run_dir):
    """One epoch, seeded from (seed, epoch); failures become ToolkitErrors naming the fix."""
    # Every epoch re-seeds from (seed, epoch): order, augmentation and dropout do not depend
    # on what ran before, so a resumed run is bit-identical. The order and augmentation
    # generator is the same on every rank (they shard one global order); dropout gets a
    # stream per rank, rank 0 keeping the single-process one.
    epoch_seed = config.seed * 100_003 + epoch
    generator = torch.Generator().manual_seed(epoch_seed)
    torch.manual_seed(epoch_seed + dist.rank * 2**32)
    if hasattr(setup.net, "start_epoch"):  # e.g. speedrun freezes its whitening bias
        setup.net.start_epoch(epoch)
    options = StepOptions(
        batch_size=config.batch_size,
        micro_batch=config.micro_batch,
        augment=config.augment,
        cutout=config.cutout,
        translate=config.translate,
        flips=alternating_flips(len(train), config.seed, epoch) if config.alt_flip else None,
        resized_crop=config.resized_crop,
        label_smoothing=config.label_smoothing,
        **setup.balance,
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
            after_step=setup.lookahead.after_step,
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
                f"torch.compile failed ({type(exc).__name__}: {first_line(exc)}); "
                "train without --compile"
            ) from exc
        raise


def _last_good(run_dir: Path, epoch: int) -> str:
    if epoch == 1:
        return f"no epoch finished, so there is no {run_dir / 'last.pt'} to go back to"
    return f"the last good checkpoint is {run_dir / 'last.pt'} (epoch {epoch - 1})"


def _is_compile_failure(exc: Exception) -> bool:
    # Dynamo/Inductor errors (no C++ compiler, an unsupported op...) all derive from this;
    # imported only when something failed, since it loads the whole compiler stack.
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


def _record_epoch(run_dir, writer, config: TrainConfig, setup: Setup, data, history) -> None:
    """Log an epoch and write its files: TensorBoard, last.pt / best.pt, metrics.csv."""
    row, best = history[-1], best_row(history)
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
        if config.on_nan == "skip":
            writer.add_scalar("skipped_batches/train", row["skipped_batches"], epoch)
        writer.flush()
    checkpoint = Checkpoint(
        model=setup.model_info,
        dataset=data.info(),
        config=asdict(config),
        epoch=epoch,
        metrics=row,
        best_val_acc=best["val_acc"],
        best_epoch=best["epoch"],
        history=history,
        state_dict=setup.net.state_dict(),
        optimizer=setup.optimizer.state_dict(),
        scheduler=setup.scheduler.state_dict(),
        scaler=setup.scaler.state_dict(),
    )
    # last.pt first: it is the epoch's commit point. A kill before its rename loses this
    # epoch only; a kill after it leaves best.pt / metrics.csv behind, which resume repairs
    # from last.pt (toolkit.run.resume.repair_run_folder).
    # Serialized once: an improving epoch's best.pt is last.pt byte for byte, which is also
    # what repair_run_folder restores it from.
    payload = checkpoint.to_bytes()
    try:
        atomic_write_bytes(run_dir / "last.pt", payload)
        if best["epoch"] == epoch:
            atomic_write_bytes(run_dir / "best.pt", payload)
        write_metrics(run_dir, history)
    except WriteError as exc:
        raise ToolkitError(f"{exc}; fix that, then: toolkit train --resume {run_dir}") from exc


def _check_replicas(net: nn.Module, dist: distributed.Context) -> None:
    """Log every rank's weights digest (train.log): equal digests prove the replicas agree."""
    digests = dist.gather_objects(distributed.state_digest(net))
    log.info("final weights sha1 by rank: %s", " ".join(digests))
    if len(set(digests)) > 1:
        log.error("the DDP replicas ended with different weights; report this as a bug")
