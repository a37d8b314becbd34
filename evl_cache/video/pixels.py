"""Pixel transforms from decoded frames to backbone-sized clips (uint8, [T, 3, S, S]).

Evaluation views take the centre S x S crop of frames whose short side was resized (to S, or more),
or three S x S crops along the long side of frames resized to S (`three_crops`). Augmented
training views apply the authors' online augmentation once per clip, the same for every frame:
random resized crop, horizontal flip, and RandAugment `rand-m7-n4-mstd0.5-inc1` (timm's
implementation, which is what the authors used). All randomness comes from the view's seed, so a
cached view is reproducible.

`vifi_augmented_clip` is ViFi-CLIP's training augmentation (`finetune`): mmaction's multi-scale crop,
flip, colour jitter and grey scale, once per clip, from a seed.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

RANDAUGMENT = "rand-m7-n4-mstd0.5-inc1"
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


SPATIAL_VIEWS = (1, 3)


def _crop(frames: np.ndarray, top: int, left: int, size: int) -> torch.Tensor:
    crop = frames[:, top:top + size, left:left + size]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(0, 3, 1, 2).contiguous()


def centre_crop(frames: np.ndarray, size: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 with min(H, W) >= size -> [T, 3, size, size] centre crop."""
    height, width = frames.shape[1:3]
    return _crop(frames, (height - size) // 2, (width - size) // 2, size)


def three_crops(frames: np.ndarray, size: int) -> list[torch.Tensor]:
    """Three [T, 3, size, size] crops of [T, H, W, 3] frames whose short side is `size`, as mmaction's
    ThreeCrop: at offsets 0, 2 k and k along the long side, k = (long - size) // 2 (left, right, centre;
    or top, bottom, centre for portrait frames). Square frames give the same crop three times."""
    height, width = frames.shape[1:3]
    if min(height, width) != size:
        raise ValueError(f"three crops need the short side resized to {size}, got {height}x{width}")
    if height == size:
        step = (width - size) // 2
        return [_crop(frames, 0, left, size) for left in (0, 2 * step, step)]
    step = (height - size) // 2
    return [_crop(frames, top, 0, size) for top in (0, 2 * step, step)]


def spatial_crops(frames: np.ndarray, size: int, views: int) -> list[torch.Tensor]:
    """The evaluation crops of one clip: the centre crop (views 1) or `three_crops` (views 3)."""
    if views not in SPATIAL_VIEWS:
        raise ValueError(f"spatial views must be one of {SPATIAL_VIEWS}, got {views}")
    return [centre_crop(frames, size)] if views == 1 else three_crops(frames, size)


def _resized_crop_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (top, left, h, w): area and aspect ratio drawn, centre crop fallback."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = int(round(math.sqrt(target * ratio)))
        h = int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side, side


def augmented_clip(frames: np.ndarray, size: int, seed: int, flip: bool = True,
                   randaugment: bool = True) -> torch.Tensor:
    """The authors' training augmentation, identical across the clip's frames -> [T, 3, size, size]."""
    from timm.data.auto_augment import rand_augment_transform

    rng = np.random.default_rng(seed)
    height, width = frames.shape[1:3]
    top, left, h, w = _resized_crop_box(height, width, rng)
    do_flip = flip and rng.random() < 0.5
    clip = frames[:, top:top + h, left:left + w]
    if randaugment:
        augment = rand_augment_transform(RANDAUGMENT, {"translate_const": int(size * 0.45),
                                                       "img_mean": (124, 116, 104)})
        op_seed = int(rng.integers(0, 2**31))
        augmented = []
        saved = random.getstate(), np.random.get_state()
        try:  # timm draws ops from numpy's and magnitudes from Python's global generators
            for frame in clip:
                random.seed(op_seed)  # the same ops and magnitudes for every frame of the clip
                np.random.seed(op_seed)
                augmented.append(np.asarray(augment(Image.fromarray(np.ascontiguousarray(frame)))))
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
        clip = np.stack(augmented)
    tensor = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()
    tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if do_flip:
        tensor = tensor.flip(-1)
    return tensor.round().clamp(0, 255).to(torch.uint8)


# ViFi-CLIP's training augmentation (its loader is X-CLIP's mmaction pipeline); values as recalled from
# X-CLIP's code, which ViFi-CLIP's builds on (docs/finetune.md says which are unchecked).
VIFI_RESIZE_RATIO = 256 / 224  # short side resized to int(256 / 224 * size) before the crop
VIFI_CROP_SCALES = (1.0, 0.875, 0.75, 0.66)  # mmaction MultiScaleCrop, max_wh_scale_gap=1, random_crop=False
VIFI_COLOR_JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)


def vifi_short_side(size: int) -> int:
    """The short side ViFi-CLIP resizes frames to before its training crop and its one-crop test crop."""
    return int(VIFI_RESIZE_RATIO * size)


def _multi_scale_box(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """mmaction's MultiScaleCrop box (top, left, h, w): a side pair from the scales of the short side no more
    than one scale apart (snapped to `size` within 3 px), at one of 5 fixed places (corners, centre)."""
    sides = [int(min(height, width) * scale) for scale in VIFI_CROP_SCALES]
    pairs = [(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1]
    w, h = pairs[int(rng.integers(len(pairs)))]
    w, h = (size if abs(w - size) < 3 else w), (size if abs(h - size) < 3 else h)
    w_step, h_step = (width - w) // 4, (height - h) // 4
    places = [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step)]
    left, top = places[int(rng.integers(len(places)))]
    return top, left, h, w


def _jittered(clip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """torchvision's ColorJitter with ViFi-CLIP's strengths, one draw (factors and order) for the clip."""
    from torchvision.transforms.v2 import functional as TF

    ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
           "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for name in rng.permutation(list(ops)):
        strength = VIFI_COLOR_JITTER[name]
        factor = rng.uniform(-strength, strength) if name == "hue" else rng.uniform(1 - strength, 1 + strength)
        clip = ops[name](clip, float(factor))
    return clip


def vifi_augmented_clip(frames: np.ndarray, size: int, seed: int, flip: bool = True, color_jitter: float = 0.8,
                        gray_scale: float = 0.2) -> torch.Tensor:
    """ViFi-CLIP's training augmentation of frames resized to `vifi_short_side(size)` -> uint8 [T, 3, size,
    size]: multi-scale crop, resized to size x size, horizontal flip (p 0.5), colour jitter (p
    `color_jitter`), grey scale (p `gray_scale`); every draw from `seed`, the same for every frame."""
    from torchvision.transforms.v2 import functional as TF

    rng = np.random.default_rng(seed)
    top, left, h, w = _multi_scale_box(*frames.shape[1:3], size, rng)
    clip = torch.from_numpy(np.ascontiguousarray(frames[:, top:top + h, left:left + w])).permute(0, 3, 1, 2).float()
    clip = F.interpolate(clip, size=(size, size), mode="bilinear", align_corners=False)
    clip = clip.round().clamp(0, 255).to(torch.uint8)
    if flip and rng.random() < 0.5:
        clip = clip.flip(-1)
    if rng.random() < color_jitter:
        clip = _jittered(clip, rng)
    if rng.random() < gray_scale:
        clip = TF.rgb_to_grayscale(clip, num_output_channels=3)
    return clip.contiguous()
