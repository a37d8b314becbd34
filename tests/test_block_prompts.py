"""Prompt tokens fixed inside a tower's blocks: block 0's enter with the patches, later blocks' replace
the prompt positions; counts and widths that do not fit are refused in one line."""
from __future__ import annotations

import pytest
import torch

from evl_cache.errors import BackboneError
from evl_cache.towers.backbone import load_clip
from evl_cache.towers.block_prompts import attach_image_prompts, attach_text_prompts, read_block_prompts


def _visual():
    clip, _ = load_clip("EVL-Tiny", "none", seed=0)
    return clip.eval()


def test_image_prompts_enter_with_the_patches_and_are_replaced_before_their_blocks():
    clip = _visual()
    visual = clip.visual
    width = int(visual.transformer.width)
    pixels = torch.randn(2, 3, 32, 32)
    plain = visual(pixels)
    prompts = {0: torch.randn(3, width), 2: torch.randn(3, width)}
    seen = []
    attach_image_prompts(visual, prompts)  # its hooks run before the one that looks
    visual.transformer.resblocks[2].register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    prompted = visual(pixels)
    tokens = seen[0] if getattr(visual.transformer, "batch_first", True) else seen[0].transpose(0, 1)
    assert tokens.shape[1] == 1 + 16 + 3  # CLS, 4 x 4 patches, then the prompts
    torch.testing.assert_close(tokens[:, -3:], prompts[2].expand(2, -1, -1))  # replaced before block 2
    assert not torch.allclose(plain, prompted)


def test_prompts_that_do_not_fit_the_tower_are_refused():
    clip = _visual()
    width = int(clip.visual.transformer.width)
    with pytest.raises(BackboneError, match="need block 0"):
        attach_image_prompts(clip.visual, {1: torch.zeros(2, width)})
    with pytest.raises(BackboneError, match="width"):
        attach_image_prompts(clip.visual, {0: torch.zeros(2, width + 1)})
    with pytest.raises(BackboneError, match="counts differ"):
        attach_image_prompts(clip.visual, {0: torch.zeros(2, width), 1: torch.zeros(3, width)})
    with pytest.raises(BackboneError, match="learned input context"):
        attach_text_prompts(clip, {0: torch.zeros(2, int(clip.transformer.width))})


def test_a_weights_file_names_its_prompts(tmp_path):
    assert read_block_prompts("none") == {} and read_block_prompts("openai") == {}
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {}}, plain)
    assert read_block_prompts(plain) == {}
    prompted = tmp_path / "prompted.pt"
    torch.save({"state_dict": {}, "prompts": {"image": {0: torch.ones(2, 4, dtype=torch.float16)}}}, prompted)
    read = read_block_prompts(prompted)
    assert list(read) == ["image"] and read["image"][0].dtype == torch.float32
    bad = tmp_path / "bad.pt"
    torch.save({"prompts": {"audio": {}}}, bad)
    with pytest.raises(BackboneError, match="must map image and/or text"):
        read_block_prompts(bad)


def test_trainable_prompts_are_parameters_that_learn_and_fixed_ones_are_not_saved():
    clip = _visual()
    width, text_width = int(clip.visual.transformer.width), int(clip.transformer.width)
    fixed = attach_image_prompts(clip.visual, {0: torch.randn(2, width)})
    assert list(fixed.parameters()) == [] and "block_prompts.block0" not in "".join(clip.visual.state_dict())
    clip = _visual()
    image = attach_image_prompts(clip.visual, {0: torch.zeros(2, width), 1: torch.zeros(2, width)}, trainable=True)
    text = attach_text_prompts(clip, {1: torch.zeros(2, text_width)}, trainable=True)
    names = {name for name, _ in clip.named_parameters()}
    assert {"visual.block_prompts.block0", "visual.block_prompts.block1", "transformer.block_prompts.block1"} <= names
    clip.visual(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert image.block0.grad.abs().sum() > 0 and image.block1.grad.abs().sum() > 0  # both reach the output
    assert set(image.tensors()) == {0, 1} and image.tensors()[1].requires_grad is False
    assert text.tensors()[1].shape == (2, text_width)
