"""Processes under `torchrun`: which one this is, and the few collective steps the stages need.

Without torchrun (no WORLD_SIZE in the environment) everything here is a no-op for one process, so the
same command runs on one CPU, one GPU or many. Under torchrun every process joins the job's process
group, even a job of one, so that one process runs the same collectives as many. A collective's
tensor lives where the group's backend takes it: on the CPU for gloo (or a group with a CPU backend),
on this process's GPU for NCCL.
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
    joined: bool = False  # in a torchrun job's process group: the collectives run

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """One GPU per local process under torchrun."""
        if device.type == "cuda" and self.joined:
            return torch.device("cuda", self.local_rank)
        return device


def is_main_process() -> bool:
    """True unless this is a non-zero rank of a torchrun job (works before the job is joined)."""
    return int(os.environ.get("RANK", "0")) == 0


def init_process(device: torch.device) -> Process:
    """Join the torchrun job if there is one (NCCL on CUDA, gloo otherwise)."""
    if "WORLD_SIZE" not in os.environ:
        return Process()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # the main process evaluates alone between epochs: give the others time to wait for it
        dist.init_process_group(backend, timeout=timedelta(hours=2))
    return Process(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")),
                   int(os.environ.get("LOCAL_WORLD_SIZE", "1")), joined=True)


def leave_process_group() -> None:
    """Leave the job's process group, if this process joined one. A command-line process does this when
    its command ends, however it ends: NCCL warns of leaked resources when a group is only torn down
    at exit, and a process that failed then lets the others' collectives fail instead of hang."""
    if dist.is_initialized():
        dist.destroy_process_group()


def group_backends() -> dict[str, str]:
    """Device type -> backend of the default process group: 'gloo' serves cpu and cuda, 'nccl' cuda
    only, and a group made as 'cpu:gloo,cuda:nccl' names its own."""
    config = dist.get_backend_config()
    if ":" in config:
        return dict(pair.split(":") for pair in config.split(","))
    return {device: config for device in dist.Backend.backend_capability.get(config, ["cpu"])}


def collective_device() -> torch.device:
    """Where a collective's tensor must be for the default group: the CPU when a backend of the group
    takes CPU tensors (no copy to a GPU and back), else this process's current GPU (NCCL)."""
    backends = group_backends()
    if "cpu" in backends:
        return torch.device("cpu")
    if "cuda" in backends:
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(f"process group backends {backends} take neither CPU nor CUDA tensors")


def barrier(process: Process) -> None:
    if process.joined:
        device = collective_device()
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def sum_across(process: Process, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over all processes (in float64: exact for counts below 2**53)."""
    if not process.joined:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(process: Process, value: object) -> list:
    """`value` from every process, in rank order (torch moves the pickles to this process's GPU for NCCL:
    `init_process` made it the current device)."""
    if not process.joined:
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
