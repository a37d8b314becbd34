"""Tests for evl_cache/video/decode.py, on videos written by evl_cache/video/synthetic.py.

Every test video draws its frame index into its pixels (`numbered_frames`), so each test checks that
`decode_frames` returned exactly the requested frames, in the requested order.
"""
from __future__ import annotations

import contextlib
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from evl_cache.errors import BadVideoError
from evl_cache.video import decode
from evl_cache.video.decode import DecodedFrames, decode_frames, open_video, probe_video, resized_size
from evl_cache.video.synthetic import (
    cut_head,
    garble_head,
    hollow_out_tail,
    numbered_frames,
    read_frame_number,
    restart_timestamps,
    start_before_zero,
    truncate_file,
    write_audio_only,
    write_empty_file,
    write_text_file,
    write_two_stream_video,
    write_video,
)

NUM_FRAMES = 40
KEYFRAME_INTERVAL = 10


def frame_numbers(decoded: DecodedFrames) -> list[int]:
    return [read_frame_number(frame) for frame in decoded.frames]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("decode_videos")


# name -> (codec, height, width, audio)
VIDEOS = {
    "x264.mp4": ("libx264", 64, 96, False),
    "mpeg4.mp4": ("mpeg4", 64, 96, False),
    "vp8.webm": ("libvpx", 64, 96, False),
    "x264.mkv": ("libx264", 64, 96, False),
    "portrait.mp4": ("libx264", 96, 48, False),
    "odd_x264.mp4": ("libx264", 61, 97, False),
    "odd_vp8.webm": ("libvpx", 61, 97, False),
    "audio_aac.mp4": ("libx264", 64, 96, True),
    "audio_opus.webm": ("libvpx", 64, 96, True),
    "raw.h264": ("libx264", 64, 96, False),  # no container: no timestamps, duration or frame count
    "x264.ts": ("libx264", 64, 96, False),  # timestamps that do not start at zero
}


@pytest.fixture(scope="module")
def videos(video_dir: Path) -> dict[str, Path]:
    written = {}
    for name, (codec, height, width, audio) in VIDEOS.items():
        frames = numbered_frames(NUM_FRAMES, height, width)
        written[name] = write_video(
            video_dir / name, frames, codec=codec, audio=audio, keyframe_interval=KEYFRAME_INTERVAL
        )
    return written


@pytest.mark.parametrize("name", VIDEOS)
def test_probe_counts_frames_and_reads_size(videos: dict[str, Path], name: str) -> None:
    _, height, width, _ = VIDEOS[name]
    probe = probe_video(videos[name])
    assert probe.num_frames == NUM_FRAMES
    assert (probe.width, probe.height) == (width, height)
    assert probe.average_fps == pytest.approx(25, rel=1e-3)
    if name == "raw.h264":
        assert probe.frame_pts == ()
    else:
        assert len(probe.frame_pts) == NUM_FRAMES
        assert list(probe.frame_pts) == sorted(probe.frame_pts)


@pytest.mark.parametrize("name", VIDEOS)
def test_healthy_files_are_settled_from_packets_and_one_keyframe(
    videos: dict[str, Path], name: str
) -> None:
    """No counting decode and no note for a healthy file: the probe decodes its first keyframe only."""
    probe = probe_video(videos[name])
    assert (probe.stream_index, probe.head_skipped, probe.decoded_frames) == (0, 0, 1)
    if name == "raw.h264":
        assert probe.notes == ("no timestamps: frames taken in decode order",)
    else:
        assert probe.notes == ()


@pytest.mark.parametrize("name", VIDEOS)
def test_decode_returns_requested_frames_in_order(videos: dict[str, Path], name: str) -> None:
    indices = [37, 3, 3, 20, 0, 39, 39, 11]
    decoded = decode_frames(videos[name], indices, short_side=32)
    assert decoded.frames.dtype == np.uint8
    assert decoded.frames.shape[0] == len(indices)
    assert frame_numbers(decoded) == indices


@pytest.mark.parametrize("name", ["x264.mp4", "mpeg4.mp4", "vp8.webm", "x264.mkv", "x264.ts"])
def test_every_single_frame_after_a_seek(videos: dict[str, Path], name: str) -> None:
    probe = probe_video(videos[name])
    for index in range(NUM_FRAMES):
        decoded = decode_frames(videos[name], [index], short_side=32, probe=probe)
        assert frame_numbers(decoded) == [index]


def test_libx264_test_video_reorders_frames(videos: dict[str, Path]) -> None:
    """The B-frame tests only mean something if the decode order differs from display order."""
    with av.open(str(videos["x264.mp4"])) as container:
        stream = container.streams.video[0]
        pts = [packet.pts for packet in container.demux(stream) if packet.size > 0]
    assert pts != sorted(pts)


def test_headers_without_frame_count_are_not_needed(videos: dict[str, Path]) -> None:
    with av.open(str(videos["vp8.webm"])) as container:
        assert container.streams.video[0].frames == 0  # WebM stores no frame count
    assert probe_video(videos["vp8.webm"]).num_frames == NUM_FRAMES


@pytest.fixture(scope="module")
def long_video(video_dir: Path) -> Path:
    """120 frames, a keyframe at least every 12."""
    return write_video(video_dir / "long.mp4", numbered_frames(120, 64, 96), keyframe_interval=12)


@pytest.mark.parametrize("window", [range(60, 88, 4), range(92, 120, 4)])
def test_window_seeks_near_its_start_and_stops_after_its_end(
    long_video: Path, window: range
) -> None:
    decoded = decode_frames(long_video, window, short_side=32)
    assert frame_numbers(decoded) == list(window)
    # At most a GOP before the window, and nothing after it.
    assert decoded.decoded_count <= len(range(window[0], window[-1] + 1)) + 12


def test_overshooting_seek_falls_back_to_decoding_from_the_start(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A demuxer that seeks past the wanted frame must not cost correctness."""

    class OvershootingContainer:
        def __init__(self, container: av.container.InputContainer):
            self._container = container

        def seek(self, offset: int, **kwargs: object) -> None:
            self._container.seek(offset * 10, **kwargs)

        def __getattr__(self, name: str) -> object:
            return getattr(self._container, name)

    open_container = decode._open_container

    @contextlib.contextmanager
    def open_overshooting(path):  # type: ignore[no-untyped-def]
        with open_container(path) as container:
            yield OvershootingContainer(container)

    monkeypatch.setattr(decode, "_open_container", open_overshooting)
    window = [12, 20, 28]
    decoded = decode_frames(videos["x264.mp4"], window, short_side=32)
    assert frame_numbers(decoded) == window
    assert decoded.decoded_count > window[-1]  # it had to start over from frame 0


def test_frames_without_timestamps_are_counted_from_the_start(
    videos: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packets had timestamps but decoded frames do not: fall back to counting frames."""
    decoded_frames = decode._decoded_frames

    def frames_without_pts(container, stream, errors=None):  # type: ignore[no-untyped-def]
        for frame in decoded_frames(container, stream, errors):
            frame.pts = None
            yield frame

    monkeypatch.setattr(decode, "_decoded_frames", frames_without_pts)
    window = [12, 20, 20]
    decoded = decode_frames(videos["x264.mp4"], window, short_side=32)
    assert frame_numbers(decoded) == window
    assert decoded.decoded_count == 1 + 21  # one frame after the seek, then 0..20 from the start


def test_stream_without_timestamps_stops_after_the_last_wanted_frame(
    videos: dict[str, Path],
) -> None:
    decoded = decode_frames(videos["raw.h264"], [5, 2], short_side=32)
    assert frame_numbers(decoded) == [5, 2]
    assert decoded.decoded_count == 6


@pytest.mark.parametrize(
    ("name", "codec"), [("vfr.mp4", "libx264"), ("vfr.webm", "libvpx"), ("vfr.mkv", "mpeg4")]
)
def test_variable_frame_rate(video_dir: Path, name: str, codec: str) -> None:
    rng = np.random.default_rng(7)
    frame_times = np.concatenate([[0.0], np.cumsum(rng.uniform(0.01, 0.15, NUM_FRAMES - 1))])
    path = write_video(
        video_dir / name,
        numbered_frames(NUM_FRAMES, 64, 96),
        codec=codec,
        frame_times=frame_times,
        keyframe_interval=KEYFRAME_INTERVAL,
    )
    probe = probe_video(path)
    assert probe.num_frames == NUM_FRAMES
    seconds = np.array(probe.frame_pts, dtype=float) * float(probe.time_base)
    np.testing.assert_allclose(seconds - seconds[0], frame_times, atol=1e-3)
    assert probe.average_fps == pytest.approx((NUM_FRAMES - 1) / frame_times[-1], rel=1e-2)
    indices = [31, 2, 17, 17, 38]
    assert frame_numbers(decode_frames(path, indices, short_side=32, probe=probe)) == indices


@pytest.mark.parametrize(
    ("width", "height", "short_side", "expected"),
    [
        (96, 64, 32, (48, 32)),
        (48, 96, 32, (32, 64)),
        (97, 61, 32, (51, 32)),  # 97 * 32 / 61 = 50.9
        (96, 64, 128, (192, 128)),  # upscaling too
        (64, 64, 20, (20, 20)),
    ],
)
def test_resized_size_keeps_aspect_ratio(
    width: int, height: int, short_side: int, expected: tuple[int, int]
) -> None:
    assert resized_size(width, height, short_side) == expected


@pytest.mark.parametrize(("name", "shape"), [("x264.mp4", (48, 72)), ("portrait.mp4", (96, 48))])
def test_frames_come_out_resized(
    videos: dict[str, Path], name: str, shape: tuple[int, int]
) -> None:
    decoded = decode_frames(videos[name], [5, 6], short_side=48)
    assert decoded.frames.shape == (2, *shape, 3)
    assert frame_numbers(decoded) == [5, 6]


def test_no_indices_gives_an_empty_batch(videos: dict[str, Path]) -> None:
    decoded = decode_frames(videos["x264.mp4"], [], short_side=32)
    assert decoded.frames.shape == (0, 32, 48, 3)
    assert decoded.decoded_count == 0


def test_numpy_indices_are_accepted(videos: dict[str, Path]) -> None:
    indices = np.arange(4, 40, 8)
    assert frame_numbers(decode_frames(videos["x264.mp4"], indices, short_side=32)) == list(indices)


# --- bad inputs: each raises BadVideoError naming the file ---------------------------------------


def _truncated_mp4(directory: Path) -> Path:
    path = write_video(directory / "truncated.mp4", numbered_frames(NUM_FRAMES, 64, 96))
    return truncate_file(path, 0.5)


BAD_FILES = {
    "zero_bytes": (lambda d: write_empty_file(d / "zero_bytes.mp4"), "empty file"),
    "text": (lambda d: write_text_file(d / "text.mp4"), "cannot open"),
    "truncated": (_truncated_mp4, "cannot open"),
    "audio_only": (lambda d: write_audio_only(d / "audio_only.mp4"), "no video stream"),
    "audio_only_webm": (lambda d: write_audio_only(d / "audio_only.webm"), "no video stream"),
    "missing": (lambda d: d / "missing.mp4", "No such file"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_files_raise_bad_video_error(tmp_path: Path, case: str) -> None:
    make, reason = BAD_FILES[case]
    path = make(tmp_path)
    for call in (lambda: probe_video(path), lambda: decode_frames(path, [0], short_side=32)):
        with pytest.raises(BadVideoError, match=reason) as error:
            call()
        assert path.name in str(error.value)
        assert "\n" not in str(error.value)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file_raises_bad_video_error(videos: dict[str, Path], tmp_path: Path) -> None:
    path = tmp_path / "unreadable.mp4"
    path.write_bytes(videos["x264.mp4"].read_bytes())
    path.chmod(0)
    with pytest.raises(BadVideoError, match="unreadable.mp4.*Permission denied"):
        probe_video(path)


@pytest.mark.parametrize("index", [-1, NUM_FRAMES])
def test_index_out_of_range(videos: dict[str, Path], index: int) -> None:
    with pytest.raises(BadVideoError, match=f"x264.mp4: frame index {index} out of range"):
        decode_frames(videos["x264.mp4"], [0, index], short_side=32)


def test_fewer_decoded_frames_than_probed(videos: dict[str, Path], tmp_path: Path) -> None:
    hollow = hollow_out_tail(videos["x264.mp4"], tmp_path / "hollow.mp4", count=5)
    probe = probe_video(hollow)
    assert probe.num_frames == NUM_FRAMES  # the container still lists the hollow packets
    early = [0, 10, 20]
    assert frame_numbers(decode_frames(hollow, early, short_side=32, probe=probe)) == early
    with pytest.raises(BadVideoError, match="hollow.mp4: decoded fewer frames than probed"):
        decode_frames(hollow, [30, NUM_FRAMES - 1], short_side=32, probe=probe)


# --- hostile files: settled by the probe, the same whatever frames are asked for -----------------

HOSTILE_FRAMES = 24  # keyframes at 0, 6, 12 and 18
DECODE_ORDER_NOTE = "timestamps unusable: frames taken in decode order"


def _source(directory: Path, name: str) -> Path:
    codec = {"mp4": "libx264", "mkv": "libx264", "webm": "libvpx"}[name.split(".")[-1]]
    codec = "mpeg4" if name.startswith("mpeg4") else codec
    frames = numbered_frames(HOSTILE_FRAMES, 64, 96)
    return write_video(directory / f"source_{name}", frames, codec=codec, keyframe_interval=6)


def _restarted(directory: Path, name: str) -> Path:
    return restart_timestamps(_source(directory, name), directory / f"restarted_{name}", at=12)


def _garbled(directory: Path, name: str) -> Path:
    return garble_head(_source(directory, name), directory / f"garbled_{name}", count=2)


def _cut(directory: Path, name: str) -> Path:
    return cut_head(_source(directory, name), directory / f"cut_{name}", count=3)


def _garbled_and_restarted(directory: Path, name: str) -> Path:
    garbled = garble_head(_source(directory, name), directory / f"garbled_first_{name}", count=2)
    return restart_timestamps(garbled, directory / f"garbled_restarted_{name}", at=12)


# case -> (make, frame numbers that come out, probe notes)
HOSTILE = {
    f"{how} {name}": (make, numbers, notes)
    for how, make, numbers, notes in [
        ("restarted", _restarted, range(24), (DECODE_ORDER_NOTE,)),
        ("garbled", _garbled, range(6, 24), ("first 6 frames undecodable: skipped",)),
        ("cut", _cut, range(6, 24), ("first 3 frames undecodable: skipped",)),
    ]
    for name in ("x264.mkv" if how == "restarted" else "x264.mp4", "mpeg4.mkv", "vp8.webm")
}
HOSTILE["garbled+restarted mpeg4.mkv"] = (
    _garbled_and_restarted, range(6, 24), (DECODE_ORDER_NOTE, "first 6 frames undecodable: skipped")
)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("hostile")
    return {case: make(directory, case.split()[1]) for case, (make, _, _) in HOSTILE.items()}


@pytest.mark.parametrize("case", HOSTILE)
def test_probe_settles_a_hostile_file(hostile: dict[str, Path], case: str) -> None:
    _, numbers, notes = HOSTILE[case]
    probe = probe_video(hostile[case])
    assert probe.num_frames == len(numbers)
    assert probe.notes == notes
    assert (probe.frame_pts == ()) == (DECODE_ORDER_NOTE in notes)
    decoded = decode_frames(hostile[case], range(probe.num_frames), short_side=32, probe=probe)
    assert frame_numbers(decoded) == list(numbers)


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_decodes_the_same_whatever_is_sampled(
    hostile: dict[str, Path], case: str
) -> None:
    """Each frame alone, on a new open (extraction's way) or with the probe, has the same pixels as
    when all frames are asked for at once."""
    path = hostile[case]
    probe = probe_video(path)
    every = decode_frames(path, range(probe.num_frames), short_side=32, probe=probe).frames
    for index in range(probe.num_frames):
        with open_video(path) as video:
            assert video.probe == probe
            alone = video.decode([index], short_side=32).frames[0]
        np.testing.assert_array_equal(alone, every[index])
        with_probe = decode_frames(path, [index], short_side=32, probe=probe).frames[0]
        np.testing.assert_array_equal(with_probe, every[index])


def test_timestamps_that_restart_while_decode_timestamps_rise(video_dir: Path) -> None:
    """MP4 stores rising decode timestamps; the restart shows only in how far presentation timestamps
    lie from their decode order: 24 frames, more than decoders reorder."""
    source = write_video(video_dir / "source_48.mp4", numbered_frames(48, 64, 96), keyframe_interval=6)
    path = restart_timestamps(source, video_dir / "restarted_48.mp4", at=24)
    with av.open(str(path)) as container:
        dts = [p.dts for p in container.demux(container.streams.video[0]) if p.size > 0]
    assert dts == sorted(set(dts))
    probe = probe_video(path)
    assert (probe.num_frames, probe.notes) == (48, (DECODE_ORDER_NOTE,))
    assert frame_numbers(decode_frames(path, [30, 3], short_side=32, probe=probe)) == [30, 3]


def test_decode_order_skips_the_head_and_stops_after_the_last_wanted_frame(
    hostile: dict[str, Path],
) -> None:
    path = hostile["garbled+restarted mpeg4.mkv"]
    probe = probe_video(path)
    assert probe.head_skipped == 4  # 2 packets rejected, then 4 frames predicted from nothing
    decoded = decode_frames(path, [2, 0], short_side=32, probe=probe)
    assert frame_numbers(decoded) == [8, 6]
    assert decoded.decoded_count == probe.head_skipped + 3


def test_hostile_file_still_seeks(hostile: dict[str, Path]) -> None:
    """A skipped head does not take a file off the fast path: frame 12 is the last keyframe."""
    decoded = decode_frames(hostile["cut x264.mp4"], [14, 12], short_side=32)
    assert frame_numbers(decoded) == [20, 18]
    assert decoded.decoded_count == 3


def test_frames_cut_by_an_edit_list_are_not_a_damaged_head(video_dir: Path) -> None:
    """The first packet is a keyframe shown before the edit list starts: the probe decodes through it
    to the first shown frame, finds nothing wrong and counts only the shown frames."""
    path = start_before_zero(_source(video_dir, "x264.mp4"), video_dir / "edit_list.mp4", count=3)
    with av.open(str(path)) as container:
        first = next(container.demux(container.streams.video[0]))
        assert first.is_keyframe and first.is_discard
    probe = probe_video(path)
    assert (probe.num_frames, probe.notes, probe.head_skipped) == (HOSTILE_FRAMES - 3, (), 0)
    assert probe.decoded_frames == 2  # the discarded keyframe, the first shown frame: no count
    numbers = list(range(3, HOSTILE_FRAMES))
    assert frame_numbers(decode_frames(path, range(probe.num_frames), 32, probe)) == numbers
    assert frame_numbers(decode_frames(path, [0, 5], 32)) == [3, 8]


@pytest.mark.parametrize(
    ("troubles", "start"),
    [
        ([], 0),
        ([0], 0),  # rejected packets before the first output: that output is a keyframe
        ([1], 3),  # a corrupt frame 0 or a rejected packet after it: the next keyframe
        ([1, 4], 6),  # the next GOP has trouble too
        ([7], 0),  # trouble after the first GOP is mid-stream damage, not the head's
        ([7, 1], 3),
        ([7, 9], 0),
        ([1, 4, 7], None),  # no keyframe after the last trouble
    ],
)
def test_usable_frames_start_at_the_first_keyframe_after_the_head_troubles(
    troubles: list[int], start: int | None
) -> None:
    keys = [True, False, False, True, False, False, True, False]
    assert decode._usable_start(keys, troubles) == start


def test_no_frame_decodes(video_dir: Path) -> None:
    source = _source(video_dir, "x264.mp4")
    path = garble_head(source, video_dir / "all_garbled.mp4", count=HOSTILE_FRAMES)
    with pytest.raises(BadVideoError, match="all_garbled.mp4: no frame decodes: Invalid data"):
        probe_video(path)


# name -> (default disposition, chosen stream index, frames, note)
TWO_STREAMS = {
    "main_default.mkv": ("main", 1, 24, "video stream 2 of 2 (default)"),
    "side_default.mkv": ("side", 0, 4, "video stream 1 of 2 (default)"),
    "both_default.mkv": ("both", 1, 24, "video stream 2 of 2 (most frames)"),
    "no_default.mkv": (None, 1, 24, "video stream 2 of 2 (most frames)"),
    "main_default.mp4": ("main", 1, 24, "video stream 2 of 2 (default)"),
    "no_default.mp4": (None, 0, 4, "video stream 1 of 2 (default)"),  # the muxer marks the first
}
SIDE_NUMBERS = [9, 8, 7, 6]


@pytest.mark.parametrize("name", TWO_STREAMS)
def test_the_stream_a_player_would_show(video_dir: Path, name: str) -> None:
    default, index, frames, note = TWO_STREAMS[name]
    side = numbered_frames(10, 32, 48, seed=1)[SIDE_NUMBERS]
    path = write_two_stream_video(video_dir / name, numbered_frames(24, 64, 96), side, default)
    with av.open(str(path)) as container:
        assert container.streams.video[0].codec_context.width == 48  # the side stream comes first
    probe = probe_video(path)
    assert (probe.stream_index, probe.num_frames, probe.notes) == (index, frames, (note,))
    expected = list(range(24)) if index == 1 else SIDE_NUMBERS
    assert probe.width == (96 if index == 1 else 48)
    assert frame_numbers(decode_frames(path, range(frames), 32, probe)) == expected
    assert frame_numbers(decode_frames(path, [frames - 1, 1], 32)) == [expected[-1], expected[1]]


def test_equal_streams_choose_the_largest(video_dir: Path) -> None:
    side = numbered_frames(24, 32, 48, seed=1)
    path = write_two_stream_video(video_dir / "equal.mkv", numbered_frames(24, 64, 96), side)
    probe = probe_video(path)
    assert (probe.stream_index, probe.notes) == (1, ("video stream 2 of 2 (largest)",))


def _probe_of(frame_pts: tuple[int, ...], time_base: Fraction, fps: float | None, num_frames: int) -> decode.VideoProbe:
    return decode.VideoProbe("v.mp4", num_frames, 64, 48, frame_pts, time_base, fps, 0, 0, (), 1)


@pytest.mark.parametrize("frame_pts, time_base, fps", [
    (tuple(range(1000, 1050)), Fraction(1, 25), 25.0),  # timestamps from the first frame, not from 0
    (tuple(range(0, 50 * 512, 512)), Fraction(1, 12800), 25.0),  # mp4's usual time base
    ((), Fraction(1, 1), 25.0),  # decode order: frames 1 / fps apart
])
def test_segment_frames_are_those_whose_time_is_in_the_segment(frame_pts, time_base, fps) -> None:
    probe = _probe_of(frame_pts, time_base, fps, 50)  # 50 frames at 0, 0.04, ..., 1.96 s
    assert decode.segment_frames(probe, 0.5, 1.0) == (range(13, 25), "")  # 0.52 .. 0.96 s
    assert decode.segment_frames(probe, 0.48, 0.52) == (range(12, 13), "")  # start in, end out
    assert decode.segment_frames(probe, 0, 2.0) == (range(0, 50), "")  # the last frame lasts until 2.0 s
    assert decode.segment_frames(probe, 1.5, 3.0) == (range(38, 50), "segment ends 1.00 s after the video")
    with pytest.raises(BadVideoError, match=r"segment 2.5-3 s holds no frame: the video's frames span 0-1.96 s"):
        decode.segment_frames(probe, 2.5, 3.0)


def test_a_segment_needs_timestamps_or_a_frame_rate() -> None:
    with pytest.raises(BadVideoError, match="the segment's frames cannot be found"):
        decode.segment_frames(_probe_of((), Fraction(1, 1), None, 50), 0.5, 1.0)
