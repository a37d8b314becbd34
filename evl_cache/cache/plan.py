"""Plan a cache before extracting it: its size per split and storage option, what an epoch reads, and
how long the target disk takes to read that (`evl-cache plan`, `extract --dry-run`).

Nothing is decoded and no weights are loaded: the shapes come from the open_clip model config, the
videos from listing the dataset. The byte counts are exact for a Zarr cache of videos that all
extract (every video's own views, each chunk uncompressed, plus each shard file's index); zstd
compression and HDF5's own bookkeeping are not predicted. The epoch time is only the time to read
an epoch at the speed a quick probe of the target disk measured: the floor for an epoch that the
loader bounds, as it does on a GPU.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EvlCacheError
from ..runtime import memory_available
from ..towers.backbone import model_geometry
from .encodings import ENCODINGS
from .options import ExtractConfig, cache_layout, clip_spec_of, dataset_of, validate
from .store import CacheLayout, is_url

INDEX_BYTES_PER_CHUNK, INDEX_CHECKSUM_BYTES = 16, 4  # a shard index: (offset, length) uint64 per chunk, CRC-32C


@dataclass(frozen=True)
class DiskProbe:
    """Read speeds of the target folder's disk, measured with a file of `size` bytes read in chunks of
    one clip view in random order: from the disk (its pages dropped from the page cache first) and
    from the page cache."""
    folder: str
    size: int
    cold_bytes_per_s: float
    warm_bytes_per_s: float


@dataclass
class CachePlan:
    """What a cache of a dataset takes, for every storage encoding."""
    videos: dict[str, int]          # split -> videos
    views: dict[str, int]           # split -> clip views cached
    bytes_per_view: dict[str, int]  # encoding -> bytes of one (video, view) in every feature array
    read_per_view: dict[str, int]   # encoding -> bytes a default training run reads per view (all blocks, maps)
    split_bytes: dict[str, dict[str, int]]  # encoding -> split -> bytes of its videos' chunks
    total_bytes: dict[str, int]     # encoding -> every feature file's bytes, shard indexes included
    epoch_read_bytes: dict[str, int]  # encoding -> one view of every training video
    shapes: str                     # a line describing what is stored per view
    chosen: str                     # the encoding asked for
    probe: DiskProbe | None
    memory_available: int | None    # bytes the system can give (for --in-memory), if known

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def plan(config: ExtractConfig) -> CachePlan:
    """The plan of the cache `config` describes (`config.probe_mb` 0 skips the disk probe)."""
    validate(config)
    dataset = dataset_of(config)
    geometry = model_geometry(config.model, config.size)
    clip_spec = clip_spec_of(config, geometry["image_size"])
    own_views = np.array([clip_spec.views(e.split) for e in dataset.entries])
    splits = np.array([e.split for e in dataset.entries])
    layouts = {name: dataclasses.replace(
        cache_layout(config, dataset, geometry["width"], geometry["layers"], geometry["patch_grid"],
                     geometry["embed_dim"], geometry["prefix_tokens"]), encoding=name, compress="none") for name in ENCODINGS}
    result = CachePlan(videos={}, views={}, bytes_per_view={}, read_per_view={}, split_bytes={}, total_bytes={},
                       epoch_read_bytes={}, shapes=_shapes(layouts["fp16"]), chosen=config.storage, probe=None,
                       memory_available=memory_available())
    for split in sorted(set(splits)):
        result.videos[split] = int((splits == split).sum())
        result.views[split] = int(own_views[splits == split].sum())
    for name, layout in layouts.items():
        arrays = layout.feature_arrays()
        view_bytes = {array: dtype.itemsize * int(np.prod(chunk)) for array, (_, chunk, dtype) in arrays.items()}
        per_view = result.bytes_per_view[name] = sum(view_bytes.values())
        # a decoder run reads every cached block and its maps; a cache of embeddings only, the embeddings
        read = result.read_per_view[name] = sum(b for a, b in view_bytes.items() if a != "embed") or view_bytes["embed"]
        result.split_bytes[name] = {split: views * per_view for split, views in result.views.items()}
        result.total_bytes[name] = sum(result.split_bytes[name].values()) + len(arrays) * _index_bytes(layout)
        result.epoch_read_bytes[name] = result.videos.get("train", 0) * read
    if config.probe_mb > 0:
        out = config.out
        folder = Path(".") if out is None or is_url(out) else Path(out).resolve().parent
        result.probe = probe_disk(folder, int(config.probe_mb * 2**20), result.read_per_view[config.storage])
    return result


def _index_bytes(layout: CacheLayout) -> int:
    """Bytes of the shard indexes of one feature array: one index per shard file, each covering every
    chunk of a full shard (the last shard's index too)."""
    rows = min(layout.shard_size, max(layout.num_videos, 1))
    shards = -(-layout.num_videos // rows)
    return shards * (INDEX_BYTES_PER_CHUNK * rows * layout.views + INDEX_CHECKSUM_BYTES)


def _shapes(layout: CacheLayout) -> str:
    t, p = layout.frames, layout.grid[0] * layout.grid[1]
    return (f"per view: {len(layout.blocks)} blocks of tokens [{t} x {layout.tokens} x {layout.width}], their maps "
            f"[{t - 1} x {p} x {p}] both ways, embeddings [{t} x {layout.embed_dim}]")


def probe_disk(folder: Path, size: int, chunk: int) -> DiskProbe:
    """Write a `size`-byte file in `folder`, then time reading it in `chunk`-byte pieces in random order,
    first from the disk (after dropping its pages from the page cache), then again from the page cache."""
    if not folder.is_dir():
        raise EvlCacheError("cannot probe the disk: the output folder does not exist", folder)
    chunk = max(min(chunk, size), 4096)
    pieces = max(size // chunk, 1)
    order = np.random.default_rng(0).permutation(pieces)
    buffer = bytearray(chunk)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".evl-cache-probe-") as handle:
        block = os.urandom(chunk)  # incompressible, so a compressing file system cannot shortcut it
        for _ in range(pieces):
            handle.write(block)
        handle.flush()
        os.fsync(handle.fileno())
        fd = handle.fileno()

        def read_all() -> float:
            start = time.perf_counter()
            for piece in order:
                os.preadv(fd, [buffer], int(piece) * chunk)
            return pieces * chunk / max(time.perf_counter() - start, 1e-9)

        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        cold = read_all()
        warm = read_all()
    return DiskProbe(str(folder), pieces * chunk, cold, warm)


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s" if seconds >= 10 else f"{seconds:.2g} s"


def format_plan(plan: CachePlan) -> str:
    """The plan as a table a user reads before committing disk and hours to an extraction."""
    splits = list(plan.views)
    lines = [f"plan: {sum(plan.videos.values())} videos ("
             + ", ".join(f"{s} {plan.videos[s]}, {plan.views[s]} views" for s in splits) + ")",
             plan.shapes]
    header = ["storage", "per view"] + splits + ["total", "epoch reads"]
    if plan.probe:
        header += ["epoch read, disk", "epoch read, page cache"]
    rows = []
    for name in ENCODINGS:
        epoch = plan.epoch_read_bytes[name]
        row = [name + (" (chosen)" if name == plan.chosen else ""), _size(plan.bytes_per_view[name])]
        row += [_size(plan.split_bytes[name][s]) for s in splits]
        row += [_size(plan.total_bytes[name]), _size(epoch)]
        if plan.probe:
            row += [_duration(epoch / plan.probe.cold_bytes_per_s), _duration(epoch / plan.probe.warm_bytes_per_s)]
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    lines.append("sizes are exact for a Zarr cache of videos that all extract; --compress zstd (lossless) saves "
                 "what the values allow and is not predicted; 'epoch reads' is one view of every training video, "
                 "every cached block and its maps")
    if plan.probe:
        p = plan.probe
        lines.append(f"disk probe: {_size(p.size)} in {p.folder} read in random pieces of one view: "
                     f"{_size(p.cold_bytes_per_s)}/s from the disk, {_size(p.warm_bytes_per_s)}/s from the page "
                     f"cache (epoch read times above are at these speeds; training adds its own compute)")
    if plan.memory_available is not None:
        train_bytes = {name: split.get("train", 0) for name, split in plan.split_bytes.items()}
        fits = [name for name, b in train_bytes.items() if 0 < b <= plan.memory_available]
        lines.append(f"memory available: {_size(plan.memory_available)}; the training split fits in RAM "
                     f"(train --in-memory) with: {', '.join(fits) if fits else 'none of these'}")
    return "\n".join(lines)
