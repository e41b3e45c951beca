"""Process-group plumbing for `torchrun ... -m toolkit train` (DistributedDataParallel).

torchrun starts one process per device and tells each who it is through environment
variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). `session` reads them,
joins the group (nccl on CUDA, gloo on the CPU) and hands training a `Context`; without
torchrun the context is the single-process one and every method is a no-op, so the training
code has one path.

Conventions the rest of the toolkit relies on:
- ``--batch-size`` is the *global* batch: each optimizer step takes one batch of the
  single-process order and splits it into contiguous per-rank chunks, so a recipe means the
  same thing on 1 or 8 devices (same steps per epoch, same schedule);
- rank 0 alone writes the run folder; every rank reads the data (and, for ``--resume``, the
  run's ``last.pt``) itself.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from toolkit.errors import ToolkitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Context:
    """Who this process is in the group; the defaults describe a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes files and shows progress."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of a global batch of `n` (sizes differ by at most 1)."""
        return slice(n * self.rank // self.world_size, n * (self.rank + 1) // self.world_size)

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over all ranks, in place; returns it."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (anything picklable)."""
        if not self.is_distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.is_distributed:
            return [obj]
        out: list = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_buffers(self, net: nn.Module) -> None:
        """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

        DDP keeps parameters identical but each rank's last forward updates its own running
        statistics; after this every rank evaluates, and would save, the same model.
        """
        if self.is_distributed:
            for buffer in net.buffers():
                dist.broadcast(buffer, src=0)

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    @contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Run the block on each machine's local rank 0 first, then on the others.

        Used for loading data: the first process decodes and writes the cache, the others
        then read it instead of decoding the same files again at the same time.
        """
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def wrap(self, net: nn.Module, device: torch.device) -> nn.Module:
        """DistributedDataParallel around `net` when there are several ranks, else `net`."""
        if not self.is_distributed:
            return net
        device_ids = [device.index] if device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(net, device_ids=device_ids)


SINGLE = Context()


def launched_by_torchrun() -> bool:
    """True when the environment describes a group of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError) as exc:
        raise ToolkitError(
            f"WORLD_SIZE is set but {name} is missing or not a number; start several "
            "processes with `torchrun --nproc-per-node N -m toolkit train ...`"
        ) from exc


def context_from_env(backend: str | None = None) -> Context:
    """The Context torchrun's environment variables describe."""
    if not launched_by_torchrun():
        return SINGLE
    world = _env_int("WORLD_SIZE")
    rank, local_rank = _env_int("RANK"), _env_int("LOCAL_RANK")
    return Context(rank=rank, world_size=world, local_rank=local_rank, backend=backend)


def _rank_device(device: torch.device, local_rank: int) -> torch.device:
    """One GPU per process: local rank i trains on cuda:i."""
    if device.type != "cuda":
        return device
    if local_rank >= torch.cuda.device_count():
        raise ToolkitError(
            f"local rank {local_rank} has no GPU of its own ({torch.cuda.device_count()} "
            "visible); use --nproc-per-node at most the number of GPUs"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def session(device: torch.device) -> Iterator[tuple[Context, torch.device]]:
    """Join the process group torchrun describes (if any) for the duration of the block.

    Yields the Context and the device this process trains on (cuda:LOCAL_RANK under DDP).
    A group that is already initialised (by a caller) is used as is and left open.
    """
    if not launched_by_torchrun():
        yield SINGLE, device
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.is_initialized():
        ctx = context_from_env(dist.get_backend())
        yield ctx, _rank_device(device, ctx.local_rank)
        return
    ctx = context_from_env(backend)
    device = _rank_device(device, ctx.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # device_id binds the group to this GPU (nccl connects eagerly, barriers know the device).
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    if not ctx.is_main:
        # Every rank runs the same code; only rank 0 talks to the console about progress.
        logging.getLogger("toolkit").setLevel(logging.WARNING)
    log.info("process group: %d ranks, backend %s", ctx.world_size, backend)
    try:
        yield ctx, device
        # Every rank arrives before any tears down: a group destroyed while a peer still has
        # gloo work in flight can abort (std::terminate) in gloo's threads at exit.
        dist.barrier()
    finally:
        # DDP's reducer holds the group and its pending work; free it (reference cycles
        # included) while the interpreter is fully alive, then destroy the group.
        gc.collect()
        dist.destroy_process_group()


def state_digest(net_or_state: nn.Module | dict) -> str:
    """SHA-1 of a model's state_dict (names, dtypes, shapes, values) in key order.

    Equal digests on every rank prove DDP kept the replicas identical; the digest of a
    checkpoint's state_dict equals the digest of the model that wrote it.
    """
    state = net_or_state.state_dict() if isinstance(net_or_state, nn.Module) else net_or_state
    digest = hashlib.sha1()
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype, as bytes
    return digest.hexdigest()
