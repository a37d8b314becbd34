"""A video's views as clips: the planned frames, resized, then cropped (the spec's records read back);
hostile videos give every split the same frames."""
import numpy as np
import pytest
import torch

from evl_cache.video.clips import ClipSpec, planned_frame_numbers, read_video_clips
from evl_cache.video.decode import decode_frames, probe_video
from evl_cache.video.sampling import dense_eval_indices, plan_views
from evl_cache.video.synthetic import (
    cut_head,
    garble_head,
    numbered_frames,
    read_frame_number,
    restart_timestamps,
    write_two_stream_video,
    write_video,
)


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


@pytest.fixture(scope="module")
def numbered_videos(tmp_path_factory):
    """name -> (path, the frame numbers that decode, the note); square frames, so a crop keeps all."""
    folder = tmp_path_factory.mktemp("numbered")
    frames = numbered_frames(24, 64, 64)
    mkv = write_video(folder / "source.mkv", frames, keyframe_interval=6)
    mp4 = write_video(folder / "source.mp4", frames, keyframe_interval=6)
    side = numbered_frames(4, 32, 32, seed=1)
    return {
        "healthy": (mp4, range(24), ""),
        "restarted": (restart_timestamps(mkv, folder / "restarted.mkv", at=12), range(24),
                      "timestamps unusable: frames taken in decode order"),
        "garbled": (garble_head(mp4, folder / "garbled.mp4", count=2), range(6, 24),
                    "first 6 frames undecodable: skipped"),
        "cut": (cut_head(mp4, folder / "cut.mp4", count=3), range(6, 24), "first 3 frames undecodable: skipped"),
        "two streams": (write_two_stream_video(folder / "two.mkv", frames, side), range(24),
                        "video stream 2 of 2 (most frames)"),
    }


@pytest.mark.parametrize("name", ["healthy", "restarted", "garbled", "cut", "two streams"])
def test_every_split_gets_the_same_frames(numbered_videos, name):
    """Whether a video decodes, its frame count and which frame each index is do not depend on the
    frames a split samples (vifi views sample random frames, per video index)."""
    path, numbers, note = numbered_videos[name]
    spec = ClipSpec("vifi", 4, 1, 3, 1, 32, 0)
    for split, index in [("train", 0), ("train", 1), ("val", 2), ("val", 3), ("test", 4)]:
        clips = read_video_clips(path, split, index, spec)
        assert (clips.error, clips.num_frames, clips.note) == ("", len(numbers), note)
        plans = plan_views(len(numbers), split, "vifi", 4, 1, 3, 1, 0, index)
        got = [[read_frame_number(frame.permute(1, 2, 0).numpy()) for frame in view] for view in clips.clips]
        assert got == [[numbers[i] for i in plan.frame_indices] for plan in plans]


def test_a_segment_is_sampled_alone(numbered_videos):
    """Only the frames in [start, end) seconds are planned and decoded (25 fps: frames 6..17 for
    0.24-0.72 s), for the seek path and the decode-order path alike; frame counts are the segment's."""
    spec = ClipSpec("segment", 4, 1, 2, 1, 32, 0)
    for name in ("healthy", "restarted"):
        path, numbers, _ = numbered_videos[name]
        clips = read_video_clips(path, "val", 0, spec, segment=(0.24, 0.72))
        assert (clips.error, clips.num_frames) == ("", 12), name
        plans = plan_views(12, "val", "segment", 4, 1, 2, 1, 0, 0)
        got = [[read_frame_number(frame.permute(1, 2, 0).numpy()) for frame in view] for view in clips.clips]
        assert got == [[6 + i for i in plan.frame_indices] for plan in plans], name
    path = numbered_videos["healthy"][0]
    late = read_video_clips(path, "val", 0, spec, segment=(0.8, 2.0))
    assert (late.num_frames, late.note) == (4, "segment ends 1.04 s after the video")
    empty = read_video_clips(path, "val", 0, spec, segment=(5.0, 6.0))
    assert empty.clips is None and empty.error.startswith("segment 5-6 s holds no frame")


def test_planned_frame_numbers_are_each_views_frames(numbered_videos):
    path = numbered_videos["healthy"][0]
    for split, spec in (("val", ClipSpec("vifi", 4, 1, 3, 1, 32, 0)), ("test", ClipSpec("dense", 4, 5, 2, 1, 32, 0)),
                        ("train", ClipSpec("dense", 4, 3, 2, 1, 32, 0))):
        clips = read_video_clips(path, split, 7, spec)
        got = [tuple(read_frame_number(frame.permute(1, 2, 0).numpy()) for frame in view) for view in clips.clips]
        assert planned_frame_numbers(clips.num_frames, split, 7, spec) == got, split
    three_crops = ClipSpec("dense", 4, 3, 2, 3, 32, 0, spatial_views=3)  # view t * 3 + s: crops share frames
    numbers = planned_frame_numbers(24, "val", 0, three_crops)
    assert len(numbers) == 6 and numbers[0] == numbers[1] == numbers[2] != numbers[3] == numbers[5]
    assert len(planned_frame_numbers(24, "train", 0, three_crops)) == 3  # one plain and two augmented views
