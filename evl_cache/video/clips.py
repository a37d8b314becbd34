"""From a video file to its planned views as backbone-sized uint8 clips.

Used by extraction (in DataLoader workers) and by prediction on new videos, so both see exactly the
same pixels for the same sampling: plan the views, decode the union of their frames once, then crop
(evaluation views) or augment (training views) each.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import BadVideoError
from .decode import open_video, segment_frames
from .pixels import CROP_SCALE, RANDAUGMENT, augmented_clip, spatial_crops
from .sampling import ViewPlan, plan_views

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipSpec:
    """How a video becomes clips: sampling, views, input size, resize, crops and augmentation.

    Evaluation (non-training) videos get `eval_views` temporal x `spatial_views` spatial views, view
    index t * spatial_views + s. Frames are resized so their short side is `short_side` (default
    `size`) before the crop; three spatial views need `short_side == size` (they span the short side).
    """
    mode: str
    frames: int
    stride: int
    eval_views: int
    train_views: int
    size: int
    seed: int
    flip: bool = True
    randaugment: bool = True
    short_side: int | None = None
    spatial_views: int = 1

    @classmethod
    def from_cache(cls, attrs: dict) -> "ClipSpec":
        """The spec a cache (or a run's record of its cache) was extracted with; a record without
        `short_side` or `crop` means the input size and the centre crop."""
        sampling, augmentation = attrs["sampling"], attrs["sampling"]["train_augmentation"]
        preprocessing = attrs["preprocessing"]
        return cls(sampling["mode"], sampling["frames"], sampling["stride"], sampling["eval_views"],
                   sampling["train_views"], preprocessing["size"], sampling["seed"],
                   augmentation["flip"], augmentation["randaugment"] is not None,
                   preprocessing.get("short_side"), 3 if preprocessing.get("crop") == "three" else 1)

    @property
    def resize(self) -> int:
        """The short side frames are resized to before cropping."""
        return self.short_side or self.size

    def views(self, split: str) -> int:
        """How many views a video of `split` gets."""
        return self.train_views if split == "train" else self.eval_views * self.spatial_views

    def sampling_record(self) -> dict:
        """The cache's `sampling` attribute for this spec (`from_cache` reads it back)."""
        return {"mode": self.mode, "frames": self.frames, "stride": self.stride, "eval_views": self.eval_views,
                "train_views": self.train_views, "seed": self.seed,
                "train_augmentation": {"random_resized_crop": list(CROP_SCALE), "flip": self.flip,
                                       "randaugment": RANDAUGMENT if self.randaugment else None}}

    def preprocessing_record(self, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
        """The cache's `preprocessing` attribute: short side resized to `size` (or to `short_side`, a key
        only present when it differs), the centre crop (or "three" crops), the normalisation mean/std."""
        record = {"resize": "short_side", "crop": "centre" if self.spatial_views == 1 else "three",
                  "size": self.size, "mean": list(mean), "std": list(std)}
        if self.resize != self.size:
            record["short_side"] = self.resize
        return record


@dataclass
class VideoClips:
    """One video's views, or the reason it failed."""
    index: int
    clips: torch.Tensor | None  # uint8 [V, T, 3, S, S], V = ClipSpec.views(split)
    num_frames: int
    error: str
    decoded_frames: int  # frames decoded, probing included
    note: str = ""  # what was unusual about the file (the probe's notes joined by "; "); "" if nothing


@dataclass
class PlannedFrames:
    """A video's decoded frames for each of its planned views."""
    plans: list[ViewPlan]
    frames: list[np.ndarray]  # per view, uint8 [T, H, W, 3] with the short side resized
    num_frames: int  # frames in the video (or in its segment)
    decoded_frames: int  # frames decoded, probing included
    note: str  # what was unusual about the file ("" if nothing)


def decode_planned(path: Path, plan: Callable[[int], list[ViewPlan]], short_side: int,
                   segment: tuple[float, float] | None = None) -> PlannedFrames:
    """Probe, plan the views for the video's frame count (within the segment, if any), and decode the
    union of their frames once, on the same open of the file, resized to `short_side`."""
    with open_video(path) as video:
        probe = video.probe
        frames_in, notes = range(probe.num_frames), list(probe.notes)
        if segment is not None:
            frames_in, segment_note = segment_frames(probe, *segment)
            notes += [segment_note] if segment_note else []
        plans = plan(len(frames_in))
        wanted = sorted({frames_in[i] for view in plans for i in view.frame_indices})
        decoded = video.decode(wanted, short_side=short_side)
    position = {frame: i for i, frame in enumerate(wanted)}
    frames = [decoded.frames[[position[frames_in[i]] for i in view.frame_indices]] for view in plans]
    return PlannedFrames(plans, frames, len(frames_in), probe.decoded_frames + decoded.decoded_count,
                         "; ".join(notes))


def _load(path: Path, split: str, index: int, spec: ClipSpec, segment: tuple[float, float] | None) -> VideoClips:
    """The planned views of `spec`, decoded, then cropped (evaluation views) or augmented."""
    planned = decode_planned(path, lambda n: plan_views(n, split, spec.mode, spec.frames, spec.stride,
                                                        spec.eval_views, spec.train_views, spec.seed, index),
                             spec.resize, segment)
    crops = 1 if split == "train" else spec.spatial_views  # training view 0 is the plain centre clip
    clips = []
    for plan, frames in zip(planned.plans, planned.frames):
        if plan.augment:
            clips.append(augmented_clip(frames, spec.size, plan.seed, spec.flip, spec.randaugment))
        else:
            clips += spatial_crops(frames, spec.size, crops)
    return VideoClips(index, torch.stack(clips), planned.num_frames, "", planned.decoded_frames, planned.note)


def planned_frame_numbers(num_frames: int, split: str, index: int, spec: ClipSpec) -> list[tuple[int, ...]]:
    """For each view `read_video_clips` gives (in view order), the numbers of its frames in a video of
    `num_frames` frames: what a picture of a view calls its frames."""
    plans = plan_views(num_frames, split, spec.mode, spec.frames, spec.stride, spec.eval_views, spec.train_views,
                       spec.seed, index)
    crops = 1 if split == "train" else spec.spatial_views
    return [plan.frame_indices for plan in plans for _ in range(crops)]


@contextmanager
def _time_limit(seconds: float | None) -> Iterator[dict]:
    """Interrupt the block with an exception after `seconds` (SIGALRM; a blocking read returns EINTR).

    Yields a dict whose "expired" is True once the limit struck: the exception that surfaces may be
    the decoder's own error about the interrupted call. Only a process's main thread receives signals,
    so elsewhere (or with `seconds` None or 0) there is no limit. A timer already running (say, a test
    runner's) is put back afterwards with the time it had left.
    """
    state = {"expired": False}
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield state
        return

    def expire(signum: int, frame: object) -> None:
        state["expired"] = True
        signal.signal(signal.SIGALRM, previous_handler)  # once only, wherever it strikes
        raise BadVideoError(f"decoding took longer than {seconds:g} s")

    started = time.monotonic()
    previous_handler = signal.signal(signal.SIGALRM, expire)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay:
            left = max(previous_delay - (time.monotonic() - started), 1e-3)
            signal.setitimer(signal.ITIMER_REAL, left, previous_interval)


def read_video_clips(path: str | Path, split: str, index: int, spec: ClipSpec, timeout: float | None = None,
                     segment: tuple[float, float] | None = None) -> VideoClips:
    """The video's views per `spec`; a bad video gives `clips=None` and a one-line reason, never raises.

    `timeout` (seconds) limits the time this video may take, so a file that makes the decoder hang
    (a named pipe, a stalled network mount) fails alone instead of stopping the job. `segment` (start,
    end seconds) samples only the frames in that part of the file; `num_frames` then counts those.
    """
    return guarded_read(path, index, timeout, lambda: _load(Path(path), split, index, spec, segment))


def guarded_read(path: str | Path, index: int, timeout: float | None, load: Callable[[], VideoClips]) -> VideoClips:
    """`load()` of video `index` within `timeout` seconds; any failure becomes `clips=None` and a
    one-line reason (never an exception: a decoder bug on one odd file must not stop 240,000 others)."""
    limit = {"expired": False}
    try:
        with _time_limit(timeout) as limit:
            return load()
    except Exception as error:
        if limit["expired"]:
            return VideoClips(index, None, 0, f"decoding took longer than {timeout:g} s", 0)
        if isinstance(error, BadVideoError):
            return VideoClips(index, None, 0, error.reason, 0)
        log.debug("unexpected error on %s", path, exc_info=True)
        return VideoClips(index, None, 0, f"unexpected {type(error).__name__}: {error}", 0)
