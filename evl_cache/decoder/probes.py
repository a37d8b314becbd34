"""Frozen-probe heads from the cache, beside the EVL decoder: the attentive probe and the linear probe.

The attentive probe is the protocol by which V-JEPA (Bardes et al., 2024), the Perception Encoder and
SigLIP 2 papers report video recognition with the tower frozen. Learned query tokens cross-attend to the
tokens of every frame of the final cached block (prefix and patch tokens, T x L of them): the queries
are not normalised, the tokens are (LayerNorm), then an MLP, as V-JEPA's `AttentivePooler` block with its
released defaults (one query, the tower's heads, depth 1, MLP factor 4, GELU, q/k/v biases, weights
truncated-normal with std 0.02 and zero biases, the attention output and MLP output weights divided by
sqrt(2)). Depth d adds d - 1 self-attention blocks over the queries. The queries' mean then goes through
LayerNorm and a linear classifier (V-JEPA's released classifier has no LayerNorm there; this probe has
one, as this project's EVL head does).

The linear probe is a linear classifier on the frames' mean image embedding (the cached `embed`), with
no normalisation: the classifier's weights learn the scale.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .model import Attention, LayerNorm

INIT_STD = 0.02


@dataclass
class AttentiveProbeConfig:
    """Shape of an attentive probe: the cached tokens it reads and its own size."""
    width: int  # C, the backbone width
    tokens: int  # L per frame: the tower's prefix tokens and its patches
    frames: int  # T
    num_classes: int
    heads: int  # attention heads (default: the tower's)
    queries: int = 1
    depth: int = 1  # the cross-attention block and depth - 1 self-attention blocks over the queries
    mlp_factor: float = 4.0

    def __post_init__(self) -> None:
        if min(self.width, self.tokens, self.frames, self.num_classes, self.heads, self.queries, self.depth) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")


@dataclass
class LinearProbeConfig:
    """Shape of a linear probe on the mean frame embedding."""
    embed_dim: int
    frames: int
    num_classes: int


def _mlp(width: int, factor: float) -> nn.Sequential:
    hidden = round(factor * width)
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class CrossAttentionBlock(nn.Module):
    """q = q + Attn(q, norm1(tokens)); q = q + MLP(norm2(q))."""

    def __init__(self, width: int, heads: int, mlp_factor: float):
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.attn = Attention(width, width, heads)
        self.norm2 = LayerNorm(width)
        self.mlp = _mlp(width, mlp_factor)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        queries = queries + self.attn(queries, self.norm1(tokens))
        return queries + self.mlp(self.norm2(queries))


class SelfAttentionBlock(nn.Module):
    """A pre-norm transformer block over the queries: q = q + SelfAttn(norm1(q)); q = q + MLP(norm2(q))."""

    def __init__(self, width: int, heads: int, mlp_factor: float):
        super().__init__()
        self.norm1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = LayerNorm(width)
        self.mlp = _mlp(width, mlp_factor)

    def forward(self, queries: Tensor) -> Tensor:
        normed = self.norm1(queries)
        queries = queries + self.attn(normed, normed, normed, need_weights=False)[0]
        return queries + self.mlp(self.norm2(queries))


class AttentiveProbe(nn.Module):
    """Learned queries over the final cached block's tokens of all frames, then LayerNorm and a linear
    classifier. Reads the model inputs of a decoder with one layer and no maps."""

    def __init__(self, config: AttentiveProbeConfig):
        super().__init__()
        self.config = config
        width, heads, factor = config.width, config.heads, config.mlp_factor
        self.query_tokens = nn.Parameter(torch.zeros(config.queries, width))
        self.cross = CrossAttentionBlock(width, heads, factor)
        self.blocks = nn.ModuleList(SelfAttentionBlock(width, heads, factor) for _ in range(config.depth - 1))
        self.norm = LayerNorm(width)
        self.head = nn.Linear(width, config.num_classes)
        self._initialise()

    def _initialise(self) -> None:
        """V-JEPA's initialisation (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.MultiheadAttention):
                nn.init.trunc_normal_(module.in_proj_weight, std=INIT_STD)
                nn.init.zeros_(module.in_proj_bias)
        nn.init.trunc_normal_(self.query_tokens, std=INIT_STD)
        for depth, block in enumerate([self.cross, *self.blocks], start=1):
            out = block.attn.out_proj.weight
            with torch.no_grad():
                out.div_(math.sqrt(2.0 * depth))
                block.mlp[2].weight.div_(math.sqrt(2.0 * depth))

    def features(self, block_outputs: list[Tensor]) -> Tensor:
        """The queries' mean [B, C] before the head, from the last of `block_outputs` [B, T, L, C]."""
        tokens = block_outputs[-1]
        config = self.config
        expected = (tokens.shape[0], config.frames, config.tokens, config.width)
        if tuple(tokens.shape) != expected:
            raise ValueError(f"block output of shape {tuple(tokens.shape)}, expected [B, T, L, C] = {list(expected)}")
        device_type = tokens.device.type
        autocast = torch.is_autocast_enabled(device_type)
        tokens = tokens.to(torch.get_autocast_dtype(device_type) if autocast else self.query_tokens.dtype)
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)
        queries = self.cross(queries, tokens.flatten(1, 2))
        for block in self.blocks:
            queries = block(queries)
        return queries.mean(1)

    def forward(self, block_outputs: list[Tensor], maps_prev: list[Tensor] | None = None,
                maps_next: list[Tensor] | None = None) -> Tensor:
        """Class logits [B, num_classes]; the maps are not read."""
        return self.head(self.norm(self.features(block_outputs)))


class LinearProbe(nn.Module):
    """logits = Linear(mean over frames of the cached per-frame image embeddings [B, T, E])."""

    def __init__(self, config: LinearProbeConfig):
        super().__init__()
        self.config = config
        self.head = nn.Linear(config.embed_dim, config.num_classes)
        nn.init.trunc_normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.head(embeddings.to(self.head.weight.dtype).mean(1))
