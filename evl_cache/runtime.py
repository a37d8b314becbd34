"""What every stage asks of the machine it runs on: the device, the library versions, free memory."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch

from .errors import EvlCacheError

__version__ = "0.1.0"


def resolve_device(device: str) -> torch.device:
    """'auto' means CUDA when it is available; a CUDA device is refused where there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EvlCacheError(f"--device {device}: CUDA is not available on this machine")
    try:
        return torch.device(device)
    except RuntimeError:
        raise EvlCacheError(f"--device {device!r}: not a device (cuda, cuda:N, cpu or auto)") from None


def bind_device(device: torch.device) -> torch.device:
    """`device` with its index; a CUDA device becomes this process's current device, so that the
    streams, events and collectives that take the current device use the one the run computes on."""
    if device.type != "cuda":
        return device
    index = torch.cuda.current_device() if device.index is None else device.index
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


@contextlib.contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """On CUDA, deterministic kernels (and cuBLAS's fixed workspaces) while the block runs: atomic-add
    reductions would give other sums on every run, so a resumed run could not reach the same weights.
    An op with no deterministic kernel warns, naming itself, and runs as it is. The previous settings
    are restored after. On a CPU the kernels already are: nothing changes."""
    if device.type != "cuda":
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, before a matmul
    was = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    was_cudnn = torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        torch.backends.cudnn.deterministic = was_cudnn


def one_torch_thread(_: int) -> None:
    """DataLoader workers' start: one torch thread each, so that decoding workers do not oversubscribe
    the cores the main process computes on."""
    torch.set_num_threads(1)


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape the numbers, recorded with every cache and run."""
    import av
    import h5py
    import numpy
    import open_clip
    import zarr
    return {"evl_cache": __version__, "torch": torch.__version__, "open_clip": open_clip.__version__,
            "av": av.__version__, "zarr": zarr.__version__, "h5py": h5py.__version__,
            "numpy": numpy.__version__}


def memory_available() -> int | None:
    """Bytes this machine can give a process now (MemAvailable, Linux), or None where unknown."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def device_memory_available(device: torch.device) -> int | None:
    """Bytes this process can have on `device` now: the GPU's free memory and what torch's allocator
    holds there already, or this machine's available memory for a CPU (None where unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0]) + int(torch.cuda.memory_reserved(device))
    return memory_available()
