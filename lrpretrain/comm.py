"""Process-group helpers: rank, world size, collectives, DTensor shards.

Single-process runs see rank 0 of 1 and every collective is a no-op. This module imports nothing of
lrpretrain, so every part may use it (optimizers and methods read FSDP2 shards; the loop reduces
losses); the strategies (``distributed.strategy``) live in :mod:`lrpretrain.distributed.strategy`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else int(os.environ.get("WORLD_SIZE", "1"))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` as rank ``src`` has it, on every rank (any picklable object)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_main(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only; every rank returns its result, or raises its error.

    A refusal on rank 0 (say, an existing run directory) must stop every rank with the same message,
    not leave the others waiting in the next collective. The error travels as (type, message): user
    errors keep their class, so the CLI prints the same one line on every rank.
    """
    result: Any = None
    error: tuple[type[BaseException], str] | None = None
    if rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, on every rank
            if not is_distributed():
                raise
            error = (type(e), str(e))
    result, error = broadcast_object((result, error))
    if error is not None:
        cls, msg = error
        try:
            raise cls(msg)
        except TypeError:  # an exception class that cannot be built from one message
            raise RuntimeError(f"{cls.__name__} on rank 0: {msg}") from None
    return result


def shard_rows(p: DTensor) -> slice:
    """The rows of the full matrix that this rank's FSDP2 shard (``Shard(0)``, torch.chunk sizes) holds."""
    (placement,) = p.placements
    if placement != Shard(0):
        raise ValueError(f"expected a parameter sharded on dim 0, got {p.placements}")
    n, world, r = p.shape[0], p.device_mesh.size(), p.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start = min(r * chunk, n)
    return slice(start, start + p.to_local().shape[0])


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t
