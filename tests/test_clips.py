"""A video's views as clips: the planned frames, resized, then cropped (the spec's records read back)."""
import numpy as np
import torch

from evl_cache.video.clips import ClipSpec, read_video_clips
from evl_cache.video.decode import decode_frames, probe_video
from evl_cache.video.sampling import dense_eval_indices


def test_resize_beyond_the_crop_then_centre_crop(sample_videos):
    """ViFi-CLIP's one-crop test protocol: short side to 256/224 of the input size, centre crop."""
    path = sample_videos / "val" / "blue_still" / "blue_still_000.mp4"
    spec = ClipSpec("dense", 4, 3, 2, 1, 32, 0, short_side=37)
    clips = read_video_clips(path, "val", 0, spec).clips
    probe = probe_video(path)
    for view, indices in enumerate(dense_eval_indices(probe.num_frames, 4, 3, 2)):
        frames = decode_frames(path, indices, 37, probe).frames  # 37 x 48 from 40 x 52
        top, left = (frames.shape[1] - 32) // 2, (frames.shape[2] - 32) // 2
        assert (top, left) == (2, 8)
        assert torch.equal(clips[view], torch.from_numpy(frames[:, top:top + 32, left:left + 32].copy()).permute(0, 3, 1, 2))
    record = spec.preprocessing_record((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert record["short_side"] == 37 and record["crop"] == "centre"
    attrs = {"sampling": {**spec.sampling_record(), "views": 2}, "preprocessing": record}
    assert ClipSpec.from_cache(attrs) == spec


def test_training_videos_keep_one_plain_view_under_spatial_views(sample_videos):
    path = sample_videos / "train" / "slide_right" / "slide_right_000.mp4"
    spec = ClipSpec("segment", 4, 1, 2, 1, 32, 0, spatial_views=3)
    assert read_video_clips(path, "train", 0, spec).clips.shape == (1, 4, 3, 32, 32)
    assert read_video_clips(path, "val", 0, spec).clips.shape == (6, 4, 3, 32, 32)
    assert spec.views("train") == 1 and spec.views("val") == spec.views("test") == 6
    assert np.array_equal(read_video_clips(path, "train", 0, spec).clips[0],
                          read_video_clips(path, "val", 0, ClipSpec("segment", 4, 1, 1, 1, 32, 0)).clips[0])
