"""Stage one: run the frozen backbone once over every video and write the cache.

Videos are decoded in DataLoader worker processes (only the frames the sampling plan needs) while the
main process batches clips through the backbone. Results are buffered per shard and each shard is
written whole, then its status rows. A re-run of the same command skips finished shards and redoes
the pending videos of the others, so a killed extraction ends with the same cache as an uninterrupted
one: batches never cross a shard boundary, and every random choice is seeded per (video, view).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import option, to_dict
from ..distributed import Process, init_process, on_every, on_main, raise_together, sum_across
from ..errors import CacheError, DatasetError, EvlCacheError
from ..runtime import library_versions, resolve_device
from ..towers.backbone import BackboneSpec, FrozenBackbone, load_clip
from ..video.clips import ClipSpec, VideoClips, read_video_clips
from ..video.find import VideoEntry, VideoList, find_videos
from ..video.pixels import SPATIAL_VIEWS
from ..video.sampling import SAMPLING_MODES
from .encodings import ENCODINGS, encode, encoding
from .store import (
    DONE,
    FAILED,
    PENDING,
    CacheLayout,
    FeatureStore,
    cache_storage,
    disk_usage,
    is_url,
    location,
    remove_partial_files,
    remove_store,
    store_exists,
    store_kind,
    video_checksum,
)

log = logging.getLogger(__name__)


@dataclass
class ExtractConfig:
    """Options of `evl-cache extract`."""
    out: Path = option(None, "cache to write: *.zarr (Zarr v3) or *.h5 (HDF5)")
    videos: Path | None = option(None, "folder of videos: <class>/<video> or <split>/<class>/<video>")
    train_list: Path | None = option(None, "training list: 'path label' lines, or a CSV with a header")
    val_list: Path | None = option(None, "validation list, same formats as --train-list")
    data_root: Path | None = option(None, "folder the list paths are relative to [default: the list's folder]")
    classes: Path | None = option(None, "class names: one per line, or the authors' JSON mapping")
    model: str = option("ViT-B-16", "open_clip model name, or a path to an open_clip model-config JSON")
    pretrained: str = option("openai", "open_clip pretrained tag, a local weights file, or none (random)")
    blocks: int = option(4, "how many of the last backbone blocks to cache (0: only the per-frame CLIP "
                            "embeddings, all that zero-shot and the text heads read)")
    size: int | None = option(None, "input size in pixels [default: the model's own]")
    resize: int | None = option(None, "short side in pixels that frames are resized to before the crop "
                                      "[default: the input size]")
    spatial_views: int = option(1, "crops per evaluation clip: 1 (centre) or 3 (along the long side, as "
                                   "mmaction's ThreeCrop; needs --resize equal to the input size)")
    mean: str | None = option(None, "normalisation mean per channel, 'R,G,B' for pixels in [0, 1] "
                                    "[default: the model's own, CLIP's]")
    std: str | None = option(None, "normalisation std per channel, 'R,G,B' [default: the model's own, CLIP's]")
    frames: int = option(8, "frames per clip (T)")
    stride: int = option(16, "frame stride of dense sampling")
    sampling: str = option("dense", "frame sampling: dense (T x stride), segment (TSN), or vifi (ViFi-CLIP's "
                                    "test protocol)", choices=SAMPLING_MODES)
    eval_views: int = option(3, "temporal views per validation/test video")
    train_views: int = option(1, "cached views per training video (view 0 plain, others augmented)")
    flip: bool = option(True, "horizontal flip in augmented training views (off for Something-Something)")
    randaugment: bool = option(True, "RandAugment rand-m7-n4-mstd0.5-inc1 in augmented training views")
    seed: int = option(0, "seed of every random choice (augmentation, random weights)")
    storage: str = option("fp16", "how feature values are stored: fp16 (as the backbone gives them), or one code "
                                  "per value and a scale per token (tokens) or query patch (maps): int8 or fp8 "
                                  "(about 2x fewer bytes), int4 (about 4x)", choices=tuple(ENCODINGS))
    compress: str = option("none", "lossless zstd compression of the stored values inside each shard (Zarr)",
                           choices=("none", "zstd"))
    shard_size: int = option(8, "videos per shard (the unit of writing and resuming)")
    batch_size: int = option(8, "clips per backbone batch")
    workers: int = option(2, "DataLoader worker processes that decode videos")
    decode_timeout: float = option(120.0, "seconds one video may take to decode; a slower (or hanging) one is "
                                          "recorded as failed (0: no limit)")
    device: str = option("auto", "cuda, cpu, or auto (cuda if available)")
    overwrite: bool = option(False, "delete an existing cache at --out and start again")


@dataclass
class ExtractSummary:
    """What an extraction did."""
    cache: str | Path
    videos: int
    done: int
    failed: int
    skipped: int
    clips: int
    seconds: float
    bytes_written: int
    decoded_frames: int

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"extract: {self.done} done, {self.failed} failed, {self.skipped} skipped (already done) "
                f"of {self.videos} videos; {self.clips} clips in {self.seconds:.1f} s "
                f"({self.clips_per_second:.2f} clips/s); {self.bytes_written / 1e6:.1f} MB written "
                f"to {self.cache}")


class ClipSource(Dataset):
    """Decodes each video's planned views (runs in DataLoader workers)."""

    def __init__(self, dataset: VideoList, indices: list[int], spec: ClipSpec, timeout: float | None = None):
        self.root = dataset.root
        self.entries = dataset.entries
        self.indices = indices
        self.spec = spec
        self.timeout = timeout  # seconds per video, enforced in the process that decodes

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> VideoClips:
        index = self.indices[i]
        entry: VideoEntry = self.entries[index]
        if entry.error:
            return VideoClips(index, None, 0, entry.error, 0)
        return read_video_clips(self.root / entry.path, entry.split, index, self.spec, self.timeout)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def dataset_fingerprint(dataset: VideoList) -> str:
    """sha256 of the video table and class names: two runs over different data never mix."""
    digest = hashlib.sha256(json.dumps(dataset.class_names).encode())
    for entry in dataset.entries:
        digest.update(f"{entry.path}\t{entry.label}\t{entry.split}\t{entry.error}\n".encode())
    return digest.hexdigest()


def cache_identity(spec: BackboneSpec, clip_spec: ClipSpec, blocks: int, dataset: VideoList, views: int,
                   shard_size: int, normalisation: tuple[tuple[float, ...], tuple[float, ...]],
                   storage: dict) -> dict:
    """Everything that decides the cache's contents; a resume must match it exactly."""
    identity = {
        "backbone": spec.to_dict(),
        "blocks": list(range(spec.layers - blocks, spec.layers)),
        "sampling": {**clip_spec.sampling_record(), "views": views},
        "preprocessing": clip_spec.preprocessing_record(*normalisation),
        "stored": ["tokens", "maps", "embed"] if blocks else ["embed"],
        "dtype": "float16",  # of the values as read (`storage` says how they are stored)
        "storage": storage,
        "class_names": list(dataset.class_names),
        "dataset": {"root": str(dataset.root.resolve()), "fingerprint": dataset_fingerprint(dataset),
                    "videos": len(dataset.entries), "splits": dataset.count_by_split()},
        "shard_size": shard_size,
    }
    return json.loads(json.dumps(identity))  # as stored: lists, not tuples


def clip_spec_of(config: ExtractConfig, size: int) -> ClipSpec:
    """How `config` turns videos into clips of `size` pixels."""
    return ClipSpec(config.sampling, config.frames, config.stride, config.eval_views, config.train_views, size,
                    config.seed, config.flip, config.randaugment, config.resize, config.spatial_views)


def cache_layout(config: ExtractConfig, dataset: VideoList, width: int, layers: int, grid: tuple[int, int],
                 embed_dim: int) -> CacheLayout:
    """The shapes a cache of `dataset` will have: views per video are the most any split needs."""
    spec = clip_spec_of(config, 1)  # views do not depend on the size
    views = max(spec.views(split) for split in {e.split for e in dataset.entries})
    return CacheLayout(num_videos=len(dataset.entries), views=views, frames=config.frames,
                       tokens=1 + grid[0] * grid[1], width=width, grid=tuple(grid), embed_dim=embed_dim,
                       blocks=tuple(range(layers - config.blocks, layers)), shard_size=config.shard_size,
                       encoding=config.storage, compress=config.compress)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix}{key}: cache has {a!r}, asked for {b!r}")
    return diffs


def _validate(config: ExtractConfig) -> None:
    if config.out is None:
        raise EvlCacheError("--out is required (a *.zarr or *.h5 path)")
    for name in ("frames", "stride", "eval_views", "train_views", "shard_size", "batch_size"):
        if getattr(config, name) < 1:
            raise EvlCacheError(f"--{name.replace('_', '-')} must be at least 1")
    if config.blocks < 0:
        raise EvlCacheError("--blocks must be 0 (embeddings only) or more")
    if config.frames < 2 and config.blocks:
        raise EvlCacheError("--frames must be at least 2 (the temporal maps pair adjacent frames)")
    if config.workers < 0:
        raise EvlCacheError("--workers must be 0 or more")
    if config.decode_timeout < 0:
        raise EvlCacheError("--decode-timeout must be 0 (no limit) or more")
    encoding(config.storage)  # refuses fp8 where torch has no float8
    if config.compress != "none" and store_kind(config.out) == "h5":
        raise EvlCacheError("--compress zstd is for Zarr caches (HDF5 would need a zstd filter plugin); "
                            "use a .zarr path or --compress none", config.out)
    if config.spatial_views not in SPATIAL_VIEWS:
        raise EvlCacheError(f"--spatial-views must be one of {', '.join(map(str, SPATIAL_VIEWS))}")
    for name in ("mean", "std"):
        if getattr(config, name) is not None:
            channel_values(getattr(config, name), name)


def channel_values(text: str, name: str) -> tuple[float, float, float]:
    """'R,G,B' -> three floats (a std must be positive), or a one-line reason."""
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or (name == "std" and min(values) <= 0):
        raise EvlCacheError(f"--{name} {text!r}: give three comma-separated numbers, R,G,B"
                            + (", all positive" if name == "std" else ""))
    return values  # type: ignore[return-value]


def _check_sizes(config: ExtractConfig, size: int) -> None:
    """Options that depend on the input size, once it is known."""
    resize = config.resize or size
    if resize < size:
        raise EvlCacheError(f"--resize {resize} is below the input size {size}: the crop would not fit")
    if config.spatial_views == 3 and resize != size:
        raise EvlCacheError(f"--spatial-views 3 crops span the short side: --resize must equal the input size "
                            f"{size}, not {resize}")


def _open_store_together(process: Process, config: ExtractConfig, identity: dict, layout: CacheLayout,
                         dataset: VideoList) -> tuple[np.ndarray, list[int], int]:
    """(video statuses, the shards this process writes, the cache's HDF5 file count or 0 for Zarr).

    The main process creates (or checks) the cache first, an HDF5 cache as one part file per process;
    then every process checks it and reads it, and closes it before any process opens it to write (an
    HDF5 file open for writing in one process cannot be read by another)."""
    def create() -> None:
        open_or_create(config, identity, layout, dataset, parts=process.world_size).close()
        remove_partial_files(config.out)  # left by a killed run; no process writes yet

    def read() -> tuple[np.ndarray, list[int], int]:
        with checked_store(location(config.out), identity, mode="r") as store:
            shards = -(-layout.num_videos // layout.shard_size)
            mine = [s for s in range(shards) if store.shard_owner(s, process.world_size) == process.rank]
            return store.column("status"), mine, store.parts

    on_main(process, create)
    return on_every(process, read)


def checked_store(out: str | Path, identity: dict, mode: str = "r") -> FeatureStore:
    """The cache at `out`, after checking that it was made the way `identity` says."""
    store = FeatureStore(out, mode=mode)
    attrs = store.check_version()
    attrs["storage"] = cache_storage(attrs)  # a version-1 cache: fp16, uncompressed
    diffs = _differences({k: attrs.get(k) for k in identity}, identity)
    if diffs:
        store.close()
        raise CacheError("exists with a different configuration (" + "; ".join(diffs) +
                         "); pass --overwrite to start again", out)
    return store


def open_or_create(config: ExtractConfig, identity: dict, layout: CacheLayout,
                   dataset: VideoList, parts: int = 1) -> FeatureStore:
    """Create the cache (an HDF5 one as `parts` part files, one per writing process), or reopen it for
    resuming after checking it was made the same way."""
    out = location(config.out)
    if store_exists(out) and config.overwrite:
        remove_store(out)
    if store_exists(out):
        return checked_store(out, identity, mode="r+")
    columns = {
        "path": np.array([e.path for e in dataset.entries], dtype=object),
        "label": np.array([e.label for e in dataset.entries], dtype=np.int32),
        "split": np.array([e.split for e in dataset.entries], dtype=object),
    }
    attrs = {**identity, "extract_config": to_dict(config), "versions": library_versions(),
             "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return FeatureStore.create(out, layout, attrs, columns, parts=parts)


class ShardWriter:
    """Buffers one shard's features and writes them whole, status rows last.

    Videos of the shard that are already done or failed (say, beside videos `verify --repair` marked
    pending) are read back first and written again as they are: only pending videos are redone.
    """

    def __init__(self, store: FeatureStore, layout: CacheLayout, shard: int, count: int):
        self.store, self.layout = store, layout
        self.start = shard * layout.shard_size
        self.count = count
        self.buffers = {name: np.zeros((count,) + shape[1:], dtype)
                        for name, (shape, _, dtype) in layout.feature_arrays().items()}
        self.frames = np.zeros(count, np.int32)
        self.views = np.zeros(count, np.int16)
        self.status = np.full(count, PENDING, np.uint8)
        self.errors = [""] * count
        self.checksums = np.zeros(count, np.uint32)
        self.has_checksums = store.has("videos/checksum")  # caches made before checksums lack the column
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

    def fail(self, index: int, reason: str) -> None:
        row = index - self.start
        self.status[row], self.errors[row] = FAILED, reason

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
        store.write_rows("status", self.start, self.status)  # last: marks the shard finished
        store.flush()


@dataclass
class _PendingClips:
    index: int
    view_offset: int
    num_frames: int
    views_total: int
    clips: torch.Tensor


def stored_features(output, layout: CacheLayout) -> dict[str, np.ndarray]:
    """A batch's backbone output as the cache stores it: each feature array's rows [B, ...], encoded
    on the backbone's device (`encodings`), then moved to the CPU."""
    enc = encoding(layout.encoding)
    stored = {}

    def add(name: str, values, signed: bool) -> None:
        codes, scale = encode(values, enc, signed)
        stored[name] = codes.cpu().numpy()
        if scale is not None:
            stored[f"scales/{name}"] = scale.cpu().numpy()

    for b, block in enumerate(layout.blocks):
        add(f"tokens/block_{block}", output.block_outputs[b], signed=True)
        add(f"maps/block_{block}/prev", output.maps_prev[b], signed=False)
        add(f"maps/block_{block}/next", output.maps_next[b], signed=False)
    stored["embed"] = output.embeddings.to(torch.float16).cpu().numpy()
    return stored


def extract(config: ExtractConfig) -> ExtractSummary:
    """Extract (or resume extracting) the cache that `config` describes."""
    _validate(config)
    dataset = find_videos(config.videos, config.train_list, config.val_list, config.data_root, config.classes)
    process = init_process(resolve_device(config.device))
    device = process.device(resolve_device(config.device))
    clip, spec = load_clip(config.model, config.pretrained, config.size, device, seed=config.seed)
    size = config.size or spec.image_size
    _check_sizes(config, size)
    mean = channel_values(config.mean, "mean") if config.mean is not None else spec.mean
    std = channel_values(config.std, "std") if config.std is not None else spec.std
    backbone = FrozenBackbone(clip.visual, config.blocks, mean, std).to(device)
    layout = cache_layout(config, dataset, spec.width, spec.layers, spec.patch_grid, spec.embed_dim)
    views = layout.views
    clip_spec = clip_spec_of(config, size)
    identity = cache_identity(spec, clip_spec, config.blocks, dataset, views, config.shard_size, (mean, std),
                              {"encoding": config.storage, "compress": config.compress})
    status, my_shards, parts = _open_store_together(process, config, identity, layout, dataset)
    bytes_before = disk_usage(location(config.out))
    todo_shards = [s for s in my_shards  # shard s: rank s % world (HDF5: part s % parts, by rank part % world)
                   if (status[s * layout.shard_size:(s + 1) * layout.shard_size] == PENDING).any()]
    todo = [i for s in todo_shards for i in range(s * layout.shard_size,
                                                  min((s + 1) * layout.shard_size, layout.num_videos))
            if status[i] == PENDING]  # the shards' done and failed videos are kept (ShardWriter)
    log.info("extract: %d videos (%s), %d classes; process %d of %d has %d shards to do (%d videos); backbone "
             "%s (%s), blocks %s, device %s", layout.num_videos, dataset.count_by_split(),
             len(dataset.class_names), process.rank, process.world_size, len(todo_shards), len(todo),
             spec.model, spec.pretrained, list(layout.blocks), device)
    if parts and parts != process.world_size and process.is_main:
        log.info("extract: the cache is %d HDF5 file(s), each written by one process: with %d process(es), "
                 "process r writes the files p with p %% %d == r", parts, process.world_size, process.world_size)
    store = FeatureStore(config.out, mode="r+") if todo else None  # only a process with work opens it to write
    # beside a local cache; for a URL cache, in the current folder
    metrics_path = Path((Path(str(config.out).split("://")[-1]).name if is_url(config.out) else str(config.out))
                        + ".extract.jsonl")
    loader = DataLoader(ClipSource(dataset, todo, clip_spec, config.decode_timeout), batch_size=None, shuffle=False,
                        num_workers=config.workers, worker_init_fn=_worker_init,
                        prefetch_factor=4 if config.workers else None,
                        persistent_workers=False)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    started = time.perf_counter()
    totals = {"done": 0, "failed": 0, "clips": 0, "decoded": 0}
    writer: ShardWriter | None = None
    pending: list[_PendingClips] = []

    def run_batch() -> None:
        clips = torch.cat([p.clips for p in pending]).to(device, non_blocking=True)
        with autocast:
            stored = stored_features(backbone(clips), layout)
        offset = 0
        for p in pending:
            count = p.clips.shape[0]
            writer.put(p.index, p.view_offset, p.num_frames, p.views_total,
                       {name: values[offset:offset + count] for name, values in stored.items()})
            offset += count
        totals["clips"] += offset
        pending.clear()

    def finish_shard() -> None:
        if pending:
            run_batch()
        try:
            writer.write()
        except OSError as error:
            reason = "disk full" if error.errno == errno.ENOSPC else error.strerror or str(error)
            raise CacheError(f"{reason} while writing shard {writer.start // layout.shard_size}; shards "
                             f"written before stay valid, re-run the same command to resume", config.out) from None
        done = int(((writer.status == DONE) & ~writer.kept).sum())
        failed = int(((writer.status == FAILED) & ~writer.kept).sum())
        totals["done"] += done
        elapsed = time.perf_counter() - started
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps({"event": "shard", "rank": process.rank,
                                     "shard": writer.start // layout.shard_size,
                                     "done": done, "failed": failed, "clips_total": totals["clips"],
                                     "seconds": round(elapsed, 3),
                                     "clips_per_s": round(totals["clips"] / max(elapsed, 1e-9), 3)}) + "\n")

    progress = tqdm(total=len(todo), unit="video", desc="extract", dynamic_ncols=True, smoothing=0.1,
                    disable=not process.is_main)
    error = None
    try:
        for item in loader:
            shard = item.index // layout.shard_size
            if writer is None or shard != writer.start // layout.shard_size:
                if writer is not None:
                    finish_shard()
                count = min(layout.shard_size, layout.num_videos - shard * layout.shard_size)
                writer = ShardWriter(store.for_shard(shard), layout, shard, count)
            if item.clips is None:
                writer.fail(item.index, item.error)
                totals["failed"] += 1
                log.warning("failed: %s: %s", dataset.entries[item.index].path, item.error)
            else:
                totals["decoded"] += item.decoded_frames
                views_total = item.clips.shape[0]
                offset = 0
                while offset < views_total:
                    room = config.batch_size - sum(p.clips.shape[0] for p in pending)
                    take = min(room, views_total - offset)
                    pending.append(_PendingClips(item.index, offset, item.num_frames, views_total,
                                                 item.clips[offset:offset + take]))
                    offset += take
                    if sum(p.clips.shape[0] for p in pending) >= config.batch_size:
                        run_batch()
            progress.update(1)
            elapsed = time.perf_counter() - started
            progress.set_postfix(clips_per_s=f"{totals['clips'] / max(elapsed, 1e-9):.2f}",
                                 failed=totals["failed"], refresh=False)
        if writer is not None:
            finish_shard()
    except EvlCacheError as raised:  # every process must hear of it, or the others would wait forever
        error = raised
    finally:
        progress.close()
    raise_together(process, error)
    done, failed, clips, decoded, todo_count = sum_across(
        process, [totals["done"], totals["failed"], totals["clips"], totals["decoded"], len(todo)])
    seconds = time.perf_counter() - started
    summary = ExtractSummary(location(config.out), layout.num_videos, int(done), int(failed),
                             layout.num_videos - int(todo_count), int(clips), seconds,
                             max(disk_usage(location(config.out)) - bytes_before, 0), int(decoded))
    if store is not None:
        store.close()
    if not process.is_main:
        return summary
    with open(metrics_path, "a") as handle:
        handle.write(json.dumps({"event": "summary", **{k: (str(v) if isinstance(v, Path) else v)
                                                         for k, v in dataclasses.asdict(summary).items()},
                                 "config": to_dict(config), "versions": library_versions()}) + "\n")
    log.info(summary.line())
    if summary.done == 0 and summary.skipped == 0:
        raise DatasetError(f"no video could be extracted ({summary.failed} failed); see the reasons above "
                           f"or with `evl-cache info {config.out} --failed`")
    return summary
