"""The options of `extract` (and `plan`), and what follows from them before a frame is decoded: the
checks, how videos become clips, the cache's shapes, and the identity a resumed cache must match."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..config import option, shared
from ..errors import EvlCacheError
from ..towers.backbone import BackboneSpec
from ..video.clips import ClipSpec
from ..video.datasets import DATASETS, read_dataset
from ..video.find import VideoList, find_videos, read_classes
from ..video.pixels import SPATIAL_VIEWS
from ..video.sampling import SAMPLING_MODES
from ..video.tars import is_tar_input, read_shards
from .encodings import ENCODINGS, encoding
from .store import CacheLayout, part_files_beside, store_kind


@dataclass
class ExtractConfig:
    """Options of `evl-cache extract` and `evl-cache plan`."""
    out: Path = option(None, "cache to write: *.zarr (Zarr v3) or *.h5 (HDF5)")
    videos: Path | None = option(None, "folder of videos: <class>/<video> or <split>/<class>/<video>; or WebDataset "
                                       "tar shards: 'DIR/{000000..000127}.tar', one .tar, or a folder of .tar files")
    train_list: Path | None = option(None, "training list: 'path label' lines, or a CSV with a header")
    val_list: Path | None = option(None, "validation list, same formats as --train-list")
    list: Path | None = option(None, "one list for the whole dataset, a CSV's split column giving each row's split "
                                     "(as --train-list)")
    data_root: Path | None = option(None, "folder the list paths are relative to [default: the list's folder]")
    dataset: str | None = option(None, "an official dataset read as distributed under --root: its annotation files "
                                       "and videos", choices=DATASETS)
    root: Path | None = option(None, "the folder of --dataset, laid out as distributed (see data/README.md)")
    fold: int | None = option(None, "--dataset ucf101 or hmdb51: which official split, 1, 2 or 3 [default: 1]")
    classes: Path | None = option(None, "class names: one per line, a JSON list or mapping name -> index, or an "
                                        "id,name CSV (with --dataset: replaces the dataset's class order)")
    label_field: str | None = option(None, "tar shards: the field of each KEY.json holding the label, a class index "
                                           "or name [default: the KEY.cls member]")
    model: str = option("ViT-B-16", "open_clip model name, or a path to an open_clip model-config JSON")
    pretrained: str = option("openai", "open_clip pretrained tag, a local weights file, or none (random); with "
                                       "'+outliers' added (none+outliers), those weights edited to have a trained "
                                       "CLIP's outlier channels and attention sinks (a model of them, for tests)")
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
    stride: int = shared("stride")
    sampling: str = option("dense", "frame sampling: dense (T x stride), segment (TSN), or vifi (ViFi-CLIP's "
                                    "test protocol)", choices=SAMPLING_MODES)
    eval_views: int = shared("eval_views")
    train_views: int = option(1, "cached views per training video (view 0 plain, others augmented)")
    flip: bool = option(True, "horizontal flip in augmented training views (off for Something-Something)")
    randaugment: bool = option(True, "RandAugment rand-m7-n4-mstd0.5-inc1 in augmented training views")
    seed: int = option(0, "seed of every random choice (augmentation, random weights)")
    storage: str = option("fp16", "how feature values are stored: fp16 (as the backbone gives them), or one code "
                                  "per value and a scale per token (tokens) or query patch (maps): int8 or fp8 "
                                  "(about 2x fewer bytes), int4 (about 4x); int8 and int4 calibrate each channel "
                                  "on the first videos", choices=tuple(ENCODINGS))
    calibration_videos: int = option(8, "lossy --storage: the first videos (in the dataset's order) whose features "
                                        "calibrate the codes and measure their error (a resume keeps the cache's)")
    compress: str = option("none", "lossless zstd compression of the stored values inside each shard (Zarr)",
                           choices=("none", "zstd"))
    shard_size: int = option(8, "videos per shard (the unit of writing and resuming)")
    batch_size: int = option(8, "clips per backbone batch")
    workers: int = option(2, "DataLoader worker processes that decode videos")
    decode_timeout: float = shared("decode_timeout")
    device: str = shared("device")
    overwrite: bool = option(False, "replace an existing evl-cache cache at --out (nothing else is ever removed)")
    dry_run: bool = option(False, "print the plan (what `evl-cache plan` prints) and extract nothing")
    probe_mb: float = option(256.0, "plan: size of the read probe written in the folder of --out (0: no probe)")


def validate(config: ExtractConfig) -> None:
    """Refuse options that cannot work, before anything is read or written."""
    if config.out is None:
        raise EvlCacheError("--out is required (a *.zarr or *.h5 path)")
    store_kind(config.out)  # refuses any other suffix
    for name in ("frames", "stride", "eval_views", "train_views", "shard_size", "batch_size", "calibration_videos"):
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
    if config.probe_mb < 0:
        raise EvlCacheError("--probe-mb must be 0 (no probe) or more")
    if config.list is not None and config.train_list is not None:
        raise EvlCacheError("--list is the same as --train-list: give one of them")
    _check_inputs(config)
    encoding(config.storage)  # refuses fp8 where torch has no float8
    if config.compress != "none" and store_kind(config.out) == "h5":
        raise EvlCacheError("--compress zstd is for Zarr caches (HDF5 would need a zstd filter plugin); "
                            "use a .zarr path or --compress none", config.out)
    if config.spatial_views not in SPATIAL_VIEWS:
        raise EvlCacheError(f"--spatial-views must be one of {', '.join(map(str, SPATIAL_VIEWS))}")
    for name in ("mean", "std"):
        if getattr(config, name) is not None:
            channel_values(getattr(config, name), name)


def _check_inputs(config: ExtractConfig) -> None:
    """One input form at a time: --dataset with --root, or the videos, lists or shards of the others."""
    others = [f"--{name.replace('_', '-')}" for name in ("videos", "train_list", "val_list", "list", "data_root")
              if getattr(config, name) is not None]
    if config.dataset is not None and others:
        raise EvlCacheError(f"--dataset reads its own files under --root: leave out {', '.join(others)}")
    if (config.dataset is None) != (config.root is None):
        raise EvlCacheError("--dataset and --root go together: --dataset NAME --root FOLDER")
    if config.fold is not None and config.dataset not in ("ucf101", "hmdb51"):
        raise EvlCacheError("--fold picks the official split of --dataset ucf101 or hmdb51")


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


def check_sizes(config: ExtractConfig, size: int) -> None:
    """Options that depend on the input size, once it is known."""
    resize = config.resize or size
    if resize < size:
        raise EvlCacheError(f"--resize {resize} is below the input size {size}: the crop would not fit")
    if config.spatial_views == 3 and resize != size:
        raise EvlCacheError(f"--spatial-views 3 crops span the short side: --resize must equal the input size "
                            f"{size}, not {resize}")


def output_paths(config: ExtractConfig) -> list[Path]:
    """The local files an extraction writes (the cache, its HDF5 part files): never videos or classes."""
    if config.out is None or "://" in str(config.out):
        return []
    out = Path(config.out)
    return [out] + part_files_beside(out)


def dataset_of(config: ExtractConfig) -> VideoList:
    """The videos `config` names (an official dataset, a folder, tar shards, or list files), without the
    cache it writes."""
    _check_inputs(config)
    if config.dataset is not None:
        return read_dataset(config.dataset, config.root, config.fold,
                            read_classes(config.classes) if config.classes else None)
    if config.videos is not None and is_tar_input(config.videos):
        if config.train_list or config.val_list or config.list:
            raise EvlCacheError("give either --videos or --train-list/--val-list/--list, not both")
        return read_shards(config.videos, config.label_field, read_classes(config.classes) if config.classes else None)
    if config.label_field is not None:
        raise EvlCacheError("--label-field is for tar shards (--videos 'DIR/{000000..000127}.tar')")
    return find_videos(config.videos, config.train_list or config.list, config.val_list, config.data_root,
                       config.classes, exclude=output_paths(config))


def clip_spec_of(config: ExtractConfig, size: int) -> ClipSpec:
    """How `config` turns videos into clips of `size` pixels."""
    return ClipSpec(config.sampling, config.frames, config.stride, config.eval_views, config.train_views, size,
                    config.seed, config.flip, config.randaugment, config.resize, config.spatial_views)


def cache_layout(config: ExtractConfig, dataset: VideoList, width: int, layers: int, grid: tuple[int, int],
                 embed_dim: int, prefix_tokens: int = 1) -> CacheLayout:
    """The shapes a cache of `dataset` will have: L = prefix_tokens + patches tokens per frame; views per
    video are the most any split needs."""
    spec = clip_spec_of(config, 1)  # views do not depend on the size
    views = max(spec.views(split) for split in {e.split for e in dataset.entries})
    return CacheLayout(num_videos=len(dataset.entries), views=views, frames=config.frames,
                       tokens=prefix_tokens + grid[0] * grid[1], width=width, grid=tuple(grid), embed_dim=embed_dim,
                       blocks=tuple(range(layers - config.blocks, layers)), shard_size=config.shard_size,
                       encoding=config.storage, compress=config.compress)


def dataset_fingerprint(dataset: VideoList) -> str:
    """sha256 of the video table (segments included) and class names: two runs over different data never
    mix. An entry without a segment hashes as it did before segments existed, so older caches resume."""
    digest = hashlib.sha256(json.dumps(dataset.class_names).encode())
    for entry in dataset.entries:
        segment = "" if entry.segment is None else f"\t{entry.segment[0]!r}\t{entry.segment[1]!r}"
        digest.update(f"{entry.path}\t{entry.label}\t{entry.split}\t{entry.error}{segment}\n".encode())
    return digest.hexdigest()


def cache_identity(config: ExtractConfig, spec: BackboneSpec, clip_spec: ClipSpec, layout: CacheLayout,
                   dataset: VideoList, normalisation: tuple[tuple[float, ...], tuple[float, ...]]) -> dict:
    """Everything that decides the cache's contents; a resume must match it exactly."""
    identity = {
        "backbone": spec.to_dict(),
        "blocks": list(layout.blocks),
        "sampling": {**clip_spec.sampling_record(), "views": layout.views},
        "preprocessing": clip_spec.preprocessing_record(*normalisation),
        "stored": ["tokens", "maps", "embed"] if config.blocks else ["embed"],
        "dtype": "float16",  # of the values as read (`storage` says how they are stored)
        "storage": {"encoding": config.storage, "compress": config.compress},
        "class_names": list(dataset.class_names),
        **({"raw_class_names": list(dataset.raw_class_names)} if dataset.raw_class_names else {}),
        "dataset": {"root": str(dataset.root.resolve()), "fingerprint": dataset_fingerprint(dataset),
                    "videos": len(dataset.entries), "splits": dataset.count_by_split()},
        "shard_size": config.shard_size,
    }
    return json.loads(json.dumps(identity))  # as stored: lists, not tuples
