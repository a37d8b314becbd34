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
import json
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ..config import to_dict
from ..distributed import Process, init_process, raise_together, sum_across
from ..errors import DatasetError, EvlCacheError
from ..runtime import bind_device, deterministic_kernels, library_versions, one_torch_thread, resolve_device
from ..towers.backbone import BackboneSpec, FrozenBackbone, load_clip
from ..video.clips import ClipSpec, VideoClips, read_video_clips
from ..video.datasets import NOT_ON_DISK
from ..video.find import VideoList
from .calibration import calibration_record, measure_errors, warning
from .encodings import ENCODINGS, encoding, stored_encoding
from .options import (
    ExtractConfig,
    cache_identity,
    cache_layout,
    channel_values,
    check_sizes,
    clip_spec_of,
    dataset_of,
    validate,
)
from .plan import CachePlan, plan
from .store import PENDING, CacheLayout, FeatureStore, disk_usage, is_url, location
from .writer import BatchedWriter, Counts, ShardWriter, check_output, open_together, stored_features

log = logging.getLogger(__name__)


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
    unreadable_folders: list[str] = dataclasses.field(default_factory=list)  # or tar shards: `path: reason`
    not_on_disk: int = 0  # of the failed: listed in a dataset's annotations, not on disk

    @property
    def clips_per_second(self) -> float:
        return self.clips / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        missing = f" ({self.not_on_disk} {NOT_ON_DISK})" if self.not_on_disk else ""
        return (f"extract: {self.done} done, {self.failed} failed{missing}, {self.skipped} skipped (already done) "
                f"of {self.videos} videos; {self.clips} clips in {self.seconds:.1f} s "
                f"({self.clips_per_second:.2f} clips/s); {self.bytes_written / 1e6:.1f} MB written "
                f"to {self.cache}" + (f"; {len(self.unreadable_folders)} {self._unreadable_kind()} could not be read, "
                                      f"their videos left out (see the warnings)" if self.unreadable_folders else ""))

    def _unreadable_kind(self) -> str:
        """What the unreadable inputs are: tar shards, or folders."""
        shards = all(item.split(": ", 1)[0].lower().endswith(".tar") for item in self.unreadable_folders)
        return "shard(s)" if shards else "folder(s)"


@dataclass
class Tower:
    """The frozen image tower an extraction runs, and what the cache records of it."""
    backbone: FrozenBackbone
    spec: BackboneSpec
    clip_spec: ClipSpec
    normalisation: tuple[tuple[float, ...], tuple[float, ...]]


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
        entry = self.entries[index]
        if entry.error:
            return VideoClips(index, None, 0, entry.error, 0)
        return read_video_clips(self.root / entry.path, entry.split, index, self.spec, self.timeout,
                                entry.segment)


def load_tower(config: ExtractConfig, device: torch.device) -> Tower:
    """The open_clip image tower `config` names, frozen, capturing the last `--blocks` blocks, on `device`.
    The CLIP model is built on the CPU and only its image tower moves: the text tower is left to be freed."""
    clip, spec = load_clip(config.model, config.pretrained, config.size, "cpu", seed=config.seed)
    size = config.size or spec.image_size
    check_sizes(config, size)
    mean = channel_values(config.mean, "mean") if config.mean is not None else spec.mean
    std = channel_values(config.std, "std") if config.std is not None else spec.std
    backbone = FrozenBackbone(clip.visual, config.blocks, mean, std, config.model).to(device)
    return Tower(backbone, spec, clip_spec_of(config, size), (mean, std))


def pending_videos(status: np.ndarray, shards: list[int], layout: CacheLayout) -> tuple[list[int], int]:
    """(the pending videos of `shards`, how many of the shards have any): a shard's done and failed
    videos are kept as they are (`ShardWriter`)."""
    size = layout.shard_size
    todo = [s for s in shards if (status[s * size:(s + 1) * size] == PENDING).any()]
    videos = [i for s in todo for i in range(s * size, min((s + 1) * size, layout.num_videos)) if status[i] == PENDING]
    return videos, len(todo)


def metrics_path(config: ExtractConfig) -> Path:
    """`<cache>.extract.jsonl` beside a local cache; for a URL cache, in the current folder."""
    name = Path(str(config.out).split("://")[-1]).name if is_url(config.out) else str(config.out)
    return Path(name + ".extract.jsonl")


def _backbone(tower: Tower, device: torch.device, clips: torch.Tensor):
    """The backbone's output for a batch of clips (float16 autocast on CUDA)."""
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()
    with autocast:
        return tower.backbone(clips.to(device, non_blocking=True))


def _encoded(tower: Tower, layout: CacheLayout, storage: dict, device: torch.device,
             clips: torch.Tensor) -> dict[str, np.ndarray]:
    """One batch of clips through the backbone, as the cache stores it."""
    return stored_features(_backbone(tower, device, clips), layout, storage)


def _calibration_outputs(config: ExtractConfig, dataset: VideoList, tower: Tower,
                         device: torch.device) -> tuple[dict[int, torch.Tensor], list[torch.Tensor], int]:
    """(tokens per cached block, prev maps per block, videos used): the first view of the first
    --calibration-videos videos of the dataset's order that decode, through the backbone."""
    outputs = []  # per video: (tokens per block, maps per block)
    for index, entry in enumerate(dataset.entries):
        if len(outputs) == config.calibration_videos:
            break
        item = None if entry.error else ClipSource(dataset, [index], tower.clip_spec, config.decode_timeout)[0]
        if item is None or item.clips is None:
            continue
        with torch.no_grad():
            output = _backbone(tower, device, item.clips[:1])
        outputs.append(([t.to(torch.float16).cpu() for t in output.block_outputs],
                        [m.float().cpu() for m in output.maps_prev]))
    if not outputs:
        return {}, [], 0
    blocks = tower.backbone.block_indices
    tokens = {b: torch.cat([video[0][i] for video in outputs]).float() for i, b in enumerate(blocks)}
    return tokens, [torch.cat([video[1][i] for video in outputs]) for i in range(len(blocks))], len(outputs)


def calibrate(config: ExtractConfig, dataset: VideoList, tower: Tower, layout: CacheLayout,
              device: torch.device) -> dict | None:
    """A new lossy cache's `storage.calibration`: each channel's centre and scale (`int8`, `int4`) and
    the chosen encoding's errors, from the first videos; logs one line when they are above the
    encoding's bounds, naming the encoding that keeps them."""
    enc = encoding(layout.encoding)
    if not enc.scaled or not layout.blocks:
        return None
    tokens, maps, videos = _calibration_outputs(config, dataset, tower, device)
    if not videos:
        raise DatasetError(f"--storage {enc.name} measures its codes on the first videos, and none of the "
                           f"dataset's could be decoded")
    record = calibration_record(tokens, videos)
    errors = {}
    for name in ENCODINGS:
        try:
            errors[name] = measure_errors(encoding(name), tokens, maps, {"calibration": record})
        except EvlCacheError:  # fp8 without torch's float8
            continue
    line = warning(enc.name, errors, videos)
    if line:
        log.warning("extract: %s", line)
    return {**(record if enc.calibrated else {"videos": videos}), "errors": errors[enc.name]}


def _log_shard(path: Path, process: Process, started: float, writer: ShardWriter, counts: Counts) -> None:
    elapsed = time.perf_counter() - started
    done, failed = writer.new_counts()
    with open(path, "a") as handle:
        handle.write(json.dumps({"event": "shard", "rank": process.rank, "shard": writer.shard, "done": done,
                                 "failed": failed, "clips_total": counts.clips, "seconds": round(elapsed, 3),
                                 "clips_per_s": round(counts.clips / max(elapsed, 1e-9), 3)}) + "\n")


def _extract_videos(config: ExtractConfig, dataset: VideoList, todo: list[int], tower: Tower, layout: CacheLayout,
                    storage: dict, process: Process, device: torch.device) -> Counts:
    """Decode `todo` in worker processes, run the backbone, write the shards; returns what was done.
    A user error in any process stops every process (none may wait forever for the others)."""
    loader = DataLoader(ClipSource(dataset, todo, tower.clip_spec, config.decode_timeout), batch_size=None,
                        shuffle=False, num_workers=config.workers, worker_init_fn=one_torch_thread,
                        prefetch_factor=4 if config.workers else None)
    started, counts, error = time.perf_counter(), Counts(), None
    progress = tqdm(total=len(todo), unit="video", desc="extract", dynamic_ncols=True, smoothing=0.1,
                    disable=not process.is_main)
    try:
        with (FeatureStore(config.out, mode="r+") if todo else contextlib.nullcontext()) as store:
            output = BatchedWriter(store, layout, partial(_encoded, tower, layout, storage, device), config.batch_size,
                                   partial(_log_shard, metrics_path(config), process, started))
            counts = output.counts
            for item in loader:
                output.add(item)
                if item.clips is None:
                    log.warning("failed: %s: %s", dataset.entries[item.index].path, item.error)
                progress.update(1)
                progress.set_postfix(clips_per_s=f"{counts.clips / max(time.perf_counter() - started, 1e-9):.2f}",
                                     failed=counts.failed, refresh=False)
            output.close()
    except EvlCacheError as raised:
        error = raised
    finally:
        progress.close()
    raise_together(process, error)
    return counts


def _summarise(config: ExtractConfig, process: Process, dataset: VideoList, layout: CacheLayout, counts: Counts,
               todo: list[int], seconds: float, bytes_before: int) -> ExtractSummary:
    """The whole job's summary (summed over processes); the main process also logs it to the JSONL."""
    missing = sum(1 for i in todo if dataset.entries[i].error == NOT_ON_DISK)
    done, failed, clips, decoded, todo_count, missing = (int(v) for v in sum_across(
        process, [counts.done, counts.failed, counts.clips, counts.decoded_frames, len(todo), missing]))
    out = location(config.out)
    summary = ExtractSummary(out, layout.num_videos, done, failed, layout.num_videos - todo_count, clips, seconds,
                             max(disk_usage(out) - bytes_before, 0), decoded, list(dataset.unreadable), missing)
    if process.is_main:
        record = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(summary).items()}
        with open(metrics_path(config), "a") as handle:
            handle.write(json.dumps({"event": "summary", **record, "config": to_dict(config),
                                     "versions": library_versions()}) + "\n")
        log.info(summary.line())
    return summary


def extract(config: ExtractConfig) -> ExtractSummary | CachePlan:
    """Extract (or resume extracting) the cache that `config` describes; with `dry_run`, its plan."""
    validate(config)
    if config.dry_run:
        return plan(config)
    check_output(config)
    dataset = dataset_of(config)
    process = init_process(resolve_device(config.device))
    device = bind_device(process.device(resolve_device(config.device)))
    tower = load_tower(config, device)
    spec = tower.spec
    layout = cache_layout(config, dataset, spec.width, spec.layers, spec.patch_grid, spec.embed_dim, spec.prefix_tokens)
    identity = cache_identity(config, spec, tower.clip_spec, layout, dataset, tower.normalisation)
    status, shards, parts, storage = open_together(process, config, identity, layout, dataset,
                                                   partial(calibrate, config, dataset, tower, layout, device))
    layout = dataclasses.replace(layout, encoding=stored_encoding(storage).key)  # an older cache keeps its codes
    todo, todo_shards = pending_videos(status, shards, layout)
    log.info("extract: %d videos (%s), %d classes; process %d of %d has %d shards to do (%d videos); backbone "
             "%s (%s), blocks %s, device %s", layout.num_videos, dataset.count_by_split(), len(dataset.class_names),
             process.rank, process.world_size, todo_shards, len(todo), spec.model, spec.pretrained,
             list(layout.blocks), device)
    if parts and parts != process.world_size and process.is_main:
        log.info("extract: the cache is %d HDF5 file(s), each written by one process: with %d process(es), "
                 "process r writes the files p with p %% %d == r", parts, process.world_size, process.world_size)
    started, bytes_before = time.perf_counter(), disk_usage(location(config.out))
    with deterministic_kernels(device):  # a resumed extraction writes the bits an uninterrupted one would
        counts = _extract_videos(config, dataset, todo, tower, layout, storage, process, device)
    summary = _summarise(config, process, dataset, layout, counts, todo, time.perf_counter() - started, bytes_before)
    if process.is_main and summary.done == 0 and summary.skipped == 0:
        raise DatasetError(f"no video could be extracted ({summary.failed} failed); see the reasons above "
                           f"or with `evl-cache info {config.out} --failed`")
    return summary
