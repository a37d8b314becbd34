"""Which videos a fine-tuning run trains and validates on, and the labels it scores them by.

Training videos are the list's `train` split; validation videos its `val` split, or, when it has none,
a seeded per-class hold-out of the training (and unsplit) videos, as `train` holds one out of a cache.
Base-to-novel (`--base-classes`): training and validation keep the base classes' videos, scored
against the base names only; the novel classes' validation videos are scored against the novel names
only, as ViFi-CLIP does. Few-shot (`--shots K`): K training videos per trained class, a seeded draw.
Videos with an error in the list (a bad label, not on disk) are left out here; videos that fail to
decode are skipped when they do.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..cache.dataset import holdout_split
from ..errors import DatasetError, EvlCacheError
from ..video.find import VideoList


@dataclass
class VideoSplits:
    """Video indices (into the list's entries) and their labels in the scored class lists."""
    class_names: list[str]  # the trained (base) classes, in the list's order
    novel_classes: list[str]  # [] unless base-to-novel
    train: np.ndarray
    train_labels: np.ndarray
    val: np.ndarray
    val_labels: np.ndarray
    novel: np.ndarray
    novel_labels: np.ndarray

    def counts(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), **({"val_novel": len(self.novel)} if len(self.novel)
                                                                    else {})}


def _usable(videos: VideoList, splits: tuple[str, ...]) -> np.ndarray:
    return np.array([i for i, e in enumerate(videos.entries) if e.split in splits and e.label >= 0 and not e.error],
                    dtype=np.int64)


def few_shots(indices: np.ndarray, labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """`shots` videos of every class present, drawn with `seed` (sorted); a class with fewer is refused."""
    rng = np.random.default_rng([seed, shots])
    chosen = []
    for label in np.unique(labels):
        members = indices[labels == label]
        if len(members) < shots:
            raise DatasetError(f"--shots {shots}: class {int(label)} has only {len(members)} training videos")
        chosen += list(rng.choice(members, size=shots, replace=False))
    return np.array(sorted(chosen), dtype=np.int64)


def video_splits(videos: VideoList, base_classes: list[str] | None, shots: int | None, val_fraction: float,
                 seed: int) -> VideoSplits:
    """The run's videos (module docstring)."""
    names, labels = list(videos.class_names), np.array([e.label for e in videos.entries], dtype=np.int64)
    train, val = _usable(videos, ("train",)), _usable(videos, ("val",))
    if len(val) == 0:
        pool = _usable(videos, ("train", "none"))
        train, val = (part.astype(np.int64) for part in holdout_split(pool, labels[pool], val_fraction, seed))
    base, novel = names, []
    if base_classes is not None:
        unknown = [name for name in base_classes if name not in names]
        if unknown:
            raise EvlCacheError(f"{len(unknown)} base classes are not classes of the videos (e.g. {unknown[:3]})")
        base, novel = [n for n in names if n in base_classes], [n for n in names if n not in base_classes]
        if not novel:
            raise EvlCacheError("the base classes are all of the classes: none is left as novel")
    to_base = np.array([base.index(n) if n in base else -1 for n in names] + [-1], dtype=np.int64)
    to_novel = np.array([novel.index(n) if n in novel else -1 for n in names] + [-1], dtype=np.int64)
    train = train[to_base[labels[train]] >= 0]
    novel_val = val[to_novel[labels[val]] >= 0]
    val = val[to_base[labels[val]] >= 0]
    if shots is not None:
        train = few_shots(train, labels[train], shots, seed)
    if len(train) == 0:
        raise DatasetError("no labelled training videos (a train split, or videos without a split)", videos.root)
    if novel and len(novel_val) == 0:
        raise EvlCacheError("base-to-novel needs validation videos of the novel classes; there are none")
    return VideoSplits(base, novel, train, to_base[labels[train]], val, to_base[labels[val]], novel_val,
                       to_novel[labels[novel_val]])


def splits_fingerprint(videos: VideoList, splits: VideoSplits) -> str:
    """sha256 of the videos a run reads (paths, labels, segments) in their roles: a resume must read the same."""
    digest = hashlib.sha256()
    for role in ("train", "val", "novel"):
        digest.update(role.encode())
        for index in getattr(splits, role):
            entry = videos.entries[int(index)]
            digest.update(f"{entry.path}\t{entry.label}\t{entry.segment}\n".encode())
    digest.update("\n".join(splits.class_names + ["--"] + splits.novel_classes).encode())
    return digest.hexdigest()
