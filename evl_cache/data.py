"""A Dataset over the cache that reads only what a run needs.

A run that uses N decoder layers reads the last N cached blocks and nothing else; a run without
temporal cross-attention reads no maps; a text-head run reads only the per-frame CLIP embeddings.
The store is opened lazily in each DataLoader worker, so memory stays flat however large the cache
is, unless `in_memory` asks to hold the selection in RAM.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import CacheError, EvlCacheError
from .store import DONE, FeatureStore, location


@dataclass(frozen=True)
class FeatureSelection:
    """Which cached arrays and frames a run reads."""
    blocks: tuple[int, ...]      # backbone block indices, shallowest first
    frame_start: int             # first cached frame used
    frames: int                  # frames used
    frame_step: int              # 1: adjacent cached frames; k: every k-th (no maps then)
    maps: bool                   # read the temporal maps
    embed: bool = False          # read the per-frame CLIP embeddings (`embed`)

    @property
    def frame_indices(self) -> list[int]:
        return [self.frame_start + i * self.frame_step for i in range(self.frames)]


def select_features(attrs: dict, layers: int, frames: int | None, frame_step: int,
                    cross_attention: bool) -> FeatureSelection:
    """What a decoder of `layers` layers on `frames` frames needs from a cache, or a reason it can't.

    Fewer frames than cached take a centred window of the cached clip (every `frame_step`-th frame).
    The cached maps pair adjacent cached frames, so a step above 1 needs cross-attention off.
    """
    cached_blocks = list(attrs["blocks"])
    cached_frames = int(attrs["sampling"]["frames"])
    if not 1 <= layers <= len(cached_blocks):
        raise CacheError(f"--layers {layers} needs {layers} cached blocks; the cache holds "
                         f"{len(cached_blocks)} (blocks {cached_blocks}); re-extract with --blocks {layers}")
    frames = cached_frames if frames is None else frames
    span = (frames - 1) * frame_step + 1
    if frames < 1 or span > cached_frames:
        raise CacheError(f"--frames {frames} with --frame-step {frame_step} spans {span} cached frames; "
                         f"the cache holds {cached_frames} per clip")
    if cross_attention and frame_step != 1:
        raise CacheError(f"the cached temporal maps pair adjacent cached frames; frames {frame_step} apart "
                         f"have no cached map: use --frame-step 1, --no-temporal-cross-attention, or "
                         f"re-extract with --stride {int(attrs['sampling']['stride']) * frame_step}")
    if cross_attention and frames < 2:
        raise CacheError("temporal cross-attention needs at least 2 frames")
    return FeatureSelection(tuple(cached_blocks[-layers:]), (cached_frames - span) // 2, frames,
                            frame_step, cross_attention)


def select_embeddings(attrs: dict, frames: int | None, frame_step: int) -> FeatureSelection:
    """What a text-head run needs: the per-frame CLIP embeddings only (no blocks, no maps)."""
    if "embed" not in attrs.get("stored", ["embed"]):
        raise CacheError(f"the text heads need the cached per-frame CLIP embeddings; this cache holds "
                         f"{attrs.get('stored')}")
    cached_frames = int(attrs["sampling"]["frames"])
    frames = cached_frames if frames is None else frames
    span = (frames - 1) * frame_step + 1
    if frames < 1 or span > cached_frames:
        raise CacheError(f"--frames {frames} with --frame-step {frame_step} spans {span} cached frames; "
                         f"the cache holds {cached_frames} per clip")
    return FeatureSelection((), (cached_frames - span) // 2, frames, frame_step, False, embed=True)


def class_label_map(cache_names: list[str], names: list[str], allow_rename: bool = False) -> np.ndarray:
    """For each cache label, its index in `names` (-1: not scored), or a reason the list doesn't fit.

    `names` are matched to the cache's class names by name (a subset, in any order). With
    `allow_rename`, a list of exactly as many names as the cache has classes, not all of them cache
    classes, renames the cache's classes in order (readable names for CamelCase folders or ids).
    """
    if len(set(names)) != len(names):
        raise EvlCacheError(f"class list has duplicate names: {sorted({n for n in names if names.count(n) > 1})[:5]}")
    unknown = [n for n in names if n not in cache_names]
    if not unknown:
        position = {name: i for i, name in enumerate(names)}
        return np.array([position.get(name, -1) for name in cache_names], dtype=np.int64)
    if allow_rename and len(names) == len(cache_names):
        return np.arange(len(cache_names), dtype=np.int64)
    raise EvlCacheError(f"{len(unknown)} of {len(names)} class names are not classes of the cache (e.g. "
                        f"{unknown[:3]}); give names of the cache's classes (any subset)"
                        + (f", or one name per cache class ({len(cache_names)}) in the cache's order to rename them"
                           if allow_rename else ""))


def usable_videos(store: FeatureStore, splits: tuple[str, ...]) -> np.ndarray:
    """Indices of finished, labelled videos in the given splits."""
    status, split, label = store.column("status"), store.column("split"), store.column("label")
    keep = (status == DONE) & np.isin(split.astype(str), list(splits)) & (label >= 0)
    return np.flatnonzero(keep)


def holdout_split(indices: np.ndarray, labels: np.ndarray, fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded, per-class hold-out of `fraction` of the videos: (train, val)."""
    rng = np.random.default_rng(seed)
    val = []
    for label in np.unique(labels):
        members = indices[labels == label]
        count = int(round(len(members) * fraction))
        if 0 < fraction and count == 0 and len(members) > 1:
            count = 1
        val += list(rng.permutation(members)[:count])
    val_set = set(val)
    return np.array([i for i in indices if i not in val_set]), np.array(sorted(val_set))


class CacheDataset(Dataset):
    """Items are (video, view) samples with the selected blocks, maps and frames.

    views='random': one item per video, its view drawn per epoch (seeded; the sampler passes
    `(item, epoch)` keys, so persistent loader workers need no state); 'first': view 0 only;
    'all': one item per (video, view), for evaluation with views averaged afterwards.
    label_map: a run's label for each cache label (a run on a subset or another order of the classes).
    """

    def __init__(self, path: str | Path, videos: np.ndarray, selection: FeatureSelection,
                 views: str = "all", seed: int = 0, in_memory: bool = False, label_map: np.ndarray | None = None):
        self.path = location(path)
        self.selection = selection
        self.views_mode = views
        self.seed = seed
        with FeatureStore(self.path) as store:
            self.labels = store.column("label")
            if label_map is not None:
                self.labels = np.where(self.labels >= 0, np.asarray(label_map)[np.maximum(self.labels, 0)], -1)
            view_counts = store.column("views")
        self.videos = np.asarray(videos, dtype=np.int64)
        self.view_counts = view_counts
        if views == "all":
            self.items = [(int(v), k) for v in self.videos for k in range(int(view_counts[v]))]
        else:
            self.items = [(int(v), -1 if views == "random" else 0) for v in self.videos]
        self._store: FeatureStore | None = None
        self._memory: dict[str, np.ndarray] | None = None
        if in_memory:
            self._memory = self._load_all()

    def __len__(self) -> int:
        return len(self.items)

    def array_names(self) -> list[str]:
        names = [f"tokens/block_{b}" for b in self.selection.blocks]
        if self.selection.maps:
            names += [f"maps/block_{b}/{d}" for b in self.selection.blocks for d in ("prev", "next")]
        if self.selection.embed:
            names.append("embed")
        return names

    def bytes_per_item(self) -> int:
        """Bytes one item reads from the cache (a whole cached view of each selected array)."""
        with FeatureStore(self.path) as store:
            return sum(2 * int(np.prod(store.array(n).shape[2:])) for n in self.array_names())

    def _load_all(self) -> dict[str, np.ndarray]:
        with FeatureStore(self.path) as store:
            order = np.sort(self.videos)
            arrays = {name: np.asarray(store.array(name).get_orthogonal_selection((order,))
                                       if store.kind == "zarr" else store.array(name)[order])
                      for name in self.array_names()}
        self._row = {int(v): i for i, v in enumerate(order)}
        return arrays

    def _read(self, name: str, video: int, view: int) -> np.ndarray:
        if self._memory is not None:
            return self._memory[name][self._row[video], view]
        if self._store is None:  # opened lazily: once per DataLoader worker
            self._store = FeatureStore(self.path)
        return np.asarray(self._store.array(name)[video, view])

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        video, view = self.items[i]
        if view < 0:
            rng = np.random.default_rng([self.seed, epoch, video])
            view = int(rng.integers(0, max(int(self.view_counts[video]), 1)))
        sel = self.selection
        frames = sel.frame_indices
        tokens = [torch.from_numpy(self._read(f"tokens/block_{b}", video, view)[frames]) for b in sel.blocks]
        item = {"tokens": tokens, "label": int(self.labels[video]), "video": video, "view": view}
        if sel.maps:
            pairs = slice(sel.frame_start, sel.frame_start + sel.frames - 1)
            item["maps_prev"] = [torch.from_numpy(self._read(f"maps/block_{b}/prev", video, view)[pairs])
                                 for b in sel.blocks]
            item["maps_next"] = [torch.from_numpy(self._read(f"maps/block_{b}/next", video, view)[pairs])
                                 for b in sel.blocks]
        if sel.embed:
            item["embed"] = torch.from_numpy(self._read("embed", video, view)[frames])
        return item


class EpochBatches(torch.utils.data.Sampler):
    """An epoch's micro-batches: a permutation seeded by (seed, epoch) cut into global micro-batches,
    of which this process takes its share. Any number of processes sees the same global batches, so a
    run on one process and a run on several follow the same data order. Keys are `(item, epoch)`, so
    one loader with persistent workers serves every epoch (`set_epoch` before each)."""

    def __init__(self, size: int, micro_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        self.size, self.micro_batch, self.seed = size, micro_batch, seed
        self.rank, self.world_size = rank, world_size
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        self.global_batches = [order[i:i + self.micro_batch] for i in range(0, self.size, self.micro_batch)]

    def __len__(self) -> int:
        return len(self.global_batches)

    def __iter__(self):
        for batch in self.global_batches:
            yield [(i, self.epoch) for i in torch.tensor_split(batch, self.world_size)[self.rank].tolist()]


def collate(items: list[dict]) -> dict:
    """Stack a list of items into a batch (lists of per-block tensors stay lists)."""
    batch = {"tokens": [torch.stack(ts) for ts in zip(*(it["tokens"] for it in items))],
             "label": torch.tensor([it["label"] for it in items]),
             "video": torch.tensor([it["video"] for it in items]),
             "view": torch.tensor([it["view"] for it in items])}
    if "maps_prev" in items[0]:
        batch["maps_prev"] = [torch.stack(ms) for ms in zip(*(it["maps_prev"] for it in items))]
        batch["maps_next"] = [torch.stack(ms) for ms in zip(*(it["maps_next"] for it in items))]
    if "embed" in items[0]:
        batch["embed"] = torch.stack([it["embed"] for it in items])
    return batch


def model_inputs(batch: dict, device: torch.device) -> tuple:
    """The model's arguments from a batch, on `device`: (block outputs, prev maps, next maps), maps None
    when not read; or (per-frame embeddings,) for a text-head run."""
    def move(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.to(device, non_blocking=True) for t in tensors]
    if "embed" in batch and not batch["tokens"]:
        return (batch["embed"].to(device, non_blocking=True),)
    return (move(batch["tokens"]), move(batch["maps_prev"]) if "maps_prev" in batch else None,
            move(batch["maps_next"]) if "maps_next" in batch else None)


def worker_init(_: int) -> None:
    """Each loader worker: one torch thread, few zarr threads (many workers share the cores)."""
    import zarr
    torch.set_num_threads(1)
    zarr.config.set({"threading.max_workers": 1, "async.concurrency": 4})
