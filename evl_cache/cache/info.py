"""What a cache holds, for `evl-cache info`: backbone, blocks, sampling, splits, statuses, classes, size."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import option
from ..errors import EvlCacheError
from ..towers.backbone import BackboneSpec
from ..video.datasets import NOT_ON_DISK
from .store import FAILED, STATUS_NAMES, FeatureStore, cache_storage


@dataclass
class InfoConfig:
    """Options of `evl-cache info`."""
    cache: Path = option(None, "the cache: a *.zarr or *.h5 path, or an fsspec URL", argument=True)
    failed: bool = option(False, "list the failed videos with their reasons")
    notes: bool = option(False, "list the videos whose decoding needed care (another stream, timestamps not "
                                "used, an undecodable head skipped), with what was done")


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
            "storage": cache_storage(attrs),
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
    return info


def _storage_line(storage: dict) -> str:
    encoding = storage["encoding"]
    kind = ("float16 values" if encoding == "fp16" else
            f"{encoding} codes with a float32 scale per token (tokens) and per query patch (maps); embed float16")
    return f"{encoding} ({kind}), compression {storage['compress']}"


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
    return "\n".join(lines)
