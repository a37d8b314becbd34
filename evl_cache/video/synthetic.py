"""Synthetic videos, written with PyAV: for tests, the demo and benchmarks, and for anyone who wants
a small sample dataset to try the tool on.

- `write_video` encodes an RGB array (libx264, mpeg4 or libvpx; optional audio; optional variable
  frame rate).
- `numbered_frames` / `read_frame_number` write each frame's index into its pixels, so a test can
  tell exactly which frames a decoder returned.
- `moving_shape_frames` and `make_sample_dataset` render a tiny action dataset: in SAMPLE_CLASSES
  two classes differ only in the order of their frames, two only in colour; MOTION_CLASSES is a
  harder set told apart only by direction and speed. `frame_order_twins` names the classes that a
  model blind to frame order cannot tell apart.
- `write_empty_file`, `write_text_file`, `truncate_file`, `write_audio_only` and `hollow_out_tail`
  make the broken inputs that decoding must reject.
- `write_two_stream_video`, `restart_timestamps`, `garble_head`, `cut_head` and `start_before_zero`
  make hostile inputs that decode only with care: a side video stream, timestamps that go backwards,
  a damaged start, a start mid-GOP, frames cut by an edit list.
"""
from __future__ import annotations

import os
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType

import av
import numpy as np

# Audio codec and sample rate by file extension: Opus for WebM, AAC elsewhere.
_AUDIO_CODECS = {".webm": ("libopus", 48000)}
_DEFAULT_AUDIO_CODEC = ("aac", 44100)
# No random IDs or version strings in the container: the same frames give the same bytes.
_REPRODUCIBLE = {"fflags": "+bitexact"}
# Variable-frame-rate timestamps are written in milliseconds (WebM's own time base).
_VFR_TIME_BASE = Fraction(1, 1000)


def _add_audio_stream(container: av.container.OutputContainer, path: Path) -> av.AudioStream:
    """Add a mono audio stream (the codec suits the container); add every stream before muxing."""
    codec, rate = _AUDIO_CODECS.get(path.suffix.lower(), _DEFAULT_AUDIO_CODEC)
    return container.add_stream(codec, rate=rate, layout="mono")


def _encode_sine(
    container: av.container.OutputContainer, stream: av.AudioStream, seconds: float
) -> None:
    """Encode a quiet 440 Hz sine of `seconds` into `stream`."""
    rate = stream.codec_context.sample_rate
    t = np.arange(max(1, round(seconds * rate))) / rate
    samples = (0.2 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
    frame.sample_rate = rate
    frame.pts = 0
    frame.time_base = Fraction(1, rate)
    for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


def write_video(
    path: str | Path,
    frames: np.ndarray,
    fps: float = 25,
    codec: str = "libx264",
    audio: bool = False,
    frame_times: Sequence[float] | None = None,
    keyframe_interval: int | None = None,
) -> Path:
    """Encode RGB `frames` (uint8 [T, H, W, 3]) to `path`; the container follows the extension.

    `codec` is "libx264" (.mp4/.mkv), "mpeg4" (.mp4/.avi/.mkv) or "libvpx" (.webm). Odd frame sizes
    work with all three: libx264 then writes 4:4:4 chroma (4:2:0 needs even sizes). `audio` adds
    a sine track (AAC, or Opus for .webm). `frame_times` (seconds, increasing) gives each frame its
    own timestamp, for a variable frame rate; `fps` is then only the nominal rate.
    `keyframe_interval` caps the GOP length (codec default otherwise).

    The same arguments give the same bytes, except libx264 at sizes odd in both dimensions, whose
    encoding varies slightly from run to run (the decoded frames differ, not only the bytes).
    """
    path = Path(path)
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or len(frames) == 0:
        raise ValueError(f"frames must be uint8 [T>0, H, W, 3], got {frames.dtype} {frames.shape}")
    num_frames, height, width = frames.shape[:3]
    rate = Fraction(fps).limit_denominator(1001)
    if frame_times is None:
        time_base = 1 / rate
        pts = list(range(num_frames))
        seconds = num_frames / float(rate)
    else:
        if len(frame_times) != num_frames:
            raise ValueError(f"{len(frame_times)} frame_times for {num_frames} frames")
        time_base = _VFR_TIME_BASE
        pts = [round(t / time_base) for t in frame_times]
        if any(b <= a for a, b in zip(pts, pts[1:])) or pts[0] < 0:
            raise ValueError("frame_times must be non-negative and increase by at least 1 ms")
        seconds = float(frame_times[-1]) + 1 / float(rate)

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", container_options=_REPRODUCIBLE) as container:
        stream = _add_video_stream(container, codec, rate, time_base, width, height, keyframe_interval)
        audio_stream = _add_audio_stream(container, path) if audio else None
        _encode_frames(container, stream, frames, pts, time_base)
        if audio_stream is not None:
            _encode_sine(container, audio_stream, seconds)
    return path


def _add_video_stream(
    container: av.container.OutputContainer,
    codec: str,
    rate: Fraction,
    time_base: Fraction,
    width: int,
    height: int,
    keyframe_interval: int | None,
) -> av.VideoStream:
    """Add a video stream encoded reproducibly (see `write_video`)."""
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height = width, height
    stream.codec_context.time_base = time_base
    stream.codec_context.thread_count = 1  # threaded encoders vary from run to run
    if codec == "libx264" and (width % 2 or height % 2):
        stream.pix_fmt = "yuv444p"
    if keyframe_interval is not None:
        stream.codec_context.gop_size = keyframe_interval
    return stream


def _encode_frames(
    container: av.container.OutputContainer,
    stream: av.VideoStream,
    frames: np.ndarray,
    pts: Sequence[int],
    time_base: Fraction,
) -> None:
    """Encode RGB `frames` with timestamps `pts` into `stream`, then flush it."""
    for image, frame_pts in zip(frames, pts):
        # Convert here: the conversion PyAV does inside `encode` varies from run to run.
        frame = av.VideoFrame.from_ndarray(image, format="rgb24")
        frame = frame.reformat(format=stream.pix_fmt)
        frame.pts = frame_pts
        frame.time_base = time_base
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode(None):
        container.mux(packet)


# --- frames that carry their own index ---------------------------------------------------------

FRAME_NUMBER_BITS = 8  # frames 0 .. 255
_BAR_DARK, _BAR_LIGHT = 16, 235


def numbered_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Frames whose index is drawn as `FRAME_NUMBER_BITS` dark/light vertical bars (most significant
    bit left) over the top half, above a static noise texture; `read_frame_number` reads it back,
    also after lossy coding and resizing.
    """
    if num_frames > 2**FRAME_NUMBER_BITS:
        raise ValueError(f"at most {2**FRAME_NUMBER_BITS} numbered frames, got {num_frames}")
    rng = np.random.default_rng(seed)
    texture = rng.integers(60, 196, size=(height, width, 3), dtype=np.uint8)
    frames = np.repeat(texture[None], num_frames, axis=0)
    edges = np.linspace(0, width, FRAME_NUMBER_BITS + 1).round().astype(int)
    for index in range(num_frames):
        for bit in range(FRAME_NUMBER_BITS):
            on = (index >> (FRAME_NUMBER_BITS - 1 - bit)) & 1
            shade = _BAR_LIGHT if on else _BAR_DARK
            frames[index, : height // 2, edges[bit] : edges[bit + 1]] = shade
    return frames


def read_frame_number(frame: np.ndarray) -> int:
    """The index `numbered_frames` drew into `frame` (RGB [H, W, 3], any size)."""
    height, width = frame.shape[:2]
    rows = frame[height // 10 : max(height // 10 + 1, 2 * height // 5)]
    edges = np.linspace(0, width, FRAME_NUMBER_BITS + 1)
    number = 0
    for bit in range(FRAME_NUMBER_BITS):
        left, right = edges[bit], edges[bit + 1]
        margin = (right - left) / 4
        bar = rows[:, int(left + margin) : max(int(left + margin) + 1, int(right - margin))]
        number = (number << 1) | int(bar.mean() > (_BAR_DARK + _BAR_LIGHT) / 2)
    return number


# --- a tiny action dataset ---------------------------------------------------------------------

SHAPES = ("square", "circle")
DIRECTIONS = ("left", "right", "up", "down", "still")


def moving_shape_frames(
    num_frames: int,
    height: int,
    width: int,
    shape: str,
    color: Sequence[int],
    direction: str,
    rng: np.random.Generator,
    travel_range: tuple[float, float] = (0.4, 0.9),
    side_range: tuple[float, float] = (0.25, 0.5),
    unbiased_start: bool = False,
) -> np.ndarray:
    """A `shape` ("square" or "circle") of RGB `color` moving in `direction` ("left", "right", "up",
    "down" or "still") over a noisy textured background; its size, start, speed and the background
    come from `rng`. Returns uint8 [num_frames, height, width, 3]; the shape stays inside the frame.

    The shape's side is drawn from `side_range` (fractions of the shorter frame side) and the
    distance it moves from `travel_range` (fractions of the range free for it along its direction).
    By default the path is drawn alike for both directions of an axis, anywhere in that range, and
    run through one way or the other (the same `rng` gives a left-mover a right-mover's positions in
    reverse order): the frames as a set do not tell the direction, only their order does (where a
    shape starts hints at it: a right-mover starts left of the middle more often). `unbiased_start`
    draws the start alike instead (from the middle part of the range; `travel_range` at most 0.5):
    then the start does not hint at the direction, but the path does, even to a model blind to
    frame order (a right-mover's lies right of its start, a left-mover's left of it).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if unbiased_start and travel_range[1] > 0.5:
        raise ValueError(f"unbiased_start needs travel_range at most 0.5, got {travel_range}")
    shorter = min(height, width)
    smallest, largest = (int(shorter * fraction) for fraction in side_range)
    side = int(rng.integers(max(3, smallest), max(4, largest) + 1))
    base = rng.uniform(50, 170) + rng.uniform(-15, 15, size=3)  # greyish: colour belongs to the shape
    background = base + rng.normal(0, 18, size=(height, width, 3))

    # Top-left corner per frame: uniform motion over a random part of the free range.
    free_y, free_x = height - side, width - side
    start_y, start_x = rng.uniform(0, free_y), rng.uniform(0, free_x)
    progress = np.linspace(0.0, 1.0, num_frames)
    ys, xs = np.full(num_frames, start_y), np.full(num_frames, start_x)
    if direction in ("left", "right"):
        xs = _track(free_x, direction == "right", progress, travel_range, unbiased_start, rng)
    elif direction in ("up", "down"):
        ys = _track(free_y, direction == "down", progress, travel_range, unbiased_start, rng)

    grid_y, grid_x = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        image = background + rng.normal(0, 3, size=background.shape)
        if shape == "square":
            inside = (grid_y >= ys[t]) & (grid_y < ys[t] + side)
            inside &= (grid_x >= xs[t]) & (grid_x < xs[t] + side)
        else:
            radius = side / 2
            inside = (grid_y - ys[t] - radius) ** 2 + (grid_x - xs[t] - radius) ** 2 <= radius**2
        image[inside] = color
        frames[t] = np.clip(image, 0, 255).astype(np.uint8)
    return frames


def _track(free: float, forward: bool, progress: np.ndarray, travel_range: tuple[float, float],
           unbiased_start: bool, rng: np.random.Generator) -> np.ndarray:
    """Positions along one axis (0 .. `free`) of a uniform motion over `progress` (0 .. 1), forward
    (increasing) or back; see `moving_shape_frames` for `travel_range` and `unbiased_start`."""
    distance = rng.uniform(*travel_range) * free
    if unbiased_start:
        start = rng.uniform(distance, free - distance)
        return start + distance * (progress if forward else -progress)
    first = rng.uniform(0, free - distance)
    return first + distance * (progress if forward else 1 - progress)


@dataclass(frozen=True)
class ShapeClass:
    """How the videos of one synthetic class look and move."""

    shape: str
    color: tuple[int, int, int]
    direction: str
    travel_range: tuple[float, float] = (0.4, 0.9)  # see `moving_shape_frames`
    side_range: tuple[float, float] = (0.25, 0.5)
    unbiased_start: bool = False


# The demo's sample: slide_left and slide_right show the same frames in distribution, in opposite
# orders (frame order twins), so only a model that sees the order tells them apart; red_still and
# blue_still differ only in colour.
SAMPLE_CLASSES: Mapping[str, ShapeClass] = MappingProxyType(
    {
        "slide_left": ShapeClass("square", (240, 200, 40), "left"),
        "slide_right": ShapeClass("square", (240, 200, 40), "right"),
        "red_still": ShapeClass("circle", (220, 40, 40), "still"),
        "blue_still": ShapeClass("circle", (40, 60, 220), "still"),
    }
)
# The demo's and pipelines/sample.toml's counts: 48 validation videos of the twins put one standard
# deviation of a guess between them at 0.07.
SAMPLE_SPLITS: Mapping[str, int] = MappingProxyType({"train": 16, "val": 24})

# A harder set (benchmarks/bench_storage.py): one look, a small square, in eight classes told apart
# only by direction and speed. Starts are drawn alike for both directions of an axis, so where the
# square starts does not give its direction away, as it does in SAMPLE_CLASSES; its path does, so
# these classes have no frame order twins (see `moving_shape_frames`).
MOTION_CLASSES: Mapping[str, ShapeClass] = MappingProxyType(
    {
        f"{direction}_{speed}": ShapeClass(
            "square", (240, 200, 40), direction, travel, side_range=(0.2, 0.35), unbiased_start=True
        )
        for direction in ("left", "right", "up", "down")
        for speed, travel in (("slow", (0.15, 0.25)), ("fast", (0.35, 0.5)))
    }
)
MOTION_SPLITS: Mapping[str, int] = MappingProxyType({"train": 24, "val": 16})


_AXIS = {"left": "x", "right": "x", "up": "y", "down": "y"}


def frame_order_twins(classes: Mapping[str, ShapeClass]) -> list[tuple[str, ...]]:
    """The groups of `classes` whose videos differ only in the order of their frames: the same look
    and the same path drawn alike, run through in opposite directions along one axis. A model blind
    to frame order sees the same frames (in distribution) in every class of a group, so it can only
    guess among them."""
    groups: dict[tuple, list[str]] = {}
    for name, spec in classes.items():
        if spec.direction in _AXIS and not spec.unbiased_start:
            key = (spec.shape, spec.color, _AXIS[spec.direction], spec.travel_range, spec.side_range)
            groups.setdefault(key, []).append(name)
    return [tuple(names) for names in groups.values()
            if len({classes[name].direction for name in names}) > 1]


def make_sample_dataset(
    root: str | Path,
    classes: Mapping[str, ShapeClass] = SAMPLE_CLASSES,
    videos_per_class: Mapping[str, int] = SAMPLE_SPLITS,
    num_frames: int = 48,
    size: tuple[int, int] = (64, 80),
    seed: int = 0,
) -> Path:
    """Write `root/<split>/<class>/<class>_<nnn>.mp4` (libx264, 25 fps), `videos_per_class[split]`
    videos per class and split, each `size` = (height, width). Every video draws its own size,
    position, speed and background from `seed` and its own name, so the dataset is deterministic and
    a video does not change when others are added.
    """
    root = Path(root)
    height, width = size
    for split, count in videos_per_class.items():
        for name, spec in classes.items():
            for number in range(count):
                video_name = f"{name}_{number:03d}.mp4"
                video_seed = zlib.crc32(f"{split}/{name}/{video_name}".encode())
                rng = np.random.default_rng([seed, video_seed])
                frames = moving_shape_frames(
                    num_frames, height, width, spec.shape, spec.color, spec.direction, rng,
                    spec.travel_range, spec.side_range, spec.unbiased_start,
                )
                write_video(root / split / name / video_name, frames)
    return root


# --- broken inputs -----------------------------------------------------------------------------


def write_empty_file(path: str | Path) -> Path:
    """A zero-byte file (a failed download)."""
    path = Path(path)
    path.write_bytes(b"")
    return path


def write_named_pipe(path: str | Path) -> Path:
    """A named pipe, usually under a video's name: opening it to read blocks until a writer comes
    (here: never), as a file on a stalled network mount does. It makes a decoder hang."""
    path = Path(path)
    os.mkfifo(path)
    return path


def write_text_file(path: str | Path, text: str = "this is not a video\n") -> Path:
    """A text file, usually under a video's name."""
    path = Path(path)
    path.write_text(text)
    return path


def truncate_file(path: str | Path, fraction: float) -> Path:
    """Cut `path` in place to its first `fraction` of bytes (an interrupted download)."""
    path = Path(path)
    with path.open("r+b") as file:
        file.truncate(int(path.stat().st_size * fraction))
    return path


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """A file with a sine audio track and no video stream (AAC, or Opus for .webm)."""
    path = Path(path)
    with av.open(str(path), mode="w", container_options=_REPRODUCIBLE) as container:
        _encode_sine(container, _add_audio_stream(container, path), seconds)
    return path


# An H.264 NAL unit of type 10, "end of sequence", behind its 4-byte length: a valid packet that
# decodes to no picture.
_H264_END_OF_SEQUENCE = b"\x00\x00\x00\x01\x0a"


def hollow_out_tail(source: str | Path, destination: str | Path, count: int) -> Path:
    """Copy an H.264 video (length-prefixed NAL units, as in .mp4 and .mkv) to `destination`,
    replacing the payload of its last `count` video packets (decode order) with an end-of-sequence
    unit: the container still lists those frames, but the decoder produces none of them.
    """
    destination = Path(destination)
    with av.open(str(source)) as reader, av.open(str(destination), mode="w") as writer:
        video_in = reader.streams.video[0]
        video_out = writer.add_stream_from_template(video_in)
        packets = [packet for packet in reader.demux(video_in) if packet.size > 0]
        for position, packet in enumerate(packets):
            if position >= len(packets) - count:
                hollow = av.Packet(_H264_END_OF_SEQUENCE)
                hollow.pts, hollow.dts, hollow.time_base = packet.pts, packet.dts, packet.time_base
                packet = hollow
            packet.stream = video_out
            writer.mux(packet)
    return destination


# --- hostile files: they decode, but only with care ---------------------------------------------


def write_two_stream_video(
    path: str | Path,
    frames: np.ndarray,
    side_frames: np.ndarray,
    default: str | None = None,
    fps: float = 25,
) -> Path:
    """Encode `frames` as the second video stream of `path`, after a side stream of `side_frames`
    (a thumbnail or preview track, at 1 fps), both libx264 with a keyframe every 6 frames.

    `default` ("main", "side", "both" or None) marks which streams carry the default disposition.
    Matroska keeps exactly that; the MP4 muxer marks the first stream (the side one) when no stream
    is marked.
    """
    path = Path(path)
    marked = {"main": ("main",), "side": ("side",), "both": ("main", "side"), None: ()}[default]
    options = dict(_REPRODUCIBLE, default_mode="passthrough") if path.suffix == ".mkv" else _REPRODUCIBLE
    tracks = {"side": (side_frames, Fraction(1)), "main": (frames, Fraction(fps).limit_denominator(1001))}
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", container_options=options) as container:
        streams = {}
        for name, (images, rate) in tracks.items():
            height, width = images.shape[1:3]
            streams[name] = _add_video_stream(container, "libx264", rate, 1 / rate, width, height, 6)
            streams[name].disposition = (
                av.stream.Disposition.default if name in marked else av.stream.Disposition(0)
            )
        for name, (images, rate) in tracks.items():
            _encode_frames(container, streams[name], images, range(len(images)), 1 / rate)
    return path


def _remux_video(source: str | Path, destination: str | Path, edit) -> Path:  # type: ignore[no-untyped-def]
    """Copy the first video stream of `source` to `destination`, its packets (decode order, flush
    packets left out) passed through `edit`, a function from a packet list to a packet list."""
    destination = Path(destination)
    with av.open(str(source)) as reader, av.open(
        str(destination), mode="w", container_options=_REPRODUCIBLE
    ) as writer:
        video_in = reader.streams.video[0]
        video_out = writer.add_stream_from_template(video_in)
        for packet in edit([packet for packet in reader.demux(video_in) if packet.size > 0]):
            packet.stream = video_out
            writer.mux(packet)
    return destination


def restart_timestamps(source: str | Path, destination: str | Path, at: int) -> Path:
    """Copy a video to `destination` with timestamps that restart at packet `at` (decode order; a
    keyframe), as in a file joined from two recordings: the second part's timestamps start half a
    frame after the first part's, so they fall between the first part's and stay distinct.

    Matroska (.mkv, .webm) stores presentation timestamps only, so demuxers guess decode timestamps
    that go back too; MP4 stores decode timestamps, written here rising (one tick apart, below every
    presentation timestamp), so only the presentation timestamps give the restart away.
    """

    def restart(packets: list[av.Packet]) -> list[av.Packet]:
        frame_duration = min(b.pts - a.pts for a, b in zip(packets, packets[1:]) if b.pts > a.pts)
        shift = packets[at].pts - (packets[0].pts + frame_duration // 2)
        for position, packet in enumerate(packets):
            if position >= at:
                packet.pts -= shift
            packet.dts = position - len(packets)  # increasing and below every pts, as muxers want
        return packets

    return _remux_video(source, destination, restart)


def garble_head(source: str | Path, destination: str | Path, count: int, seed: int = 0) -> Path:
    """Copy a video with the bytes of its first `count` packets (decode order) replaced by noise,
    sizes, timestamps and keyframe flags kept, as in a download whose start was damaged. (Demuxers
    that parse H.264, as Matroska's does, then no longer read the first packet as a keyframe.)"""

    def garble(packets: list[av.Packet]) -> list[av.Packet]:
        rng = np.random.default_rng(seed)
        for packet in packets[:count]:
            packet.update(rng.integers(0, 256, packet.size, dtype=np.uint8).tobytes())
        return packets

    return _remux_video(source, destination, garble)


def cut_head(source: str | Path, destination: str | Path, count: int) -> Path:
    """Copy a video without its first `count` packets (decode order), so it starts mid-GOP, as a
    cut without re-encoding that ignores keyframes does."""
    return _remux_video(source, destination, lambda packets: packets[count:])


def start_before_zero(source: str | Path, destination: str | Path, count: int) -> Path:
    """Copy an MP4 with its timestamps moved `count` frames back, so its first frames lie before 0:
    the muxer writes an edit list that starts at 0, and demuxers mark the packets before it as
    discarded (decoded as references, never shown), as `ffmpeg -ss ... -c copy` cuts do."""

    def move_back(packets: list[av.Packet]) -> list[av.Packet]:
        frame_duration = min(b.pts - a.pts for a, b in zip(packets, packets[1:]) if b.pts > a.pts)
        for packet in packets:
            packet.pts -= count * frame_duration
            packet.dts -= count * frame_duration
        return packets

    return _remux_video(source, destination, move_back)
