"""The step-memory estimate against the bytes a decoder's training step really holds, and the micro-batch
chosen from a device's free memory."""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from evl_cache.decoder.memory import USABLE_SHARE, StepMemory, fitting_grad_accum, step_memory
from evl_cache.decoder.model import DecoderConfig, EVLModel
from evl_cache.errors import EvlCacheError


class PeakBytes(TorchDispatchMode):
    """The most bytes of tensor storage alive at once among those made while the mode is on: every op's
    outputs are followed until the last tensor on their storage is gone (views share it)."""

    def __init__(self):
        super().__init__()
        self.alive: dict[int, list[int]] = {}  # storage address -> [bytes, tensors on it]
        self.now = self.peak = 0

    def _follow(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self.alive:
            self.alive[key] = [storage.nbytes(), 0]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        self.alive[key][1] += 1
        weakref.finalize(tensor, self._drop, key)

    def _drop(self, key: int) -> None:
        self.alive[key][1] -= 1
        if self.alive[key][1] == 0:
            self.now -= self.alive.pop(key)[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor) and value.untyped_storage().data_ptr():
                self._follow(value)
        return out


def _step_peak(model: EVLModel, batch: int, amp: bool) -> int:
    """Peak bytes of one training step on `batch` float16 clips (inputs included), as train takes it."""
    config, patches = model.config, model.config.grid[0] * model.config.grid[1]
    generator = torch.Generator().manual_seed(0)
    with PeakBytes() as peak:
        tokens = [torch.randn(batch, config.frames, 1 + patches, config.width, generator=generator).half()
                  for _ in range(config.layers)]
        maps = [[torch.rand(batch, config.frames - 1, patches, patches, generator=generator).half()
                 for _ in range(config.layers)] for _ in range(2)] if config.temporal_cross_attention else [None, None]
        with torch.autocast("cpu", dtype=torch.float16, enabled=amp):
            logits = model(tokens, *maps)
            loss = F.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long), reduction="sum")
        loss.backward()
        del tokens, maps, logits, loss
    return peak.peak


class Items:
    """What `step_memory` asks of a dataset: bytes per item, and whether the cache is encoded."""

    def __init__(self, nbytes: int):
        self.bytes_per_item = lambda: nbytes
        self.encoding = type("Stored", (), {"scaled": False})()


def _input_bytes(config: DecoderConfig) -> int:
    """float16 bytes of one clip's tokens and maps."""
    patches = config.grid[0] * config.grid[1]
    maps = 2 * (config.frames - 1) * patches * patches if config.temporal_cross_attention else 0
    return 2 * config.layers * (config.frames * (1 + patches) * config.width + maps)


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "float16-autocast"])
@pytest.mark.parametrize("cross_attention", [True, False], ids=["maps", "no-maps"])
def test_the_estimate_per_clip_is_near_what_a_step_holds(amp, cross_attention):
    """Measured on the CPU (float16 autocast as CUDA runs it), on a decoder of a B/16-like shape made
    smaller: the estimate per clip within -15 %..+30 % of it."""
    torch.manual_seed(0)
    config = DecoderConfig(width=128, grid=(6, 6), frames=8, num_classes=5, layers=2, heads=4,
                           temporal_cross_attention=cross_attention)
    model = EVLModel(config).train()
    measured = (_step_peak(model, 9, amp) - _step_peak(model, 5, amp)) / 4
    estimate = step_memory(model, Items(_input_bytes(config)), amp)
    assert 0.85 < estimate.per_clip / measured < 1.3, (estimate.per_clip, measured)


def test_the_fixed_part_counts_adamw_and_autocast_copies():
    model = EVLModel(DecoderConfig(width=16, grid=(2, 2), frames=2, num_classes=3, layers=1, heads=2))
    trained = sum(p.numel() for p in model.parameters())
    assert step_memory(model, Items(0), False).fixed == 16 * trained
    assert step_memory(model, Items(0), True, world_size=2).fixed == (16 + 2 + 4) * trained


def test_an_encoded_cache_adds_its_decoded_values_and_a_cpu_the_loader_batches():
    config = DecoderConfig(width=16, grid=(2, 2), frames=3, num_classes=3, layers=2, heads=2)
    model = EVLModel(config)
    plain, encoded = Items(1000), Items(1000)
    encoded.encoding = type("Stored", (), {"scaled": True})()
    extra = step_memory(model, encoded, True).per_clip - step_memory(model, plain, True).per_clip
    assert extra == _input_bytes(config)  # float16 values beside the codes
    assert step_memory(model, plain, False, loader_batches=3).per_clip - step_memory(model, plain, False).per_clip \
        == 3 * 1000


def test_the_micro_batch_is_the_largest_that_fits():
    memory = StepMemory(fixed=1_000, per_clip=100)
    fits = int((1_000 + 64 * 100) / USABLE_SHARE) + 1  # 64 clips per process fit, 128 do not
    assert fitting_grad_accum(256, 1, 1, memory, None) == 1  # unknown: as asked
    assert fitting_grad_accum(256, 1, 1, memory, 10**9) == 1
    assert fitting_grad_accum(256, 1, 1, memory, fits) == 4
    assert fitting_grad_accum(256, 8, 1, memory, fits) == 8  # never fewer than asked
    assert fitting_grad_accum(256, 1, 2, memory, fits) == 2  # 2 processes: 64 each
    assert fitting_grad_accum(12, 1, 1, StepMemory(0, 100), int(500 / USABLE_SHARE) + 1) == 3  # 4 (5 does not divide)
    with pytest.raises(EvlCacheError, match=r"one clip per process does not fit the device: .*0\.00 GB fixed \+ "
                                            r"0\.0 MB per clip, and 0\.00 GB is free"):
        fitting_grad_accum(256, 1, 1, memory, 1_000)
