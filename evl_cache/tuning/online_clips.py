"""Clips decoded online for fine-tuning, in DataLoader worker processes, with the planned-frame decoder.

Training: each epoch draws a new clip of every training video, ViFi-CLIP's way: one uniform frame in
each of T segments (`vifi_random_indices`, its loader's rule), frames resized to the short side
ViFi-CLIP crops from, then its augmentation (`vifi_augmented_clip`). The frames and the augmentation
depend only on (seed, epoch, video), so a resumed run, any number of workers and any number of
processes see the same clips. Batches come from `EpochBatches` (a seeded order per epoch).

Evaluation: the videos' views by extraction's own reader (`ClipSource`, ViFi-CLIP's test sampling:
`--sampling vifi`), the same pixels `extract` would cache.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..cache.dataset import EpochBatches
from ..cache.extract import ClipSource
from ..runtime import one_torch_thread
from ..video.clips import ClipSpec, VideoClips, decode_planned, guarded_read
from ..video.find import VideoList
from ..video.pixels import vifi_augmented_clip, vifi_short_side
from ..video.sampling import ViewPlan, vifi_random_indices


@dataclass(frozen=True)
class Augmentation:
    """ViFi-CLIP's training augmentation: flip, and the probabilities of colour jitter and grey scale."""
    flip: bool = True
    color_jitter: float = 0.8
    gray_scale: float = 0.2


def clip_seed(seed: int, epoch: int, video: int) -> int:
    """The seed of video `video`'s training clip in epoch `epoch` (its frames and augmentation)."""
    return int(np.random.SeedSequence([seed, epoch, video]).generate_state(1)[0])


class TrainingClips(Dataset):
    """Item (i, epoch): a dict with the epoch's clip of the i-th training video (uint8 [T, 3, S, S]; blank,
    with the reason, if it failed), its label and its index in the video list."""

    def __init__(self, videos: VideoList, indices: np.ndarray, labels: np.ndarray, frames: int, size: int,
                 seed: int, augmentation: Augmentation, timeout: float | None = None):
        self.root, self.entries = videos.root, videos.entries
        self.indices, self.labels = [int(i) for i in indices], [int(label) for label in labels]
        self.frames, self.size, self.seed = frames, size, seed
        self.augmentation, self.timeout = augmentation, timeout

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        i, epoch = key
        index = self.indices[i]
        entry = self.entries[index]
        read = (VideoClips(index, None, 0, entry.error, 0) if entry.error else
                guarded_read(self.root / entry.path, index, self.timeout,
                             lambda: self._clip(self.root / entry.path, index, epoch, entry.segment)))
        if read.clips is None:
            clip, error = torch.zeros(self.frames, 3, self.size, self.size, dtype=torch.uint8), read.error
        else:
            clip, error = read.clips[0], ""
        return {"video": index, "label": self.labels[i], "clip": clip, "error": error}

    def _clip(self, path: Path, index: int, epoch: int, segment: tuple[float, float] | None) -> VideoClips:
        rng = np.random.default_rng(clip_seed(self.seed, epoch, index))
        augment_seed = int(rng.integers(2**63))

        def plan(num_frames: int) -> list[ViewPlan]:
            return [ViewPlan(tuple(vifi_random_indices(num_frames, self.frames, rng)), True, augment_seed)]

        planned = decode_planned(path, plan, vifi_short_side(self.size), segment)
        a = self.augmentation
        clip = vifi_augmented_clip(planned.frames[0], self.size, augment_seed, a.flip, a.color_jitter, a.gray_scale)
        return VideoClips(index, clip[None], planned.num_frames, "", planned.decoded_frames, planned.note)


def collate_clips(items: list[dict]) -> dict:
    """A batch: the decoded clips stacked ([b, T, 3, S, S]) with their labels and videos, `decoded` 1.0 for
    each (a batch whose clips all failed keeps one blank clip weighted 0.0, so that every process still
    takes its step), and the (video, reason) of those that failed."""
    kept = [item for item in items if not item["error"]] or items[:1]
    return {"clips": torch.stack([item["clip"] for item in kept]),
            "labels": torch.tensor([item["label"] for item in kept], dtype=torch.long),
            "videos": torch.tensor([item["video"] for item in kept], dtype=torch.long),
            "decoded": torch.tensor([0.0 if item["error"] else 1.0 for item in kept]),
            "failed": [(item["video"], item["error"]) for item in items if item["error"]]}


def training_loader(clips: TrainingClips, batches: EpochBatches, workers: int) -> DataLoader:
    """One loader for the whole run (`batches.set_epoch` before each epoch): workers decode ahead."""
    return DataLoader(clips, batch_sampler=batches, num_workers=workers, collate_fn=collate_clips,
                      worker_init_fn=one_torch_thread, prefetch_factor=2 if workers else None)


def evaluation_spec(frames: int, size: int, views: int, seed: int) -> ClipSpec:
    """ViFi-CLIP's test clips: its sampling (the segments' middle frames for one view, a draw per view for
    more), the short side it resizes to, the centre crop."""
    return ClipSpec("vifi", frames, 1, views, 1, size, seed, short_side=vifi_short_side(size))


def evaluation_loader(videos: VideoList, indices: np.ndarray, spec: ClipSpec, workers: int,
                      timeout: float | None) -> DataLoader:
    """Each video's evaluation views (`VideoClips`), decoded in workers; videos of the training split (a
    held-out part of it) are read as validation videos."""
    as_validation = VideoList(videos.root, [entry if entry.split != "train" else dataclasses.replace(entry, split="val")
                                            for entry in videos.entries], videos.class_names)
    return DataLoader(ClipSource(as_validation, [int(i) for i in indices], spec, timeout), batch_size=None,
                      num_workers=workers, worker_init_fn=one_torch_thread, prefetch_factor=4 if workers else None)
