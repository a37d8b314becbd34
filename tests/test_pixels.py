"""Evaluation crops: the centre crop, and three crops along the long side as mmaction's ThreeCrop; ViFi-CLIP's
training augmentation."""
import numpy as np
import pytest
import torch

from evl_cache.video.pixels import (
    VIFI_CROP_SCALES,
    _multi_scale_box,
    centre_crop,
    spatial_crops,
    three_crops,
    vifi_augmented_clip,
    vifi_short_side,
)


def frames(height: int, width: int) -> np.ndarray:
    return np.random.default_rng(height * 1000 + width).integers(0, 256, (2, height, width, 3), dtype=np.uint8)


def as_clip(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("height, width, offsets", [
    (32, 50, [0, 18, 9]),    # landscape: step (50 - 32) // 2 = 9; left, right at 2 steps, centre
    (32, 51, [0, 18, 9]),    # an odd difference: the right crop stops one pixel short of the edge
    (45, 32, [0, 12, 6]),    # portrait: top, bottom, centre
    (32, 32, [0, 0, 0]),     # square: the same crop three times
])
def test_three_crops_sit_along_the_long_side(height, width, offsets):
    clip = frames(height, width)
    crops = three_crops(clip, 32)
    for crop, offset in zip(crops, offsets):
        part = clip[:, :, offset:offset + 32] if height == 32 else clip[:, offset:offset + 32, :]
        assert torch.equal(crop, as_clip(part))
    assert torch.equal(crops[2], centre_crop(clip, 32))  # k = (long - size) // 2 is the centre crop's offset
    assert all(torch.equal(a, b) for a, b in zip(spatial_crops(clip, 32, 3), crops))


def test_centre_crop_of_frames_resized_beyond_the_crop():
    clip = frames(36, 45)  # short side resized to 36, crop 32: top 2, left 6
    assert torch.equal(centre_crop(clip, 32), as_clip(clip[:, 2:34, 6:38]))
    assert torch.equal(spatial_crops(clip, 32, 1)[0], centre_crop(clip, 32))


def test_three_crops_need_the_short_side_at_the_crop_size():
    with pytest.raises(ValueError, match="short side resized to 32"):
        three_crops(frames(36, 45), 32)
    with pytest.raises(ValueError, match="spatial views must be one of"):
        spatial_crops(frames(32, 45), 32, 2)


def test_vifi_augmentation_is_one_draw_for_the_whole_clip():
    """The same frame T times in, the same frame T times out; each seed its own draw, repeatable."""
    still = np.repeat(frames(36, 46)[:1], 4, axis=0)
    for seed in range(6):
        clip = vifi_augmented_clip(still, 32, seed)
        assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.uint8
        assert all(torch.equal(clip[0], frame) for frame in clip[1:])
        assert torch.equal(clip, vifi_augmented_clip(still, 32, seed))
    assert len({vifi_augmented_clip(still, 32, seed).float().mean().item() for seed in range(6)}) > 3


def test_vifi_multi_scale_crop_takes_mmactions_boxes_then_resizes():
    """Sides from the short side's scales (1, .875, .75, .66), at most one scale apart, snapped to the input
    size within 3 px, at the corners or the centre of 4-pixel steps; without flip, jitter and grey scale
    the clip is that box resized to the input size."""
    height, width, size = 36, 46, 32
    sides = {int(36 * s) for s in VIFI_CROP_SCALES} | {size}
    seen = set()
    for seed in range(60):
        top, left, h, w = _multi_scale_box(height, width, size, np.random.default_rng(seed))
        assert h in sides and w in sides and abs(h - w) <= 36 - int(36 * 0.875) + 3
        w_step, h_step = (width - w) // 4, (height - h) // 4
        assert (left, top) in {(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step),
                               (2 * w_step, 2 * h_step)}
        seen.add((top, left, h, w))
    assert len(seen) > 10
    clip = frames(height, width)
    plain = vifi_augmented_clip(clip, size, seed=3, flip=False, color_jitter=0.0, gray_scale=0.0)
    rng = np.random.default_rng(3)
    top, left, h, w = _multi_scale_box(height, width, size, rng)
    box = as_clip(clip[:, top:top + h, left:left + w]).float()
    expected = torch.nn.functional.interpolate(box, size=(size, size), mode="bilinear", align_corners=False)
    assert torch.equal(plain, expected.round().clamp(0, 255).to(torch.uint8))
    grey = vifi_augmented_clip(clip, size, seed=3, color_jitter=0.0, gray_scale=1.0)
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    jittered = vifi_augmented_clip(clip, size, seed=3, flip=False, color_jitter=1.0, gray_scale=0.0)
    assert not torch.equal(jittered, plain) and vifi_short_side(224) == 256
