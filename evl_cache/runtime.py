"""What every stage asks of the machine it runs on: the device, the library versions, free memory."""
from __future__ import annotations

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
