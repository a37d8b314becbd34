"""A Dataset over the cache that reads only what a run needs.

A run that uses N decoder layers reads the last N cached blocks and nothing else; a run without
temporal cross-attention reads no maps; a text-head run reads only the per-frame CLIP embeddings.
Batches are read by threads straight into the tensors training uses (`CacheLoader`), so memory stays
flat however large the cache is, unless `hold_in_memory` reads the selection into RAM (once per node
under torchrun: the processes of a node share one copy in shared memory).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import CacheError, EvlCacheError
from .calibration import block_channels
from .encodings import decode, encoding, stored_encoding
from .store import DONE, FeatureStore, cache_storage, location


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


def select_final_block(attrs: dict, frames: int | None, frame_step: int) -> FeatureSelection:
    """What an attentive probe needs: the final cached block's tokens (no maps, so any frame step)."""
    if not attrs["blocks"]:
        raise CacheError("the attentive probe reads the final cached block; this cache holds only embeddings "
                         "(extracted with --blocks 0): re-extract with --blocks 1 or more")
    return select_features(attrs, 1, frames, frame_step, cross_attention=False)


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


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(np.int8): torch.int8, np.dtype(np.uint8): torch.uint8}


class CacheDataset(Dataset):
    """Items are (video, view) samples with the selected blocks, maps and frames.

    views='random': one item per video, its view drawn per epoch (seeded; the sampler passes
    `(item, epoch)` keys, so the draw needs no state); 'first': view 0 only; 'all': one item per
    (video, view), for evaluation with views averaged afterwards.
    label_map: a run's label for each cache label (a run on a subset or another order of the classes).

    `CacheLoader` reads whole batches from it; `dataset[i]` gives one item (a plain DataLoader with its
    default collate also works).
    """

    def __init__(self, path: str | Path, videos: np.ndarray, selection: FeatureSelection,
                 views: str = "all", seed: int = 0, label_map: np.ndarray | None = None):
        self.path = location(path)
        self.selection = selection
        self.views_mode = views
        self.seed = seed
        with FeatureStore(self.path) as store:
            attrs = store.attrs
            self._cache_id = [str(self.path), attrs.get("created"), attrs.get("dataset", {}).get("fingerprint")]
            storage = cache_storage(attrs)
            self.encoding = stored_encoding(storage)
            self.channels = tuple(block_channels(storage, b) for b in selection.blocks)  # "channel" token codes
            grid = attrs["backbone"]["patch_grid"]
            self.dims = {"tokens": attrs["backbone"]["width"], "maps": grid[0] * grid[1]}  # values per row
            self.labels = store.column("label")
            if label_map is not None:
                self.labels = np.where(self.labels >= 0, np.asarray(label_map)[np.maximum(self.labels, 0)], -1)
            self.view_counts = store.column("views")
            # name -> (numpy dtype, shape of one item's rows)
            self.item_shapes = {name: (np.dtype(store.array(name).dtype),
                                       (len(range(store.array(name).shape[2])[self.rows(name)]),
                                        *store.array(name).shape[3:]))
                                for name in self.array_names()}
        self.videos = np.asarray(videos, dtype=np.int64)
        if views == "all":
            self.items = [(int(v), k) for v in self.videos for k in range(int(self.view_counts[v]))]
        else:
            self.items = [(int(v), -1 if views == "random" else 0) for v in self.videos]
        self._store: FeatureStore | None = None
        self._opening = threading.Lock()
        self._memory: dict[str, np.ndarray] | None = None  # hold_in_memory: name -> [videos, views, ...]
        self._row = {int(v): i for i, v in enumerate(np.sort(self.videos))}
        self._memory_views = int(self.view_counts[self.videos].max()) if len(self.videos) else 0

    def __len__(self) -> int:
        return len(self.items)

    def __getstate__(self) -> dict:  # a copy for another process opens its own store
        return {**self.__dict__, "_store": None, "_opening": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _opening=threading.Lock())

    def array_names(self) -> list[str]:
        """The arrays an item reads: the selected blocks' tokens (and maps), their scales when the cache
        is encoded, the embeddings for a text head."""
        names = [f"tokens/block_{b}" for b in self.selection.blocks]
        if self.selection.maps:
            names += [f"maps/block_{b}/{d}" for b in self.selection.blocks for d in ("prev", "next")]
        if self.encoding.scaled:
            names += [f"scales/{name}" for name in names]
        if self.selection.embed:
            names.append("embed")
        return names

    def rows(self, name: str) -> slice:
        """The cached rows an item takes from array `name`: its frames, or the pairs of adjacent ones."""
        sel = self.selection
        if name.removeprefix("scales/").startswith("maps/"):
            return slice(sel.frame_start, sel.frame_start + sel.frames - 1)
        return slice(sel.frame_start, sel.frame_start + (sel.frames - 1) * sel.frame_step + 1, sel.frame_step)

    def bytes_per_item(self) -> int:
        """Bytes one item reads from the cache (the selected rows of each selected array)."""
        return sum(dtype.itemsize * int(np.prod(shape)) for dtype, shape in self.item_shapes.values())

    def memory_bytes(self) -> int:
        """Bytes `hold_in_memory` takes: every view of the dataset's videos, the selected rows."""
        return len(self.videos) * self._memory_views * self.bytes_per_item()

    def shared_memory_name(self) -> str:
        """The file name in shared memory that the processes of a node holding this selection share."""
        key = json.dumps([self._cache_id, [list(self.selection.blocks), self.selection.frame_start,
                          self.selection.frames, self.selection.frame_step, self.selection.maps,
                          self.selection.embed]]).encode() + self.videos.tobytes()
        return f"evl-cache-{hashlib.sha256(key).hexdigest()[:24]}.mem"

    def hold_in_memory(self, shared: Path | None = None, read: bool = True) -> None:
        """Read the selection into RAM: every view of the dataset's videos, each selected array's rows.

        With `shared` (a file in a RAM file system, /dev/shm), the arrays live in that file instead of
        this process's memory: the process with `read` reads the cache into it and renames it into
        place; the other processes of the node then (after a barrier) open it with `read=False` and
        share its pages. The reading process removes the name once all have it open.
        """
        names = list(self.item_shapes)
        shapes = [(len(self.videos), self._memory_views) + self.item_shapes[n][1] for n in names]
        offsets = np.cumsum([0] + [self.item_shapes[n][0].itemsize * int(np.prod(shape))
                                   for n, shape in zip(names, shapes)])
        if shared is None or offsets[-1] == 0:
            arrays = {n: np.zeros(shape, self.item_shapes[n][0]) for n, shape in zip(names, shapes)}
        else:
            target = shared.with_name(shared.name + f".partial-{os.getpid()}") if read else shared
            if read:
                with open(target, "wb") as handle:
                    handle.truncate(int(offsets[-1]))
            arrays = {n: np.memmap(target, self.item_shapes[n][0], "r+" if read else "r", int(offset), shape)
                      for n, shape, offset in zip(names, shapes, offsets[:-1])}
        if read:
            with FeatureStore(self.path) as store:
                for video, row in self._row.items():
                    for view in range(int(self.view_counts[video])):
                        for name, values in arrays.items():
                            store.read_view(name, video, view, self.rows(name), values[row, view])
            if shared is not None:
                os.replace(target, shared)
        self._memory = arrays

    def samples(self, keys: list) -> list[tuple[int, int]]:
        """(video, view) of each key: an item index, or an `(item, epoch)` pair from `EpochBatches`."""
        chosen = []
        for key in keys:
            i, epoch = key if isinstance(key, tuple) else (key, 0)
            video, view = self.items[i]
            if view < 0:  # drawn per (seed, epoch, video): the same in any thread, any process, after a resume
                rng = np.random.default_rng([self.seed, epoch, video])
                view = int(rng.integers(0, max(int(self.view_counts[video]), 1)))
            chosen.append((video, view))
        return chosen

    def empty_batch(self, size: int, pin_memory: bool = False) -> dict[str, torch.Tensor]:
        """Uninitialised batch tensors, one per selected array: views of one pinned allocation for fast
        copies to a GPU (one, as the pinned allocator rounds each allocation up to a power of two), else
        numpy's memory (which asks the kernel for huge pages: a new batch's pages then fault in about
        a hundredth of the time torch's allocator takes here)."""
        if not pin_memory:
            return {name: torch.from_numpy(np.empty((size,) + shape, dtype))
                    for name, (dtype, shape) in self.item_shapes.items()}
        sizes = {name: dtype.itemsize * size * int(np.prod(shape)) for name, (dtype, shape) in self.item_shapes.items()}
        starts = np.cumsum([0] + [-(-n // 64) * 64 for n in sizes.values()])  # 64-byte aligned
        flat = _host_bytes(int(starts[-1]), pinned=True)
        return {name: flat[start:start + sizes[name]].view(_TORCH_DTYPES[dtype]).view((size,) + shape)
                for (name, (dtype, shape)), start in zip(self.item_shapes.items(), starts)}

    def read_sample(self, arrays: dict[str, torch.Tensor], row: int, video: int, view: int) -> None:
        """Fill row `row` of the batch tensors with one (video, view), straight from the cache (or RAM)."""
        if self._memory is not None:
            for name, values in arrays.items():
                values.numpy()[row] = self._memory[name][self._row[video], view]
            return
        with self._opening:  # opened on first use, once per process, whichever thread reads first
            if self._store is None:
                self._store = FeatureStore(self.path)
        for name, values in arrays.items():
            self._store.read_view(name, video, view, self.rows(name), values[row].numpy())

    def batch(self, samples: list[tuple[int, int]], arrays: dict[str, torch.Tensor]) -> dict:
        """The batch dict the model's inputs come from (`model_inputs`), around filled batch tensors.
        An encoded cache's batch holds the codes; `scales` and `encoding` let `model_inputs` decode them
        on the training device."""
        sel = self.selection
        names = {"tokens": [f"tokens/block_{b}" for b in sel.blocks]}
        if sel.maps:
            names["maps_prev"] = [f"maps/block_{b}/prev" for b in sel.blocks]
            names["maps_next"] = [f"maps/block_{b}/next" for b in sel.blocks]
        batch = {key: [arrays[name] for name in group] for key, group in names.items()}
        batch.update(label=torch.tensor([int(self.labels[video]) for video, _ in samples]),
                     video=torch.tensor([video for video, _ in samples]),
                     view=torch.tensor([view for _, view in samples]))
        if self.encoding.scaled:
            batch["scales"] = {key: [arrays[f"scales/{name}"] for name in group] for key, group in names.items()}
            batch["encoding"] = {"name": self.encoding.key, **self.dims, "channels": self.channels}
        if sel.embed:
            batch["embed"] = arrays["embed"]
        return batch

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        """One item: its tensors without a batch axis."""
        (video, view), = self.samples([key])
        arrays = self.empty_batch(1)
        self.read_sample(arrays, 0, video, view)

        def unbatched(value):
            if isinstance(value, list):
                return [t[0] for t in value]
            if isinstance(value, dict):
                return {k: unbatched(v) for k, v in value.items()}
            return value[0] if isinstance(value, torch.Tensor) else value

        return {name: unbatched(value) for name, value in self.batch([(video, view)], arrays).items()}


PREFETCH = 2  # batches a CacheLoader reads ahead by default


def _host_bytes(nbytes: int, pinned: bool) -> torch.Tensor:
    """`nbytes` uninitialised bytes of host memory, page-locked if `pinned`."""
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def _copy_event(device: torch.device | None = None) -> torch.cuda.Event:
    """An event on `device`'s current stream (the current device's by default): done once the work
    queued on that stream so far, copies included, has run."""
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


class PinnedBatches:
    """A fixed ring of `count` pinned batch buffers, reused in turn, so that the page-locked memory
    stays `count` batches however long the run.

    A batch's buffer is taken again only after the copies that were queued from it before it was
    released have run: `model_inputs` records an event when it has queued them, and `release` records
    one on the current stream for a batch that never went through it.
    """

    def __init__(self, dataset: "CacheDataset", count: int):
        self.dataset = dataset
        self.buffers: list[dict[str, torch.Tensor] | None] = [None] * count
        self.copied: list[torch.cuda.Event | None] = [None] * count
        self.next = 0

    def take(self, size: int) -> tuple[int, dict[str, torch.Tensor]]:
        """(slot, batch tensors of `size` rows): the oldest buffer, once its batch's copies have run."""
        slot, self.next = self.next, (self.next + 1) % len(self.buffers)
        if self.copied[slot] is not None:
            self.copied[slot].synchronize()
            self.copied[slot] = None
        buffer = self.buffers[slot]
        if buffer is None or len(next(iter(buffer.values()), ())) < size:
            buffer = self.buffers[slot] = self.dataset.empty_batch(size, pin_memory=True)
        return slot, {name: values[:size] for name, values in buffer.items()}

    def copies_queued(self, slot: int, event: torch.cuda.Event) -> None:
        """The copies from `slot` are queued up to `event` (`model_inputs`)."""
        self.copied[slot] = event

    def release(self, slot: int) -> None:
        """The consumer is done with `slot`'s batch (it asked for the next one)."""
        if self.copied[slot] is None:
            self.copied[slot] = _copy_event()


class CacheLoader:
    """Batches of a CacheDataset in the order `batches` gives (lists of keys; `EpochBatches` for
    training, `sequential` for evaluation), read ahead by a pool of `workers` threads.

    Reading the cache is copying bytes (`pread` from the page cache or the disk, which releases the
    GIL), so threads of the training process do it well, and each batch is written once, straight
    into the tensors training uses (pinned memory for a GPU). Worker processes would have to pass every
    batch through newly allocated shared memory, which on this machine cost several times the read.
    The next `prefetch` batches are read while the current one trains; `workers=0` reads each batch
    when it is asked for, in the calling thread. With `pin_memory` the batches live in a ring of
    `prefetch + 2` pinned buffers (`PinnedBatches`): a batch's tensors are valid until the next batch
    is asked for; a consumer that keeps them copies them.
    """

    def __init__(self, dataset: CacheDataset, batches, workers: int = 0, pin_memory: bool = False,
                 prefetch: int = PREFETCH):
        self.dataset, self.batches = dataset, batches
        self.workers, self.pin_memory, self.prefetch = workers, pin_memory, max(prefetch, 1)

    @classmethod
    def sequential(cls, dataset: CacheDataset, batch_size: int, workers: int = 0,
                   pin_memory: bool = False) -> "CacheLoader":
        """Every item once, in order, `batch_size` at a time (evaluation)."""
        batches = [list(range(start, min(start + batch_size, len(dataset))))
                   for start in range(0, len(dataset), batch_size)]
        return cls(dataset, batches, workers, pin_memory)

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        pinned = PinnedBatches(self.dataset, self.prefetch + 2) if self.pin_memory else None
        if self.workers == 0:
            for keys in self.batches:
                samples = self.dataset.samples(keys)
                slot, arrays = self._empty(pinned, len(samples))
                for row, (video, view) in enumerate(samples):
                    self.dataset.read_sample(arrays, row, video, view)
                yield self._batch(pinned, slot, samples, arrays)
                if pinned is not None:
                    pinned.release(slot)
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="cache-reader")
        ahead: deque = deque()  # (slot, samples, arrays, one future per sample), oldest first
        try:
            for keys in self.batches:
                samples = self.dataset.samples(keys)
                slot, arrays = self._empty(pinned, len(samples))
                ahead.append((slot, samples, arrays, [pool.submit(self.dataset.read_sample, arrays, row, video, view)
                                                      for row, (video, view) in enumerate(samples)]))
                if len(ahead) > self.prefetch:
                    yield from self._finished(pinned, *ahead.popleft())
            while ahead:
                yield from self._finished(pinned, *ahead.popleft())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _empty(self, pinned: PinnedBatches | None, size: int) -> tuple[int, dict]:
        """(slot of the pinned ring or -1, new batch tensors of `size` rows)."""
        return pinned.take(size) if pinned is not None else (-1, self.dataset.empty_batch(size))

    def _batch(self, pinned: PinnedBatches | None, slot: int, samples: list, arrays: dict) -> dict:
        batch = self.dataset.batch(samples, arrays)
        if pinned is not None:
            batch["pinned"] = (pinned, slot)  # for model_inputs to say when its copies are queued
        return batch

    def _finished(self, pinned: PinnedBatches | None, slot: int, samples: list[tuple[int, int]], arrays: dict,
                  reads: list):
        """Yield the batch once its reads are done (a read's error is raised here, in the training loop);
        release its pinned buffer when the consumer comes back for the next."""
        for read in reads:
            read.result()
        yield self._batch(pinned, slot, samples, arrays)
        if pinned is not None:
            pinned.release(slot)


class EpochBatches(torch.utils.data.Sampler):
    """An epoch's micro-batches: a permutation seeded by (seed, epoch) cut into global micro-batches,
    of which this process takes its share. Any number of processes sees the same global batches, so a
    run on one process and a run on several follow the same data order. Keys are `(item, epoch)`, so
    one loader serves every epoch (`set_epoch` before each)."""

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


def model_inputs(batch: dict, device: torch.device) -> tuple:
    """The model's arguments from a batch, on `device`: (block outputs, prev maps, next maps), maps None
    when not read; or (per-frame embeddings,) for a text-head run. An encoded cache's codes are moved
    to `device` and decoded there (float16 values, as a float16 cache gives). A batch of pinned buffers
    learns when its copies are queued, so that its buffer is reused only after they have run."""
    inputs = _moved_inputs(batch, device)
    if "pinned" in batch and device.type == "cuda":
        pinned, slot = batch["pinned"]
        pinned.copies_queued(slot, _copy_event(device))
    return inputs


def _moved_inputs(batch: dict, device: torch.device) -> tuple:
    """`model_inputs` without the pinned-buffer bookkeeping."""
    if "embed" in batch and not batch["tokens"]:
        return (batch["embed"].to(device, non_blocking=True),)
    stored = batch.get("encoding")

    def values(key: str) -> list[torch.Tensor] | None:
        if key not in batch:
            return None
        moved = [t.to(device, non_blocking=True) for t in batch[key]]
        if stored is None:
            return moved
        enc, signed = encoding(stored["name"]), key == "tokens"
        dim = stored["tokens" if signed else "maps"]
        channels = stored.get("channels") if signed and enc.calibrated else None
        return [decode(codes, scale.to(device, non_blocking=True), enc, signed, dim,
                       channels=channels[i] if channels else None)
                for i, (codes, scale) in enumerate(zip(moved, batch["scales"][key]))]

    return values("tokens"), values("maps_prev"), values("maps_next")
