"""Processes under `torchrun`: which one this is, and the few collective steps the stages need.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process, so the
same command runs on one CPU, one GPU or many.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from .errors import EvlCacheError

T = TypeVar("T")


@dataclass(frozen=True)
class Process:
    """This process's place in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # processes on this node

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local process under torchrun."""
        if device.type == "cuda" and self.world_size > 1:
            return torch.device("cuda", self.local_rank)
        return device


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun job (works before the job is joined)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_process(device: torch.device) -> Process:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo otherwise)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Process()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # the main process evaluates alone between epochs: give the others time to wait for it
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return Process(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def barrier(process: Process) -> None:
    if process.world_size > 1:
        dist.barrier()


def sum_across(process: Process, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all processes."""
    if process.world_size == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(process: Process, value: object) -> list:
    """`value` from every process, in rank order."""
    if process.world_size == 1:
        return [value]
    values: list = [None] * process.world_size
    dist.all_gather_object(values, value)
    return values


def raise_together(process: Process, error: EvlCacheError | None) -> None:
    """If any process hit a user error, every process raises (so none waits forever for the others)."""
    messages = gather_objects(process, str(error) if error else None)
    if error is not None:
        raise error
    first = next((m for m in messages if m), None)
    if first:
        raise EvlCacheError(f"another process failed: {first}")


def on_every(process: Process, action: Callable[[], T]) -> T:
    """Run `action` on every process; a user error in any stops them all. Returns once all are done."""
    result, error = None, None
    try:
        result = action()
    except EvlCacheError as raised:
        error = raised
    raise_together(process, error)
    return result


def on_main(process: Process, action: Callable[[], T]) -> T | None:
    """Run `action` on the main process only; a user error there stops every process."""
    return on_every(process, action if process.is_main else lambda: None)
