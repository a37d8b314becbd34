"""Extraction's side of the store: checking the output before anything is written, creating or
reopening the cache, and writing shards whole.

Every clip of a shard's videos is buffered (`ShardWriter`) and the shard is written in one go, status
rows last, so a killed run never leaves a half-written shard marked done. `BatchedWriter` takes the
decoded videos in order, runs their clips through the backbone in batches that never cross a shard,
and writes each shard when the next one starts.
"""
from __future__ import annotations

import errno
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..config import to_dict
from ..distributed import Process, on_every, on_main
from ..errors import CacheError
from ..runtime import library_versions
from ..towers.backbone import BackboneSpec
from ..video.clips import VideoClips
from ..video.find import VideoList
from .calibration import block_channels
from .encodings import encode, encoding
from .options import ExtractConfig
from .store import (
    DONE,
    FAILED,
    PENDING,
    CacheLayout,
    FeatureStore,
    cache_storage,
    foreign_content,
    is_url,
    location,
    remove_partial_files,
    remove_store,
    storage_choice,
    store_exists,
    video_checksum,
)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_output(config: ExtractConfig) -> None:
    """Refuse an --out that is not ours to write, before anything is written or removed: anything at
    --out that is not an evl-cache cache, and a folder that is (or holds) the videos or list files."""
    out = location(config.out)
    found = foreign_content(out)
    if found is not None:
        raise CacheError(f"exists and is not an evl-cache cache: {found}; choose another --out", out)
    if is_url(out):
        return
    resolved = Path(out).resolve()
    for name in ("videos", "root", "data_root", "train_list", "val_list", "list", "classes"):
        given = getattr(config, name)
        if given is not None and _inside(Path(given).resolve(), resolved):
            raise CacheError(f"--out is (or holds) the --{name.replace('_', '-')} {given}: the cache must be a "
                             f"path of its own", out)
    if not resolved.parent.is_dir():
        raise CacheError("output folder does not exist", resolved.parent)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {a!r}, asked for {b!r}")
    return diffs


def checked_store(out: str | Path, identity: dict, mode: str = "r") -> FeatureStore:
    """The cache at `out`, after checking that it was made the way `identity` says."""
    store = FeatureStore(out, mode=mode)
    attrs = store.check_version()
    attrs["storage"] = storage_choice(attrs)  # a version-1 cache: fp16, uncompressed; codes follow the cache
    if "backbone" in attrs:  # a cache of versions 1 and 2: an open_clip ViT, one class token
        attrs["backbone"] = json.loads(json.dumps(BackboneSpec.from_dict(attrs["backbone"]).to_dict()))
    diffs = _differences({k: attrs.get(k) for k in identity}, identity)
    if diffs:
        store.close()
        raise CacheError("exists with a different configuration (" + "; ".join(diffs) +
                         "); pass --overwrite to start again", out)
    return store


def create_or_check(config: ExtractConfig, identity: dict, layout: CacheLayout, dataset: VideoList,
                    parts: int = 1, calibrate: Callable[[], dict | None] | None = None) -> None:
    """Create the cache (an HDF5 one as `parts` part files, one per writing process), or check that the
    one there was made the same way; `--overwrite` first removes it (only ever an evl-cache cache).
    A new cache records its encoding's code kinds and the calibration `calibrate` gives (once: a
    resumed cache keeps its own)."""
    out = location(config.out)
    if store_exists(out) and config.overwrite:
        remove_store(out)
    if store_exists(out):
        checked_store(out, identity).close()
        remove_partial_files(out)  # left by a killed run; no process writes yet
        return
    columns = {
        "path": np.array([e.path for e in dataset.entries], dtype=object),
        "label": np.array([e.label for e in dataset.entries], dtype=np.int32),
        "split": np.array([e.split for e in dataset.entries], dtype=object),
    }
    record = calibrate() if calibrate is not None else None
    storage = {**identity["storage"], **encoding(layout.encoding).record(),
               **({"calibration": record} if record else {})}
    attrs = {**identity, "storage": storage, "extract_config": to_dict(config), "versions": library_versions(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    FeatureStore.create(out, layout, attrs, columns, parts=parts).close()


def open_together(process: Process, config: ExtractConfig, identity: dict, layout: CacheLayout,
                  dataset: VideoList, calibrate: Callable[[], dict | None] | None = None,
                  ) -> tuple[np.ndarray, list[int], int, dict]:
    """(video statuses, the shards this process writes, the cache's HDF5 file count or 0 for Zarr, how
    it stores its values: `storage`, with its calibration).

    The main process creates (or checks) the cache first, an HDF5 cache as one part file per process,
    calibrating a new one; then every process checks it and reads it (the calibration too), and closes
    it before any process opens it to write (an HDF5 file open for writing in one process cannot be read
    by another)."""
    def read() -> tuple[np.ndarray, list[int], int, dict]:
        with checked_store(location(config.out), identity) as store:
            shards = -(-layout.num_videos // layout.shard_size)
            mine = [s for s in range(shards) if store.shard_owner(s, process.world_size) == process.rank]
            return store.column("status"), mine, store.parts, cache_storage(store.attrs)

    on_main(process, lambda: create_or_check(config, identity, layout, dataset, process.world_size, calibrate))
    return on_every(process, read)


def stored_features(output, layout: CacheLayout, storage: dict | None = None) -> dict[str, np.ndarray]:
    """A batch's backbone output as the cache stores it: each feature array's rows [B, ...], encoded
    on the backbone's device (`encodings`, with the calibration in the cache's `storage`), then moved to
    the CPU."""
    enc = encoding(layout.encoding)
    stored = {}

    def add(name: str, values: torch.Tensor, signed: bool, channels=None) -> None:
        codes, scale = encode(values, enc, signed, channels)
        stored[name] = codes.cpu().numpy()
        if scale is not None:
            stored[f"scales/{name}"] = scale.cpu().numpy()

    for b, block in enumerate(layout.blocks):
        channels = block_channels(storage or {}, block) if enc.calibrated else None
        if enc.calibrated and channels is None:
            raise CacheError(f"{enc.name} codes need the cache's calibration, which has no block {block}")
        add(f"tokens/block_{block}", output.block_outputs[b], signed=True, channels=channels)
        add(f"maps/block_{block}/prev", output.maps_prev[b], signed=False)
        add(f"maps/block_{block}/next", output.maps_next[b], signed=False)
    stored["embed"] = output.embeddings.to(torch.float16).cpu().numpy()
    return stored


class ShardWriter:
    """Buffers one shard's features and writes them whole, status rows last.

    Videos of the shard that are already done or failed (say, beside videos `verify --repair` marked
    pending) are read back first and written again as they are: only pending videos are redone.
    """

    def __init__(self, store: FeatureStore, layout: CacheLayout, shard: int, count: int):
        self.store, self.layout = store, layout
        self.shard = shard
        self.start = shard * layout.shard_size
        self.count = count
        self.buffers = {name: np.zeros((count,) + shape[1:], dtype)
                        for name, (shape, _, dtype) in layout.feature_arrays().items()}
        self.frames = np.zeros(count, np.int32)
        self.views = np.zeros(count, np.int16)
        self.status = np.full(count, PENDING, np.uint8)
        self.errors = [""] * count
        self.notes = [""] * count  # what decoding a video needed (`VideoClips.note`)
        self.checksums = np.zeros(count, np.uint32)
        self.has_checksums = store.has("videos/checksum")  # some format-1 caches lack the column
        self.has_notes = store.has("videos/note")  # a cache whose table has no note column keeps none
        rows = slice(self.start, self.start + count)
        self.kept = store.column("status", rows) != PENDING
        if self.kept.any():
            self._keep(rows)

    def _keep(self, rows: slice) -> None:
        """Load the done and failed videos' rows, so that writing the whole shard keeps them."""
        kept = self.kept
        for name, values in self.buffers.items():
            values[kept] = np.asarray(self.store.array(name)[rows])[kept]
        for name, values in (("frames", self.frames), ("views", self.views), ("status", self.status)) + (
                (("checksum", self.checksums),) if self.has_checksums else ()):
            values[kept] = self.store.column(name, rows)[kept]
        errors = self.store.column("error", rows)
        self.errors = [str(errors[i]) if kept[i] else "" for i in range(self.count)]
        if self.has_notes:
            notes = self.store.column("note", rows)
            self.notes = [str(notes[i]) if kept[i] else "" for i in range(self.count)]

    def fail(self, index: int, reason: str) -> None:
        row = index - self.start
        self.status[row], self.errors[row] = FAILED, reason

    def note(self, index: int, text: str) -> None:
        self.notes[index - self.start] = text

    def put(self, index: int, view_offset: int, num_frames: int, views_total: int,
            stored: dict[str, np.ndarray]) -> None:
        """Store consecutive views of one video: each feature array's rows (a slice of a batch)."""
        row = index - self.start
        count = stored["embed"].shape[0]
        for name, values in stored.items():
            self.buffers[name][row, view_offset:view_offset + count] = values
        self.frames[row], self.views[row] = num_frames, views_total
        if view_offset + count == views_total:
            self.status[row] = DONE

    def new_counts(self) -> tuple[int, int]:
        """(done, failed) among the videos this writer extracted (not those it kept)."""
        return (int(((self.status == DONE) & ~self.kept).sum()), int(((self.status == FAILED) & ~self.kept).sum()))

    def write(self) -> None:
        store = self.store
        new = np.flatnonzero((self.status == DONE) & ~self.kept)
        for row in new:
            self.checksums[row] = video_checksum(values[row, : self.views[row]] for values in self.buffers.values())
        if store.kind == "zarr":  # whole shard in one write; all-zero chunks are not stored
            for name, values in self.buffers.items():
                store.write_block(name, self.start, values)
        else:  # HDF5 allocates every chunk it is given: write only the views a new video has
            for row in new:
                for name, values in self.buffers.items():
                    store.array(name)[self.start + row, : self.views[row]] = values[row, : self.views[row]]
        if self.has_checksums:
            store.write_rows("checksum", self.start, self.checksums)
        store.write_rows("frames", self.start, self.frames)
        store.write_rows("views", self.start, self.views)
        store.write_rows("error", self.start, np.array(self.errors, dtype=object))
        if self.has_notes:
            store.write_rows("note", self.start, np.array(self.notes, dtype=object))
        store.write_rows("status", self.start, self.status)  # last: marks the shard finished
        store.flush()


@dataclass
class _Pending:
    """Consecutive views of one video waiting for the next backbone batch."""
    index: int
    view_offset: int
    num_frames: int
    views_total: int
    clips: torch.Tensor


@dataclass
class Counts:
    """What one process extracted."""
    done: int = 0
    failed: int = 0
    clips: int = 0
    decoded_frames: int = 0


@dataclass
class BatchedWriter:
    """Takes decoded videos in cache order; runs their clips through `encoded` (backbone and encoding:
    clips -> each feature array's rows) `batch_size` at a time, never across a shard; writes each shard
    whole once the next one starts (`close` writes the last) and reports it to `on_shard`."""
    store: FeatureStore
    layout: CacheLayout
    encoded: Callable[[torch.Tensor], dict[str, np.ndarray]]
    batch_size: int
    on_shard: Callable[[ShardWriter, Counts], None]
    counts: Counts = field(default_factory=Counts)
    _writer: ShardWriter | None = None
    _pending: list[_Pending] = field(default_factory=list)

    def add(self, item: VideoClips) -> None:
        shard = item.index // self.layout.shard_size
        if self._writer is None or shard != self._writer.shard:
            self.close()
            count = min(self.layout.shard_size, self.layout.num_videos - shard * self.layout.shard_size)
            self._writer = ShardWriter(self.store.for_shard(shard), self.layout, shard, count)
        self._writer.note(item.index, item.note)
        if item.clips is None:
            self._writer.fail(item.index, item.error)
            self.counts.failed += 1
            return
        self.counts.decoded_frames += item.decoded_frames
        views, offset = item.clips.shape[0], 0
        while offset < views:
            take = min(self.batch_size - self._pending_clips(), views - offset)
            self._pending.append(_Pending(item.index, offset, item.num_frames, views,
                                          item.clips[offset:offset + take]))
            offset += take
            if self._pending_clips() >= self.batch_size:
                self._run_batch()

    def close(self) -> None:
        """Write the shard in progress, if any."""
        if self._writer is None:
            return
        if self._pending:
            self._run_batch()
        writer, self._writer = self._writer, None
        try:
            writer.write()
        except OSError as error:
            reason = "disk full" if error.errno == errno.ENOSPC else error.strerror or str(error)
            raise CacheError(f"{reason} while writing shard {writer.shard}; shards written before stay valid, "
                             f"re-run the same command to resume", self.store.path) from None
        self.counts.done += writer.new_counts()[0]
        self.on_shard(writer, self.counts)

    def _pending_clips(self) -> int:
        return sum(p.clips.shape[0] for p in self._pending)

    def _run_batch(self) -> None:
        stored = self.encoded(torch.cat([p.clips for p in self._pending]))
        offset = 0
        for p in self._pending:
            count = p.clips.shape[0]
            self._writer.put(p.index, p.view_offset, p.num_frames, p.views_total,
                             {name: values[offset:offset + count] for name, values in stored.items()})
            offset += count
        self.counts.clips += offset
        self._pending.clear()
