"""What every training loop of evl-cache shares: `train` (heads from a cache) and `finetune` (CLIP's towers
on decoded clips) take their steps from here.

- `Optimisation`: the optimizer, the learning-rate schedule (`cosine_lr`), the float16 loss scaler and
  the run's length in steps;
- `distributed`: the model wrapped in DDP under torchrun;
- the random generators' states (`rng_state`, `restore_rng`, `saved_rng`) and `restore`, which puts a
  killed run back where its last finished epoch left it, so that it reaches the same weights;
- `log_epoch`: an epoch's record to metrics.jsonl and TensorBoard.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from ..distributed import Process
from .events import EpochEvents
from .run import load_weights

log = logging.getLogger(__name__)


@dataclass
class Optimisation:
    """The optimizer, the learning-rate schedule and the loss scaler, and the run's length in steps."""
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    grad_accum: int
    micro_batch: int
    steps_per_epoch: int
    total_steps: int
    epochs: int


def cosine_lr(step: int, total: int, warmup: int, floor: float = 0.0) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay over `total` steps from 1 to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def distributed(model: torch.nn.Module, process: Process, device: torch.device, seed: int) -> torch.nn.Module:
    """The model as the training loop calls it: wrapped in DDP under torchrun, each process then drawing
    its own dropout masks."""
    if process.world_size == 1:
        return model
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if process.rank:
        torch.manual_seed(seed + 1_000_003 * process.rank)
    return net


def rng_state(device: torch.device) -> dict:
    """This process's random generators: the CPU's and, on CUDA, the device's, which dropout draws from."""
    return {"cpu": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(saved: dict, device: torch.device, seed: int, epoch: int, rank: int) -> None:
    """Set the generators to a checkpoint's. A CUDA generator the checkpoint lacks (a CPU run resumed on
    a GPU) is seeded from (seed, epoch, rank): a resumed run, not the same draws."""
    torch.set_rng_state(saved["cpu"])
    if device.type != "cuda":
        return
    if saved.get("cuda") is not None:
        torch.cuda.set_rng_state(saved["cuda"], device)
    else:
        torch.cuda.manual_seed(seed * 1_000_003 + epoch * 7_919 + rank)


def saved_rng(resumed: dict, process: Process) -> dict:
    """This process's generators in a checkpoint: its rank's (the first rank's when the number of
    processes changed); a checkpoint of before CUDA generators were saved holds CPU states only."""
    states = resumed["rng"] if "rng" in resumed else [{"cpu": state} for state in resumed["torch_rng"]]
    return states[process.rank] if len(states) == process.world_size else states[0]


def restore(resumed: dict | None, out: Path, model: torch.nn.Module, opt: Optimisation,
            process: Process, device: torch.device, seed: int, command: str = "train") -> tuple[int, int, float]:
    """(first epoch, step, best top-1): from the last finished epoch of a killed run, or from scratch.
    A run resumed on another kind of device continues from its weights and optimizer state, but not bit
    for bit: other kernels, another random generator, and a float16 loss scale from its start."""
    if resumed is None:
        log.info("%s: nothing to resume in %s; starting from the beginning", command, out)
        return 0, 0, -1.0
    load_weights(model, resumed["weights"], out)
    opt.optimizer.load_state_dict(resumed["optimizer"])  # moves the state to the parameters' device
    opt.schedule.load_state_dict(resumed["schedule"])
    if resumed["scaler"] and opt.scaler.is_enabled():  # a disabled (CPU) scaler saved {}
        opt.scaler.load_state_dict(resumed["scaler"])
    restore_rng(saved_rng(resumed, process), device, seed, resumed["epoch"] + 1, process.rank)
    saved_device = resumed.get("device", "cpu")
    if saved_device != device.type:
        log.warning("%s: resuming a run checkpointed on %s on %s: it continues, but not bit-exactly as it "
                    "would have on %s", command, saved_device, device.type, saved_device)
    log.info("%s: resuming %s after epoch %d (step %d)", command, out, resumed["epoch"], resumed["step"])
    return resumed["epoch"] + 1, resumed["step"], resumed["best_top1"]


def log_epoch(out: Path, record: dict, events: EpochEvents | None) -> None:
    """Append an epoch's record to the run's metrics.jsonl (and TensorBoard's events)."""
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")
    if events is not None:
        events.add(record)
