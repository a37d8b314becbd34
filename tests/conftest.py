"""Shared fixtures: generated videos and tiny open_clip models, made once per test session."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub

from evl_cache.video.synthetic import (  # noqa: E402
    make_sample_dataset,
    moving_shape_frames,
    truncate_file,
    write_audio_only,
    write_empty_file,
    write_text_file,
    write_video,
)

TINY = "EVL-Tiny"


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> Path:
    """The demo's sample dataset, small: root/{train,val}/<class>/*.mp4, 4 classes."""
    root = tmp_path_factory.mktemp("sample")
    return make_sample_dataset(root, videos_per_class={"train": 3, "val": 2}, num_frames=24, size=(40, 52))


@pytest.fixture(scope="session")
def messy_videos(tmp_path_factory) -> Path:
    """What real datasets contain: several codecs, odd and portrait sizes, VFR, audio, short clips,
    and broken files, in root/<class>/ folders (no split level)."""
    root = tmp_path_factory.mktemp("messy")
    rng = np.random.default_rng(0)

    def frames(n: int, h: int, w: int, direction: str = "right") -> np.ndarray:
        return moving_shape_frames(n, h, w, "square", (230, 200, 30), direction, rng)

    good = root / "good"
    good.mkdir()
    write_video(good / "h264.mp4", frames(30, 48, 64))
    write_video(good / "mpeg4.avi", frames(30, 40, 56), codec="mpeg4")
    write_video(good / "vp8.webm", frames(30, 48, 64), codec="libvpx")
    write_video(good / "portrait.mp4", frames(30, 96, 48))
    write_video(good / "odd size.mkv", frames(30, 61, 97), codec="mpeg4")
    write_video(good / "with_audio.mp4", frames(30, 48, 64), audio=True)
    times = np.cumsum(rng.uniform(0.02, 0.08, size=30))
    write_video(good / "vfr.webm", frames(30, 48, 64), codec="libvpx", frame_times=list(times - times[0]))
    write_video(good / "short.mp4", frames(3, 48, 64))
    write_video(good / "no_frame_count.ts", frames(30, 48, 64))  # MPEG-TS headers carry no frame count
    bad = root / "bad"
    bad.mkdir()
    write_empty_file(bad / "empty.mp4")
    write_text_file(bad / "text.mp4")
    write_audio_only(bad / "audio_only.mp4")
    write_video(bad / "truncated.mp4", frames(30, 48, 64))
    truncate_file(bad / "truncated.mp4", 0.3)
    (bad / "dangling.mp4").symlink_to(root / "does-not-exist.mp4")
    return root
