"""Learned prompt tokens fixed inside a CLIP tower's blocks (deep visual / language prompting).

Deep prompting (VPT-deep, Jia et al. 2022; "independent vision-language prompting", used by ViFi-CLIP's
"bridge and prompt" models) trains n tokens per block of a frozen tower: block 0's enter with the input,
and before each later prompted block i the n prompt positions are overwritten with block i's own tokens,
so the previous block's outputs at those positions are dropped. At inference they are constants.

- image tower: block 0's tokens are appended after the CLS and patch tokens (after the positional
  embedding, before `ln_pre`); block i's replace the last n tokens. The CLS and patch tokens stay
  first, so the tower's output (the CLS token) and what the cache keeps of a block (its first
  1 + patches tokens) are where they always are.
- text tower: block i's tokens replace positions 1..n (just after the start token), the positions the
  learned input context (`ClassPrompts`' context vectors) takes at block 0.

A weights file carries them under a top-level `prompts` key, `{"image": {block: [n, width]}, "text":
{block: [n, width]}}`, beside open_clip's `state_dict`; `load_clip` attaches them to the towers it builds.
"""
from __future__ import annotations

import os
import zipfile

import torch
from torch import Tensor, nn

from ..errors import BackboneError

TOWERS = ("image", "text")


class BlockPrompts(nn.Module):
    """A tower's prompt tokens per block: constants (buffers that are not saved with the tower's weights)
    or, with `trainable`, parameters (what `finetune` learns in ViFi-CLIP's "bridge and prompt" stage).

    `first` is the first prompt position (1 in the text tower, after the start token) or None for the
    last n positions (the image tower, whose prompts follow the patch tokens).
    """

    def __init__(self, prompts: dict[int, Tensor], first: int | None, trainable: bool = False):
        super().__init__()
        counts = {len(tokens) for tokens in prompts.values()}
        if len(counts) != 1:
            raise BackboneError(f"prompt token counts differ between blocks ({sorted(counts)})")
        self.tokens = counts.pop()
        self.first = first
        self.trainable = trainable
        self.blocks = sorted(prompts)
        for block, tokens in prompts.items():
            if trainable:
                self.register_parameter(f"block{block}", nn.Parameter(tokens.detach().clone().float()))
            else:
                self.register_buffer(f"block{block}", tokens.detach().clone(), persistent=False)

    def tensors(self) -> dict[int, Tensor]:
        """{block: its tokens [n, width]} as the forward uses them (trainable ones rounded to float16), detached,
        on the CPU, in float32: what a weights file holds."""
        def used(tokens: Tensor) -> Tensor:
            return tokens.half() if self.trainable else tokens
        return {block: used(getattr(self, f"block{block}").detach().cpu()).float().clone() for block in self.blocks}

    def of(self, block: int, batch: int, like: Tensor) -> Tensor:
        """Block `block`'s tokens expanded to [batch, n, width] in `like`'s dtype and device. Trainable
        tokens pass through float16 first, as ViFi-CLIP's forward casts them (`.half()`), so what trains
        is what a weights file holds (`tensors`) and ViFi-CLIP's code computes."""
        tokens = getattr(self, f"block{block}")
        return (tokens.half() if self.trainable else tokens).to(like.dtype).expand(batch, -1, -1)

    def replaced(self, x: Tensor, block: int, batch_first: bool) -> Tensor:
        """x with its prompt positions overwritten by block `block`'s tokens."""
        x = x if batch_first else x.transpose(0, 1)
        new = self.of(block, x.shape[0], x)
        if self.first is None:
            x = torch.cat([x[:, :x.shape[1] - self.tokens], new], dim=1)
        else:
            x = torch.cat([x[:, :self.first], new, x[:, self.first + self.tokens:]], dim=1)
        return x if batch_first else x.transpose(0, 1)


def read_weights_file(weights: str | os.PathLike) -> dict:
    """The top-level dict of a torch weights file: open_clip's `state_dict` and what is saved beside it
    ({} for a tag, `none`, safetensors, or a bare state dict's file read as one). A file in torch's zip
    format is memory-mapped (its tensors are not read); one in the legacy format cannot be."""
    if not os.path.isfile(weights) or str(weights).endswith(".safetensors"):
        return {}
    try:
        contents = torch.load(weights, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(weights))
    except Exception as error:
        raise BackboneError(f"cannot read the weights file: {(str(error).splitlines() or [''])[0]}", weights) from None
    return contents if isinstance(contents, dict) else {}


def read_block_prompts(weights: str | os.PathLike) -> dict[str, dict[int, Tensor]]:
    """The `prompts` a weights file carries ({} for a tag, `none`, safetensors or a file without them)."""
    prompts = read_weights_file(weights).get("prompts")
    if prompts is None:
        return {}
    if not isinstance(prompts, dict) or set(prompts) - set(TOWERS):
        raise BackboneError("'prompts' must map image and/or text to {block: tokens}", weights)
    return {tower: {int(block): tokens.float() for block, tokens in blocks.items()} for tower, blocks in prompts.items()}


def _check(tower: str, prompts: dict[int, Tensor], blocks: int, width: int, source) -> None:
    for block, tokens in prompts.items():
        if not 0 <= block < blocks or tokens.dim() != 2 or tokens.shape[1] != width:
            raise BackboneError(f"{tower} prompts of block {block} have shape {tuple(tokens.shape)}: the {tower} "
                                f"tower has blocks 0..{blocks - 1} of width {width}", source)


def attach_image_prompts(visual: nn.Module, prompts: dict[int, Tensor], source=None,
                         trainable: bool = False) -> BlockPrompts:
    """Fix `prompts` into an open_clip image tower (see the module docstring); they must include block 0.
    `trainable`: as parameters of the tower (`visual.block_prompts.block{i}`), to be learned."""
    resblocks = visual.transformer.resblocks
    _check("image", prompts, len(resblocks), int(visual.transformer.width), source)
    if 0 not in prompts:
        raise BackboneError("image prompts need block 0's tokens (the ones that enter with the patches)", source)
    attached = BlockPrompts(prompts, first=None, trainable=trainable)
    visual.block_prompts = attached
    visual.ln_pre.register_forward_pre_hook(
        lambda module, args: (torch.cat([args[0], attached.of(0, args[0].shape[0], args[0])], dim=1), *args[1:]))
    _hook_blocks(resblocks, attached, getattr(visual.transformer, "batch_first", True))
    return attached


def attach_text_prompts(clip: nn.Module, prompts: dict[int, Tensor], source=None,
                        trainable: bool = False) -> BlockPrompts:
    """Fix `prompts` into an open_clip CLIP's text tower; block 0's tokens are the input context, which the
    prompts of a class list provide (`ClassPrompts`), so block 0 is refused here. `trainable`: as
    parameters (`transformer.block_prompts.block{i}`)."""
    resblocks = clip.transformer.resblocks
    _check("text", prompts, len(resblocks), int(clip.transformer.width), source)
    if 0 in prompts:
        raise BackboneError("text prompts of block 0 are the learned input context, not block prompts", source)
    attached = BlockPrompts(prompts, first=1, trainable=trainable)
    clip.transformer.block_prompts = attached
    _hook_blocks(resblocks, attached, getattr(clip.transformer, "batch_first", True))
    return attached


def _hook_blocks(resblocks: nn.ModuleList, attached: BlockPrompts, batch_first: bool) -> None:
    for block in attached.blocks:
        if block > 0:
            resblocks[block].register_forward_pre_hook(
                lambda module, args, block=block: (attached.replaced(args[0], block, batch_first), *args[1:]))
