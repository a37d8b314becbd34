"""Tests for evl_cache/video/synthetic.py: the MOTION_CLASSES set is deterministic, its squares move as
their class says and their first frame does not give the direction away; SAMPLE_CLASSES' frame order
twins show the same frames in opposite orders; the hostile copies of a video change only what they say."""
from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np
import pytest

from evl_cache.video.synthetic import (
    MOTION_CLASSES,
    SAMPLE_CLASSES,
    ShapeClass,
    cut_head,
    frame_order_twins,
    garble_head,
    make_sample_dataset,
    moving_shape_frames,
    numbered_frames,
    restart_timestamps,
    write_video,
)

SIZE = (32, 40)


def _digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.mp4")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _frames(name: str, seed: int, num_frames: int = 6, classes=MOTION_CLASSES) -> np.ndarray:
    spec = classes[name]
    return moving_shape_frames(num_frames, *SIZE, spec.shape, spec.color, spec.direction,
                               np.random.default_rng(seed), spec.travel_range, spec.side_range,
                               spec.unbiased_start)


def _centre(frame: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """(y, x) of the pixels painted in the shape's colour."""
    ys, xs = np.nonzero((frame == np.array(color, np.uint8)).all(-1))
    return np.array([ys.mean(), xs.mean()])


def test_motion_classes_generate_the_same_videos_every_time(tmp_path: Path) -> None:
    counts = {"train": 1, "val": 1}
    first = make_sample_dataset(tmp_path / "a", MOTION_CLASSES, counts, num_frames=8, size=SIZE)
    again = make_sample_dataset(tmp_path / "b", MOTION_CLASSES, counts, num_frames=8, size=SIZE)
    other = make_sample_dataset(tmp_path / "c", MOTION_CLASSES, counts, num_frames=8, size=SIZE, seed=1)
    assert sorted(p.name for p in (first / "train").iterdir()) == sorted(MOTION_CLASSES)
    assert _digest(first) == _digest(again)
    assert _digest(first) != _digest(other)


@pytest.mark.parametrize("name", sorted(MOTION_CLASSES))
def test_squares_move_in_their_direction_by_their_speed(name: str) -> None:
    spec = MOTION_CLASSES[name]
    axis, sign = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}[spec.direction]
    for seed in range(5):
        frames = _frames(name, seed)
        moved = _centre(frames[-1], spec.color) - _centre(frames[0], spec.color)
        side = int(np.sqrt((frames[0] == np.array(spec.color, np.uint8)).all(-1).sum()))
        free = SIZE[axis] - side
        low, high = spec.travel_range
        assert abs(moved[1 - axis]) < 1e-9  # no motion across the axis
        assert low * free - 1 <= sign * moved[axis] <= high * free + 1  # pixel rounding


def test_start_does_not_depend_on_the_direction_along_an_axis() -> None:
    for seed in range(3):
        for forward, back in (("right_slow", "left_slow"), ("down_fast", "up_fast")):
            forward_frames, back_frames = _frames(forward, seed), _frames(back, seed)
            np.testing.assert_array_equal(forward_frames[0], back_frames[0])
            assert not np.array_equal(forward_frames[-1], back_frames[-1])


def _packets(path: Path) -> list[tuple[int, int, bool]]:
    """(pts, size, keyframe) of each video packet, decode order."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return [(p.pts, p.size, p.is_keyframe) for p in container.demux(stream) if p.size > 0]


def test_hostile_copies_change_only_what_they_say(tmp_path: Path) -> None:
    source = write_video(tmp_path / "source.mkv", numbered_frames(12, 32, 48), keyframe_interval=4)
    packets = _packets(source)
    restarted = _packets(restart_timestamps(source, tmp_path / "restarted.mkv", at=8))
    assert [p[1:] for p in restarted] == [p[1:] for p in packets]
    assert [p[0] for p in restarted[:8]] == [p[0] for p in packets[:8]]
    assert max(p[0] for p in restarted[8:]) < max(p[0] for p in packets[:8])  # back in time
    assert len({p[0] for p in restarted}) == len(restarted)  # and still distinct
    garbled_path = garble_head(source, tmp_path / "garbled.mkv", count=2)
    # Timestamps and sizes kept; the keyframe flag is the H.264 parser's reading of the bytes.
    assert [p[:2] for p in _packets(garbled_path)] == [p[:2] for p in packets]
    with av.open(str(garbled_path)) as garbled, av.open(str(source)) as original:
        first = [bytes(next(c.demux(c.streams.video[0]))) for c in (garbled, original)]
    assert first[0] != first[1]
    assert _packets(cut_head(source, tmp_path / "cut.mkv", count=3)) == packets[3:]


def test_frame_order_twins_show_the_same_positions_in_reverse_order() -> None:
    assert frame_order_twins(SAMPLE_CLASSES) == [("slide_left", "slide_right")]
    color = SAMPLE_CLASSES["slide_left"].color
    for seed in range(3):
        left, right = (_frames(name, seed, 8, SAMPLE_CLASSES) for name in ("slide_left", "slide_right"))
        left_path = np.array([_centre(frame, color) for frame in left])
        right_path = np.array([_centre(frame, color) for frame in right])
        np.testing.assert_allclose(left_path, right_path[::-1])
        assert left_path[-1, 1] < left_path[0, 1]


def test_motion_classes_have_no_frame_order_twins() -> None:
    # Starts drawn alike put a right-mover's path right of a left-mover's: the frames as a set tell them apart.
    assert frame_order_twins(MOTION_CLASSES) == []
    color = MOTION_CLASSES["left_fast"].color
    mean_x = {name: np.mean([_centre(frame, color)[1] for seed in range(20) for frame in _frames(name, seed)])
              for name in ("left_fast", "right_fast")}
    assert mean_x["right_fast"] - mean_x["left_fast"] > 5


def test_frame_order_twins_are_one_look_on_one_axis_in_opposite_directions() -> None:
    color = (240, 200, 40)
    classes = {"left": ShapeClass("square", color, "left"), "right": ShapeClass("square", color, "right"),
               "up": ShapeClass("square", color, "up"), "other_down": ShapeClass("square", (1, 2, 3), "down"),
               "down": ShapeClass("square", color, "down"), "round_left": ShapeClass("circle", color, "left"),
               "still": ShapeClass("square", color, "still")}
    assert frame_order_twins(classes) == [("left", "right"), ("up", "down")]
