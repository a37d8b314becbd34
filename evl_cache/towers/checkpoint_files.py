"""Other projects' torch checkpoints (the EVL and ViFi-CLIP releases), read without running their code.

`torch.load(weights_only=True)` unpickles tensors and plain containers only. Released checkpoints also
pickle objects of their training code (ViFi-CLIP saves its yacs config next to the weights), whose
classes need not be importable here. `load_checkpoint` reads each such object as a plain OrderedDict
of its items and attributes, through torch's own restricted unpickler: nothing in the file is called.
"""
from __future__ import annotations

import pickle
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

DATA_PARALLEL_PREFIX = "module."


class _StandIn:
    """What an unknown class in a checkpoint is read as: an OrderedDict of its items and attributes."""

    def __new__(cls, *args, **kwargs):
        return OrderedDict()


def load_checkpoint(path: str | Path) -> object:
    """The unpickled contents of a torch checkpoint file, on the CPU; objects of unknown classes become
    OrderedDicts. A missing or unreadable file is a one-line CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError("checkpoint not found", path) from None
    except pickle.UnpicklingError as error:  # not a checkpoint, or one naming classes torch does not allow
        try:
            unknown = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:
            unknown = []
        if not unknown:
            raise _unreadable(error, path) from None
        try:
            with torch.serialization.safe_globals([(_StandIn, name) for name in unknown]):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as retry_error:
            raise _unreadable(retry_error, path) from None
    except Exception as error:
        raise _unreadable(error, path) from None


def _unreadable(error: Exception, path: str | Path) -> CheckpointError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return CheckpointError(f"cannot read as a torch checkpoint: {reason}", path)


def model_state(checkpoint: object, path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict under a checkpoint's `model` key (or the checkpoint itself), without the `module.`
    prefix of (Distributed)DataParallel."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError("no state dict under 'model'", path)
    return {k.removeprefix(DATA_PARALLEL_PREFIX): v for k, v in state.items()}


def load_exactly(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """Load `state` into `model`, refusing missing or unexpected keys and wrong shapes with the first of
    them; `what` names the model in the message ("the decoder")."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise CheckpointError(f"keys do not match {what}: missing {missing[:3]}, unexpected {extra[:3]}", path)
    for key, value in state.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}, {what} needs "
                                  f"{tuple(expected[key].shape)}", path)
    model.load_state_dict(state)
