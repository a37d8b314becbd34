"""The image towers evl-cache reads, and where it takes each one's tokens, queries and keys.

A tower is read when it is a ViT whose tokens are its prefix tokens followed by one token per image
patch, in one of three families:
- `openclip`: open_clip's own VisionTransformer (OpenAI CLIP, OpenCLIP, DFN, MetaCLIP, CoCa): one class
  token, blocks with `ln_1` and an `nn.MultiheadAttention`, sequence-first or batch-first;
- `timm-vit`: a timm VisionTransformer trunk (SigLIP and SigLIP 2 with no class token, ViTs with a class
  token and register tokens, MobileCLIP2-L): blocks with timm's `Attention`;
- `timm-eva`: a timm Eva trunk (EVA-02, PE-Core, EVA-01): RoPE on the patch tokens, blocks with
  `EvaAttention` or `AttentionRope`.
Convolutional and hybrid towers (ResNets, ConvNeXt, FastViT, ViTs with a convolutional stem) and
attention of other kinds (relative-position biases, windows) are refused in one line that says why.

`QueryKeyTap` takes a block's q and k as its attention uses them: the openclip family's from the
in-projection of `ln_1`'s output (computed again in float32); a timm block's from the outputs of its
attention's `q_norm` and `k_norm` (identities unless the tower normalises q and k), with the block's RoPE
applied to the patch tokens by timm's own function, as the attention applies it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import BackboneError

FAMILIES = ("openclip", "timm-vit", "timm-eva")
READ = "evl-cache reads ViTs with a token per patch (open_clip ViTs, SigLIP, PE-Core, EVA-02, ...)"


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower's blocks are and the shape of their tokens: `prefix_tokens` (class and register
    tokens), then grid[0] x grid[1] patch tokens, of `width` channels, `heads` attention heads."""
    family: str
    blocks: tuple[nn.Module, ...]
    prefix_tokens: int
    grid: tuple[int, int]
    width: int
    heads: int
    image_size: int
    batch_first: bool = True

    @property
    def tokens(self) -> int:
        return self.prefix_tokens + self.grid[0] * self.grid[1]


def tower_layout(visual: nn.Module, model: str) -> TowerLayout:
    """The layout of an open_clip image tower, or a one-line refusal naming `model` and why."""
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return _openclip_layout(visual, model)
    if isinstance(visual, TimmModel):
        return _timm_layout(visual, model)
    kind = type(visual).__name__
    if kind == "ModifiedResNet":
        raise BackboneError(f"{model}: a convolutional image tower (ResNet) has no patch tokens or attention "
                            f"maps to cache; {READ}")
    raise BackboneError(f"{model}: its image tower is a {kind}, not a ViT with patch tokens; {READ}")


def _openclip_layout(visual: nn.Module, model: str) -> TowerLayout:
    blocks = tuple(visual.transformer.resblocks)
    for block in blocks:
        if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or not hasattr(block, "ln_1"):
            raise BackboneError(f"{model}: its blocks are open_clip's {type(block).__name__} (custom attention), "
                                f"whose q and k evl-cache does not read; it reads blocks with ln_1 and an "
                                f"nn.MultiheadAttention")
    grid = visual.grid_size
    return TowerLayout("openclip", blocks, 1, (int(grid[0]), int(grid[1])), int(visual.transformer.width),
                       int(blocks[0].attn.num_heads), int(visual.image_size[0]),
                       getattr(visual.transformer, "batch_first", True))


def _timm_layout(visual: nn.Module, model: str) -> TowerLayout:
    from timm.layers import Attention, AttentionRope, PatchEmbed
    from timm.models.eva import Eva, EvaAttention
    from timm.models.vision_transformer import VisionTransformer

    trunk = visual.trunk
    family = "timm-vit" if type(trunk) is VisionTransformer else "timm-eva" if type(trunk) is Eva else None
    if family is None:
        raise BackboneError(f"{model}: its image tower is timm's {type(trunk).__name__}, not a ViT with a token per "
                            f"patch in every block; {READ}")
    if not isinstance(trunk.patch_embed, PatchEmbed):
        raise BackboneError(f"{model}: a hybrid ViT (a convolutional stem, timm's {type(trunk.patch_embed).__name__}): "
                            f"its tokens are not one per image patch; {READ}")
    known = (Attention,) if family == "timm-vit" else (EvaAttention, AttentionRope)
    for block in trunk.blocks:
        if type(getattr(block, "attn", None)) not in known:
            raise BackboneError(f"{model}: block attention {type(getattr(block, 'attn', None)).__name__} is not one "
                                f"evl-cache reads q and k from ({', '.join(k.__name__ for k in known)})")
    grid = trunk.patch_embed.grid_size
    return TowerLayout(family, tuple(trunk.blocks), int(trunk.num_prefix_tokens), (int(grid[0]), int(grid[1])),
                       int(trunk.embed_dim), int(trunk.blocks[0].attn.num_heads), int(visual.image_size[0]))


class QueryKeyTap:
    """Hooks on one block that keep the q and k its attention formed in the last forward."""

    def __init__(self, layout: TowerLayout, block: nn.Module):
        self.family, self.batch_first = layout.family, layout.batch_first
        self.heads = layout.heads
        self.attn = block.attn
        self._seen: dict[str, object] = {}
        if self.family == "openclip":
            block.ln_1.register_forward_hook(self._keep("normed"))
        else:
            self.attn.q_norm.register_forward_hook(self._keep("q"))
            self.attn.k_norm.register_forward_hook(self._keep("k"))
            self.attn.register_forward_pre_hook(self._keep_rope, with_kwargs=True)

    def _keep(self, key: str):
        def hook(module, inputs, output):
            self._seen[key] = output
        return hook

    def _keep_rope(self, module, args, kwargs):
        self._seen["rope"] = kwargs["rope"] if "rope" in kwargs else args[1] if len(args) > 1 else None

    @property
    def scale(self) -> float:
        """The factor the attention multiplies q . k by."""
        if self.family == "openclip":
            return (self.attn.embed_dim // self.attn.num_heads) ** -0.5
        return float(self.attn.scale)

    def take(self) -> tuple[Tensor, Tensor]:
        """(q, k) of the last forward, float32 [B, N, H, D] each, computed with autocast off; the kept
        tensors are let go."""
        seen, self._seen = self._seen, {}
        first = seen["normed"] if self.family == "openclip" else seen["q"]
        with torch.autocast(first.device.type, enabled=False):
            if self.family == "openclip":
                return self._openclip(first)
            return self._timm(seen["q"], seen["k"], seen.get("rope"))

    def _openclip(self, normed: Tensor) -> tuple[Tensor, Tensor]:
        """The in-projection of ln_1(x) in float32 (a float16 q . k loses about 1e-2 and can overflow)."""
        x = normed if self.batch_first else normed.transpose(0, 1)
        width = self.attn.embed_dim
        qk = nn.functional.linear(x.float(), self.attn.in_proj_weight[:2 * width].float(),
                                  self.attn.in_proj_bias[:2 * width].float())
        q, k = qk.unflatten(-1, (2, self.heads, width // self.heads)).unbind(-3)
        return q, k

    def _timm(self, q: Tensor, k: Tensor, rope: Tensor | None) -> tuple[Tensor, Tensor]:
        """q and k [B, H, N, D] after q_norm and k_norm, with RoPE on the tokens after the attention's own
        prefix tokens as it applies it, as [B, N, H, D]."""
        from timm.layers import apply_rot_embed_cat

        q, k = q.float(), k.float()
        if rope is not None:
            skip, half = self.attn.num_prefix_tokens, getattr(self.attn, "rotate_half", False)
            q, k = (torch.cat([t[:, :, :skip], apply_rot_embed_cat(t[:, :, skip:], rope.float(), half=half)], dim=2)
                    for t in (q, k))
        if k.shape[1] != q.shape[1]:  # grouped-query attention: each key head serves several query heads
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return q.transpose(1, 2), k.transpose(1, 2)
