"""What a cache holds, for `evl-cache info`: backbone, blocks, sampling, splits, statuses, classes, size;
with `--stats`, its tower's feature statistics per cached block (outlier channels, high-norm tokens), so
that a user sees them before choosing a lossy `--storage`."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import option
from ..errors import EvlCacheError
from ..towers.backbone import BackboneSpec
from ..towers.statistics import HIGH_NORM_RATIO, OUTLIER_RATIO, tower_statistics
from ..video.datasets import NOT_ON_DISK
from .calibration import block_channels
from .encodings import decode, stored_encoding
from .store import DONE, FAILED, STATUS_NAMES, FeatureStore, cache_storage

STATS_VIDEOS = 8  # videos (the first done ones, their first view) that `--stats` reads


@dataclass
class InfoConfig:
    """Options of `evl-cache info`."""
    cache: Path = option(None, "the cache: a *.zarr or *.h5 path, or an fsspec URL", argument=True)
    failed: bool = option(False, "list the failed videos with their reasons")
    notes: bool = option(False, "list the videos whose decoding needed care (another stream, timestamps not "
                                "used, an undecodable head skipped), with what was done")
    stats: bool = option(False, f"per cached block, the spread of channel magnitudes (max over median RMS) and "
                                f"the share of high-norm tokens, from the first {STATS_VIDEOS} videos' tokens")


def info(config: InfoConfig) -> dict:
    """A JSON-ready description of the cache (with the failed videos' reasons and the decoding notes if
    asked)."""
    path, failed = config.cache, config.failed
    if path is None:
        raise EvlCacheError("a cache path is required")
    with FeatureStore(path) as store:
        attrs = store.check_version()
        status = store.column("status")
        split = store.column("split")
        counts = Counter(STATUS_NAMES[int(s)] for s in status)
        by_split: dict[str, dict[str, int]] = {}
        for s, st in zip(split, status):
            by_split.setdefault(str(s), Counter())[STATUS_NAMES[int(st)]] += 1
        notes = store.column("note") if store.has("videos/note") else np.full(len(status), "", dtype=object)
        errors = store.column("error")
        info = {
            "path": str(path),
            "format": store.kind,
            "part_files": [file.name for file in store.part_files],  # a joined HDF5 cache's, beside it
            "format_version": attrs["format_version"],
            "backbone": attrs["backbone"],
            "blocks": attrs["blocks"],
            "sampling": attrs["sampling"],
            "preprocessing": attrs["preprocessing"],
            "dtype": attrs["dtype"],
            "storage": _storage_summary(cache_storage(attrs)),
            "videos": int(len(status)),
            "status": {name: counts.get(name, 0) for name in STATUS_NAMES.values()},
            "not_on_disk": int(sum(1 for s, e in zip(status, errors) if s == FAILED and e == NOT_ON_DISK)),
            "splits": {s: dict(c) for s, c in sorted(by_split.items())},
            "noted": int(sum(1 for note in notes if note)),
            "classes": attrs["class_names"],
            "bytes_on_disk": store.size_on_disk(),
            "created": attrs.get("created"),
            "versions": attrs.get("versions"),
        }
        if failed:
            paths = store.column("path")
            info["failed"] = [{"path": str(p), "error": str(e)}
                              for p, e, s in zip(paths, errors, status) if s == 2]
        if config.notes:
            paths = store.column("path")
            info["notes"] = [{"path": str(p), "note": str(n)} for p, n in zip(paths, notes) if n]
        if config.stats:
            info["stats"] = block_statistics(store, attrs, status)
    return info


def _storage_summary(storage: dict) -> dict:
    """The storage record without the calibration's per-channel numbers (which blocks, how many videos,
    the errors measured on them)."""
    calibration = storage.get("calibration")
    if calibration is None:
        return storage
    summary = {k: v for k, v in calibration.items() if k != "blocks"}
    return {**storage, "calibration": {**summary, **({"blocks": sorted(map(int, calibration["blocks"]))}
                                                      if "blocks" in calibration else {})}}


def block_statistics(store: FeatureStore, attrs: dict, status: np.ndarray) -> dict[str, dict]:
    """Block -> `tower_statistics` of its tokens (decoded, float32) in the first done videos' first views."""
    storage = cache_storage(attrs)
    enc, width = stored_encoding(storage), attrs["backbone"]["width"]
    videos = np.flatnonzero(status == DONE)[:STATS_VIDEOS]
    stats = {}
    for block in attrs["blocks"] if len(videos) and "tokens" in attrs.get("stored", ["tokens"]) else []:
        def rows(name: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([np.asarray(store.array(name)[int(i), 0]) for i in videos]))

        name = f"tokens/block_{block}"
        scale = rows(f"scales/{name}") if enc.scaled else None
        tokens = decode(rows(name), scale, enc, True, width, torch.float32, block_channels(storage, block))
        stats[str(block)] = {**tower_statistics(tokens), "videos": len(videos)}
    return stats


def _storage_line(storage: dict) -> str:
    enc = stored_encoding(storage)
    if not enc.scaled:
        kind = "float16 values"
    elif enc.calibrated:
        kind = (f"tokens: {enc.name} codes per token after a per-channel calibration; maps: log-domain codes "
                f"per query patch; embed float16")
    else:
        kind = f"{enc.name} codes with a float32 scale per token (tokens) and per query patch (maps); embed float16"
    line = f"{storage['encoding']} ({kind}), compression {storage['compress']}"
    errors = storage.get("calibration", {}).get("errors")
    if errors:
        line += (f"\n            measured on the first {storage['calibration']['videos']} videos: tokens' median "
                 f"per-channel error {errors['tokens_median']:.2g} (p99 {errors['tokens_p99']:.2g}), maps' mean "
                 f"L1 per row {errors['maps_l1']:.2g}")
    return line


def format_info(info: dict) -> str:
    """The plain-text form of `info`."""
    backbone = info["backbone"]
    tower = BackboneSpec.from_dict(backbone)
    sampling, preprocessing = info["sampling"], info["preprocessing"]
    crops = 3 if preprocessing.get("crop") == "three" else 1
    eval_views = f"{sampling['eval_views']}" + (f" x {crops} spatial" if crops > 1 else "")
    parts = f" joined from {len(info['part_files'])} part files" if info["part_files"] else ""

    def channels(values: list[float]) -> str:
        return ",".join(f"{v:.4g}" for v in values)
    lines = [
        f"cache:      {info['path']} ({info['format']}{parts}, format v{info['format_version']})",
        f"storage:    {_storage_line(info['storage'])}",
        f"backbone:   {backbone['model']} pretrained={backbone['pretrained']} sha256={backbone['weights_sha256'][:16]}",
        f"            {tower.family} ViT, {tower.prefix_tokens} prefix token(s) and "
        f"{backbone['patch_grid'][0]}x{backbone['patch_grid'][1]} patches per frame, {backbone['image_size']} px, "
        f"width {backbone['width']}, {backbone['heads']} heads, {backbone['layers']} blocks, embed {backbone['embed_dim']}",
        f"blocks:     {info['blocks']}",
        f"sampling:   {sampling['mode']} {sampling['frames']} frames"
        f"{' x stride ' + str(sampling['stride']) if sampling['mode'] == 'dense' else ''}, "
        f"{eval_views} eval views, {sampling['train_views']} train views",
        f"pixels:     short side {preprocessing.get('short_side', preprocessing['size'])}, "
        f"{'three crops' if crops > 1 else 'centre crop'} of {preprocessing['size']}, "
        f"mean {channels(preprocessing['mean'])}, std {channels(preprocessing['std'])}",
        f"videos:     {info['videos']} ({', '.join(f'{k} {v}' for k, v in info['status'].items())})",
    ]
    for split, counts in info["splits"].items():
        lines.append(f"  {split:<9} {', '.join(f'{k} {v}' for k, v in sorted(counts.items()))}")
    if info["not_on_disk"]:
        lines.append(f"missing:    {info['not_on_disk']} failed videos are {NOT_ON_DISK}")
    classes = info["classes"]
    shown = ", ".join(classes[:10]) + (f", ... ({len(classes)} in all)" if len(classes) > 10 else "")
    lines.append(f"classes:    {len(classes)}: {shown}")
    lines.append(f"size:       {info['bytes_on_disk'] / 1e6:.1f} MB on disk")
    if info["noted"]:
        lines.append(f"notes:      {info['noted']} videos needed care in decoding (--notes lists them)")
    for item in info.get("failed", []):
        lines.append(f"failed:     {item['path']}: {item['error']}")
    for item in info.get("notes", []):
        lines.append(f"note:       {item['path']}: {item['note']}")
    for block, stats in info.get("stats", {}).items():
        outliers = stats["outlier_channels"]
        lines.append(f"stats:      block {block}: channel spread {stats['channel_spread']:.0f}x (max over median "
                     f"RMS); {len(outliers)} outlier channel(s) above {OUTLIER_RATIO:.0f}x"
                     + (f" ({', '.join(map(str, outliers[:8]))}{', ...' if len(outliers) > 8 else ''})" if outliers
                        else "") + f"; {100 * stats['high_norm_share']:.1f} % of tokens above {HIGH_NORM_RATIO:.0f}x "
                     f"the median norm ({stats['tokens']} tokens of {stats['videos']} videos)")
    if "stats" in info and not info["stats"]:
        lines.append("stats:      no cached tokens to measure (no done video, or --blocks 0)")
    return "\n".join(lines)
