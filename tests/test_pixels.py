"""Evaluation crops: the centre crop, and three crops along the long side as mmaction's ThreeCrop."""
import numpy as np
import pytest
import torch

from evl_cache.video.pixels import centre_crop, spatial_crops, three_crops


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
