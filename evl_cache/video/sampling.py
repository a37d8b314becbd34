"""Frame-index plans: which frames of a video each cached view holds (evl-model.md section 5).

Dense sampling takes T frames at stride s. Training clips start at a uniform random frame; evaluation
views spread V clips evenly over the video. Segment (TSN) sampling splits the video into T equal
segments and takes one frame of each: a random one for training, evenly spread offsets for evaluation.
Short videos are padded by repeating their last frame.

"vifi" sampling is ViFi-CLIP's test protocol (its loader is X-CLIP's, mmaction's `SampleFrames` with
one frame per clip and T clips): one view takes the middle frame of each of T equal segments; V > 1
views are V independent draws of its training rule, one uniform frame in each of T segments of
n // T frames (the last n mod T frames are never drawn; fewer frames than T take round(i n / T)).
ViFi-CLIP draws them unseeded; here each view's draw is seeded per (video, view).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SAMPLING_MODES = ("dense", "segment", "vifi")


def dense_train_indices(num_frames: int, frames: int, stride: int, rng: np.random.Generator) -> list[int]:
    """The authors' training clip: a random start, T frames at stride s, the last frame repeated if short."""
    if (frames - 1) * stride + 1 >= num_frames:
        valid = [i * stride for i in range(frames) if i * stride < num_frames]
        return valid + [valid[-1]] * (frames - len(valid))
    start = int(rng.integers(0, num_frames - (frames - 1) * stride))
    return [start + i * stride for i in range(frames)]


def dense_eval_indices(num_frames: int, frames: int, stride: int, views: int) -> list[list[int]]:
    """The authors' evaluation views: V clips with evenly spread starts, padded with the last frame."""
    span = (frames - 1) * stride + 1
    if num_frames < span:
        clip = [min(i * stride, num_frames - 1) for i in range(frames)]
        return [list(clip) for _ in range(views)]
    if views == 1:
        starts = [(num_frames - span) // 2]
    else:
        starts = [round(i * (num_frames - span) / (views - 1)) for i in range(views)]
    return [[start + i * stride for i in range(frames)] for start in starts]


def segment_indices(num_frames: int, frames: int, offset: float | None,
                    rng: np.random.Generator | None = None) -> list[int]:
    """TSN sampling: one frame in each of T equal segments.

    `offset` in [0, 1) picks the same relative position in every segment (0.5 is the middle, the
    evaluation rule); `offset=None` draws a random frame per segment from `rng` (training).
    """
    bounds = np.linspace(0, num_frames, frames + 1)
    indices = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if offset is None:
            assert rng is not None
            position = start + rng.random() * (end - start)
        else:
            position = start + offset * (end - start)
        indices.append(min(int(position), num_frames - 1))
    return indices


def vifi_middle_indices(num_frames: int, frames: int) -> list[int]:
    """ViFi-CLIP's one-view test clip: frame int(i a + a / 2) of segment i, a = n / T (in float64)."""
    interval = num_frames / float(frames)
    return [int(i) for i in (np.arange(frames) * interval + interval / 2.0).astype(np.int64)]


def vifi_random_indices(num_frames: int, frames: int, rng: np.random.Generator) -> list[int]:
    """ViFi-CLIP's clip for each of several test views (its training rule): a uniform frame in each of
    T segments of n // T frames; with fewer frames than T, frame round(i n / T) (half to even)."""
    interval = num_frames // frames
    if interval > 0:
        return [int(i) for i in np.arange(frames) * interval + rng.integers(0, interval, size=frames)]
    return [int(i) for i in np.around(np.arange(frames) * (num_frames / frames))]


@dataclass(frozen=True)
class ViewPlan:
    """One cached view: its frame indices and whether it gets training augmentation (seeded)."""
    frame_indices: tuple[int, ...]
    augment: bool
    seed: int


def view_seed(seed: int, video_index: int, view: int) -> int:
    """A per-(video, view) seed, so a view's randomness is the same however the work is split or resumed."""
    return int(np.random.SeedSequence([seed, video_index, view]).generate_state(1)[0])


def plan_views(num_frames: int, split: str, mode: str, frames: int, stride: int, eval_views: int,
               train_views: int, seed: int, video_index: int) -> list[ViewPlan]:
    """All views cached for one video.

    Validation/test (and unsplit) videos get `eval_views` evaluation views. Training videos get
    `train_views` views: view 0 is the plain centre clip, the others random clips with augmentation.
    """
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")

    def eval_clips(views: int) -> list[list[int]]:
        if mode == "dense":
            return dense_eval_indices(num_frames, frames, stride, views)
        if mode == "vifi":
            if views == 1:
                return [vifi_middle_indices(num_frames, frames)]
            return [vifi_random_indices(num_frames, frames, np.random.default_rng(view_seed(seed, video_index, v)))
                    for v in range(views)]
        return [segment_indices(num_frames, frames, (v + 0.5) / views) for v in range(views)]

    if split != "train":
        return [ViewPlan(tuple(clip), False, view_seed(seed, video_index, v))
                for v, clip in enumerate(eval_clips(eval_views))]
    plans = [ViewPlan(tuple(eval_clips(1)[0]), False, view_seed(seed, video_index, 0))]
    for v in range(1, train_views):
        vseed = view_seed(seed, video_index, v)
        rng = np.random.default_rng(vseed)
        if mode == "dense":
            clip = dense_train_indices(num_frames, frames, stride, rng)
        elif mode == "vifi":
            clip = vifi_random_indices(num_frames, frames, rng)
        else:
            clip = segment_indices(num_frames, frames, None, rng)
        plans.append(ViewPlan(tuple(clip), True, vseed))
    return plans
