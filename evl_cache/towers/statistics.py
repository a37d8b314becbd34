"""A model of a trained CLIP tower's feature statistics, and the measures of them.

Random weights give features with none of a trained tower's structure (docs/storage.md, "Trained
towers: outlier channels and attention sinks"). `add_clip_statistics` edits an open_clip ViT image
tower's weights (OpenAI layout) so that its features have two published properties, whatever weights
it starts from:

- outlier channels (Sun et al. 2024; Crabbé et al. 2023): a few residual channels, 3 by default, hold
  values 50-500x the median channel's in every token from an early block on (a bias on that block's
  MLP output; the later LayerNorms ignore those channels and are rescaled so that the blocks still see
  their inputs at the usual scale, as a trained tower does);
- attention sinks (Darcet et al. 2024): about 2 % of the patch positions carry about 10x the norm of
  the other tokens from the middle block on (a marker in their position embedding, picked up by one
  MLP unit of that block), and every query of the later blocks attends to them (a query/key
  direction of each head).

It is a model of those statistics, not a trained CLIP: the values are what the papers report, the
mechanism is the simplest that makes them. The edit is deterministic: its measurements (on fixed
generated images) are taken in float64, so the float32 weights it writes, and their sha256, are the
same on any CPU. `--pretrained none+outliers` (`OUTLIERS`) asks `load_clip` for it.

`tower_statistics` measures the same properties on any block's tokens (`info --stats`, the benchmarks).
Norms and medians are over the ordinary channels (the outlier channels add the same large value to
every token and would hide which tokens stand out).
"""
from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import BackboneError

OUTLIERS = "+outliers"  # the suffix of --pretrained that asks for the edit
OUTLIER_FACTORS = (120.0, -240.0, 120.0)  # x the residual's median |value|; they sum to 0 (no LayerNorm mean shift)
SINK_SHARE, SINK_NORM, SINK_ATTENTION = 0.02, 10.0, 0.8  # of patches; x the median token norm; attention share
OUTLIER_RATIO, HIGH_NORM_RATIO = 20.0, 4.0  # what the measures count as an outlier channel / a high-norm token


def split_pretrained(pretrained: str) -> tuple[str, bool]:
    """(the weights part of a --pretrained value, whether it asks for CLIP's statistics; a file whose own
    name ends in the suffix is a file)."""
    if pretrained.endswith(OUTLIERS) and not os.path.isfile(pretrained):
        return pretrained[: -len(OUTLIERS)], True
    return pretrained, False


@dataclass(frozen=True)
class StatisticsEdit:
    """What `add_clip_statistics` changed: the outlier channels from `outlier_block`'s output on, the
    sink patches from `sink_block`'s output on (attended to in the blocks after it)."""
    channels: tuple[int, ...]
    outlier_block: int
    sinks: tuple[int, ...]
    sink_block: int


def add_clip_statistics(visual: nn.Module, seed: int = 0, channels: int = 3) -> StatisticsEdit:
    """Edit `visual` (an open_clip ViT image tower) in place so that its features have outlier channels
    and attention sinks; see the module's docstring."""
    blocks = visual.transformer.resblocks
    width, grid = int(visual.transformer.width), visual.grid_size
    patches = int(grid[0]) * int(grid[1])
    if len(blocks) < 2 or channels >= width // 4:
        raise BackboneError(f"CLIP's statistics need at least 2 blocks and {channels} channels of width {width}")
    generator = torch.Generator().manual_seed(seed)
    edit = StatisticsEdit(tuple(torch.randperm(width, generator=generator)[:channels].tolist()), len(blocks) // 6,
                          tuple(torch.randperm(patches, generator=generator)[:max(1, round(SINK_SHARE * patches))]
                                .tolist()), (len(blocks) - 1) // 2)
    work = copy.deepcopy(visual).double().eval()
    images = _calibration_images(work, generator)
    with torch.no_grad():
        medians, norms = _residual_scales(work, images)
        directions = [_ordinary_direction(width, edit.channels, generator) for _ in range(2)]
        _mark_sinks(work, images, edit.sinks, directions[0])
        _edit_blocks(work, images, edit, medians, SINK_NORM * norms[-1], directions[1])
        visual.load_state_dict({name: value.to(visual.state_dict()[name].dtype)
                                for name, value in work.state_dict().items()})
    return edit


def _calibration_images(visual: nn.Module, generator: torch.Generator, count: int = 8) -> torch.Tensor:
    """Smooth random images, normalised like CLIP's inputs: what the edit measures the tower on."""
    size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
    coarse = torch.randn(count, 3, 8, 8, generator=generator, dtype=torch.float64)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def _ordinary_direction(width: int, channels: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """A random unit vector with nothing in the outlier channels."""
    direction = torch.randn(width, generator=generator, dtype=torch.float64)
    direction[list(channels)] = 0
    return direction / direction.norm()


def _batch_first(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Tokens [B, L, C] of the residual stream in the transformer's own layout."""
    return x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1)


def _embedded(visual: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The input of the first block, in the transformer's layout."""
    x = visual._embeds(images)
    return x if getattr(visual.transformer, "batch_first", True) else x.transpose(0, 1)


def _residual_scales(visual: nn.Module, images: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per block output of the unedited tower: the median |value| and the median token norm."""
    x, medians, norms = _embedded(visual, images), [], []
    for block in visual.transformer.resblocks:
        x = block(x)
        tokens = _batch_first(visual, x)
        medians.append(float(tokens.abs().median()))
        norms.append(float(tokens.norm(dim=-1).median()))
    return medians, norms


def _mark_sinks(visual: nn.Module, images: torch.Tensor, sinks: tuple[int, ...], direction: torch.Tensor) -> None:
    """Add a marker of the median embedded token's norm to the sink positions' position embedding: what
    the sink unit picks up in the middle block."""
    captured = {}
    hook = visual.ln_pre.register_forward_hook(lambda module, inputs, output: captured.update(x=inputs[0]))
    visual._embeds(images)
    hook.remove()
    norm = 3 * float(captured["x"].norm(dim=-1).median())
    visual.positional_embedding[[1 + s for s in sinks]] += norm * direction


def _edit_blocks(visual: nn.Module, images: torch.Tensor, edit: StatisticsEdit, medians: list[float],
                 sink_norm: float, sink_direction: torch.Tensor) -> None:
    """Walk the blocks in order, editing each from what reaches it through the blocks already edited."""
    blocks = visual.transformer.resblocks
    sinks = torch.zeros(1 + visual.grid_size[0] * visual.grid_size[1], dtype=torch.bool)
    sinks[[1 + s for s in edit.sinks]] = True
    scale = math.sqrt(medians[edit.outlier_block] * medians[-1])  # 50-500x from the outlier block to the last
    x = _embedded(visual, images)
    for index, block in enumerate(blocks):
        if index > edit.outlier_block:
            _compensate(block.ln_1, _batch_first(visual, x), edit.channels)
        if index > edit.sink_block:
            _attract(block, _batch_first(visual, x), sinks, edit.channels)
        x = x + block.ls_1(block.attention(q_x=block.ln_1(x)))
        if index > edit.outlier_block:
            _compensate(block.ln_2, _batch_first(visual, x), edit.channels)
        if index == edit.sink_block:
            _add_sink_unit(block, _batch_first(visual, x), sinks, edit.channels, sink_norm * sink_direction)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
        if index == edit.outlier_block:
            bias = torch.zeros_like(x[0, 0])
            bias[list(edit.channels)] = torch.tensor(OUTLIER_FACTORS[: len(edit.channels)], dtype=x.dtype) * scale
            _add_output(block, bias)
            x = x + bias
    if isinstance(visual.ln_post, nn.LayerNorm):
        _compensate(visual.ln_post, _batch_first(visual, x), edit.channels)


def _add_output(block: nn.Module, vector: torch.Tensor, unit: int | None = None) -> None:
    """Make the block's MLP add `vector` to its output (through any LayerScale): to every token as a
    bias, or per unit of activation of hidden `unit`."""
    gamma = getattr(block.ls_2, "gamma", None)
    vector = vector / gamma if gamma is not None else vector
    if unit is None:
        block.mlp.c_proj.bias += vector
    else:
        block.mlp.c_proj.weight[:, unit] = vector


def _compensate(norm: nn.LayerNorm, tokens: torch.Tensor, channels: tuple[int, ...]) -> None:
    """Let a LayerNorm ignore the outlier channels: their weights 0, the others rescaled (and the bias
    shifted) so that the ordinary channels come out as they would without the outliers."""
    ordinary = torch.ones(tokens.shape[-1], dtype=torch.bool)
    ordinary[list(channels)] = False
    sigma_all, sigma = tokens.std(-1, unbiased=False), tokens[..., ordinary].std(-1, unbiased=False)
    ratio = float((sigma_all / sigma).median())
    shift = float(((tokens.mean(-1) - tokens[..., ordinary].mean(-1)) / sigma).median())
    norm.bias += norm.weight * shift
    norm.weight *= ratio
    norm.weight[~ordinary] = 0


def _sink_offset(h: torch.Tensor, sinks: torch.Tensor, channels: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(the mean of the other tokens' LayerNorm outputs h [B, L, C], the sinks' mean offset from it); the
    outlier channels' offset is 0 exactly (the LayerNorms ignore them: only rounding is left there, which
    would differ from CPU to CPU)."""
    centre = h[:, ~sinks].mean((0, 1))
    offset = h[:, sinks].mean((0, 1)) - centre
    offset[list(channels)] = 0
    return centre, offset


def _attract(block: nn.Module, tokens: torch.Tensor, sinks: torch.Tensor, channels: tuple[int, ...]) -> None:
    """Give each head one query/key direction in which every query meets the sinks' keys: the sinks then
    take about SINK_ATTENTION of every row's attention, and give back the mean token's value."""
    attn = block.attn
    heads, width = attn.num_heads, attn.embed_dim
    dim = width // heads
    h = block.ln_1(tokens)
    centre, offset = _sink_offset(h, sinks, channels)
    count, keys = int(sinks.sum()), tokens.shape[1]
    q, k = (nn.functional.linear(h, attn.in_proj_weight[part * width:(part + 1) * width],
                                 attn.in_proj_bias[part * width:(part + 1) * width]).unflatten(-1, (heads, dim))
            .transpose(1, 2) for part in (0, 1))
    spread = float((q @ k.transpose(-1, -2) / math.sqrt(dim)).std(-1).mean())  # E[exp] of the others' logits
    logit = math.log(SINK_ATTENTION / (1 - SINK_ATTENTION) * (keys - count) / count) + spread ** 2 / 2
    gain = math.sqrt(logit * math.sqrt(dim))
    for head in range(heads):
        q_row, k_row = head * dim + dim - 1, width + head * dim + dim - 1
        attn.in_proj_weight[q_row] = 0
        attn.in_proj_bias[q_row] = gain
        attn.in_proj_weight[k_row] = gain * offset / offset.dot(offset)
        attn.in_proj_bias[k_row] = -gain * offset.dot(centre) / offset.dot(offset)
    # The sinks' values are the mean token's (attending to them changes nothing: a "no-op", as trained
    # towers use them): the value projection ignores the sinks' offset from the mean token.
    unit = offset / offset.norm()
    values = attn.in_proj_weight[2 * width:]
    along = values @ unit
    attn.in_proj_bias[2 * width:] += along * unit.dot(centre)
    values -= along[:, None] * unit[None, :]


def _add_sink_unit(block: nn.Module, tokens: torch.Tensor, sinks: torch.Tensor, channels: tuple[int, ...],
                   vector: torch.Tensor) -> None:
    """Turn the MLP's two least used hidden units into a detector of the sink marker that adds `vector`
    to the sink tokens and nothing to the others: z is -20 or below on the others, +20 or above on the
    sinks, and act(z + 10) - act(z - 10) is then 0 or 20 (saturated: the same vector on every sink)."""
    h = block.ln_2(tokens)
    centre, direction = _sink_offset(h, sinks, channels)
    direction = direction / direction.norm()
    projection = (h - centre) @ direction
    low, high = float(projection[:, ~sinks].max()), float(projection[:, sinks].min())
    if high <= low:
        raise BackboneError("cannot give this tower attention sinks: the marked positions are not told apart "
                            "from the others in its middle block")
    gain = 40.0 / (high - low)
    units = block.mlp.c_proj.weight.norm(dim=0).argsort()[:2].tolist()
    for unit, shift, sign in ((units[0], 10.0, 1.0), (units[1], -10.0, -1.0)):
        block.mlp.c_fc.weight[unit] = gain * direction
        block.mlp.c_fc.bias[unit] = -gain * (float(direction.dot(centre)) + (low + high) / 2) + shift
        _add_output(block, sign * vector / 20.0, unit)


def outlier_channels(rms: torch.Tensor) -> torch.Tensor:
    """Which channels are outliers, from each channel's RMS [C]: those above OUTLIER_RATIO x the median."""
    return rms > OUTLIER_RATIO * rms.median()


def tower_statistics(tokens: torch.Tensor) -> dict:
    """The outlier-channel and high-norm-token statistics of one block's tokens [..., C]: the spread of
    channel magnitudes (max over median of each channel's RMS), the outlier channels (above
    OUTLIER_RATIO x the median), and the share of tokens whose norm over the ordinary channels is above
    HIGH_NORM_RATIO x the median token's."""
    tokens = tokens.reshape(-1, tokens.shape[-1]).double()
    rms = tokens.pow(2).mean(0).sqrt()
    median = float(rms.median())
    spread = float(rms.max()) / median if median > 0 else math.inf
    outliers = torch.nonzero(outlier_channels(rms)).flatten()
    ordinary = torch.ones(tokens.shape[-1], dtype=torch.bool)
    ordinary[outliers] = False
    norms = tokens[:, ordinary].norm(dim=-1)
    high = norms > HIGH_NORM_RATIO * norms.median()
    return {"channel_spread": spread, "outlier_channels": outliers.tolist(),
            "high_norm_share": float(high.double().mean()), "tokens": int(tokens.shape[0])}
