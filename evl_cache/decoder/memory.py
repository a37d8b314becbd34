"""Device memory of a training step, estimated from shapes, and the micro-batch that fits a device.

A step holds a fixed part: the parameters, the trained ones' gradients and AdamW moments, their float16
copies under autocast and DDP's gradient buckets under torchrun. Per clip of its micro-batch it holds
the batch as the cache stores it, the decoded values of an encoded cache, and what the decoder keeps for
the backward pass at its peak: for each layer, and about two layers' worth more for the backward's own
temporaries, `TOKEN_BYTES` per token value (T x L x C) and `MAP_BYTES` per map value ((T - 1) x P x P,
both ways). Those coefficients come from following every tensor's bytes through the forward and
backward of decoders of several shapes (B/16's among them) on a CPU, in float32 and under float16
autocast as on a GPU; `tests/test_memory.py` holds the estimate to such a measurement. It remains an
estimate of torch's allocations: `benchmarks/gpu.py` compares it with `torch.cuda.max_memory_allocated`
on a GPU. A text head's text tower activations are not counted. An attentive probe is counted as one
decoder layer on its block without maps (its cross-attention block is one); a linear probe keeps nothing
per clip but its batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from ..cache.dataset import CacheDataset
from ..errors import EvlCacheError
from .model import DecoderConfig
from .probes import AttentiveProbeConfig

TOKEN_BYTES = {True: 4.8, False: 8.5}  # autocast (float16 activations) or float32 -> bytes per token value
MAP_BYTES = {True: 0.5, False: 4.0}  # ... per map value
BACKWARD_LAYERS = 2  # the backward's temporaries, in layers' worth
USABLE_SHARE = 0.9  # of the device's free memory: the allocator's rounding, kernels' workspaces, evaluation


@dataclass(frozen=True)
class StepMemory:
    """Estimated device bytes of one training step: `fixed` + `per_clip` x the micro-batch."""
    fixed: int
    per_clip: int

    def peak(self, micro_batch: int) -> int:
        return self.fixed + micro_batch * self.per_clip

    def describe(self) -> str:
        return f"an estimate of {self.fixed / 1e9:.2f} GB fixed + {self.per_clip / 1e6:.1f} MB per clip"


def step_memory(model: nn.Module, dataset: CacheDataset, amp: bool, world_size: int = 1,
                loader_batches: int = 0) -> StepMemory:
    """The step memory of training `model` on `dataset`'s items, under float16 autocast if `amp`;
    `loader_batches`: batches the loader holds in the same memory (a CPU device's)."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    fixed = 4 * frozen + 16 * trained + (2 * (trained + frozen) if amp else 0) + (4 * trained if world_size > 1 else 0)
    per_clip = (1 + loader_batches) * dataset.bytes_per_item()
    token_values, map_values, layers = _per_layer_values(getattr(model, "config", None))
    if dataset.encoding.scaled:  # decoded to float16 on the device, beside the codes
        per_clip += 2 * layers * (token_values + map_values)
    if layers:
        per_clip += math.ceil((layers + BACKWARD_LAYERS) * (TOKEN_BYTES[amp] * token_values
                                                            + MAP_BYTES[amp] * map_values))
    return StepMemory(fixed, per_clip)


def _per_layer_values(config: object) -> tuple[int, int, int]:
    """(token values, map values, layers) a model reads per clip: the decoder's, an attentive probe's (one
    layer, no maps), or none (the text head and the linear probe read embeddings)."""
    if isinstance(config, DecoderConfig):
        patches = config.grid[0] * config.grid[1]
        maps = 2 * (config.frames - 1) * patches * patches if config.temporal_cross_attention else 0
        return config.frames * (config.prefix_tokens + patches) * config.width, maps, config.layers
    if isinstance(config, AttentiveProbeConfig):
        return config.frames * config.tokens * config.width, 0, 1
    return 0, 0, 0


def fitting_grad_accum(batch_size: int, grad_accum: int, world_size: int, memory: StepMemory,
                       available: int | None) -> int:
    """The fewest micro-batches per step, `grad_accum` or more, whose micro-batch per process fits
    `USABLE_SHARE` of `available` bytes (None: unknown, `grad_accum` as it is). The batch must split
    evenly into the micro-batches and each of those over the processes."""
    if available is None:
        return grad_accum
    for accum in range(grad_accum, batch_size + 1):
        if batch_size % accum or (batch_size // accum) % world_size:
            continue
        if memory.peak(batch_size // accum // world_size) <= USABLE_SHARE * available:
            return accum
    raise EvlCacheError(f"one clip per process does not fit the device: a training step takes "
                        f"{memory.describe()}, and {available / 1e9:.2f} GB is free; free the device, or train "
                        f"fewer --layers or from a cache of fewer frames")
