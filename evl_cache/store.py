"""The feature cache on disk: one Zarr v3 group (`*.zarr`) or one HDF5 file (`*.h5`), same layout.

Layout (N videos, V views, T frames, L = 1 + P tokens, C width, E embedding width):
- `videos/{path,label,split,frames,views,status,error,checksum}`: one row per video;
- `tokens/block_{b}`: [N, V, T, L, C] float16, one chunk per (video, view), one array per block;
- `maps/block_{b}/prev`, `maps/block_{b}/next`: [N, V, T-1, P, P] float16;
- `embed`: [N, V, T, E] float16.
The root attribute `evl_cache` describes everything else (backbone, sampling, classes, versions).

Rules from measurement (design.md): arrays are created at full size up front; a shard of videos is
written whole, once; per-video rows are chunked like the shards; status is written after the data.
"""
from __future__ import annotations

import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import CacheError

FORMAT_VERSION = 2  # 2: storage encodings and compression (`storage`); a version-1 cache is float16, uncompressed
READABLE_VERSIONS = (1, 2)
ATTR = "evl_cache"
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
VIDEO_COLUMNS = ("path", "label", "split", "frames", "views", "status", "error", "checksum")


@dataclass(frozen=True)
class CacheLayout:
    """The shapes of a cache's arrays, and how their values are stored (`encodings`)."""
    num_videos: int
    views: int
    frames: int
    tokens: int
    width: int
    grid: tuple[int, int]
    embed_dim: int
    blocks: tuple[int, ...]
    shard_size: int
    encoding: str = "fp16"
    compress: str = "none"

    def feature_arrays(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]]:
        """Name -> (shape, chunk shape, stored dtype) of every feature array, in the checksum's order:
        per block its tokens, then its prev and next maps (each followed by its scales when the
        encoding has them), then `embed` (always float16)."""
        from .encodings import encoding

        enc = encoding(self.encoding)
        n, v, t = self.num_videos, self.views, self.frames
        patches = self.grid[0] * self.grid[1]

        def add(name: str, rows: tuple[int, ...], dim: int, signed: bool) -> None:
            shape = (n, v) + rows + (enc.stored_dim(dim),)
            arrays[name] = (shape, (1, 1) + shape[2:], enc.stored_dtype(signed))
            if enc.scaled:
                arrays[f"scales/{name}"] = ((n, v) + rows, (1, 1) + rows, np.dtype(np.float32))

        arrays: dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]] = {}
        for b in self.blocks:
            add(f"tokens/block_{b}", (t, self.tokens), self.width, signed=True)
            for direction in ("prev", "next"):
                add(f"maps/block_{b}/{direction}", (t - 1, patches), patches, signed=False)
        arrays["embed"] = ((n, v, t, self.embed_dim), (1, 1, t, self.embed_dim), np.dtype(np.float16))
        return arrays

    def bytes_per_view(self) -> int:
        """Bytes of one (video, view) in every feature array, uncompressed."""
        return sum(dtype.itemsize * int(np.prod(chunk)) for _, chunk, dtype in self.feature_arrays().values())


def _column_dtype(name: str) -> Any:
    return {"path": str, "split": str, "error": str, "label": np.int32, "frames": np.int32,
            "views": np.int16, "status": np.uint8, "checksum": np.uint32}[name]


def video_checksum(feature_rows: Iterable[np.ndarray], checksum: int = 0) -> int:
    """crc32 over one video's stored feature rows (only the views it has; little-endian bytes of their
    stored dtype), taken in the order of `CacheLayout.feature_arrays`: what `videos/checksum` records at
    write time and `verify` recomputes. `checksum` continues a running one (a reader that takes one
    array at a time)."""
    for values in feature_rows:
        values = np.asarray(values)
        checksum = zlib.crc32(np.ascontiguousarray(values, dtype=values.dtype.newbyteorder("<")), checksum)
    return checksum


class FeatureStore:
    """A cache opened for reading or writing; the same interface over Zarr and HDF5."""

    def __init__(self, path: str | Path, mode: str = "r"):
        self.path = location(path)
        self.kind = store_kind(self.path)
        self.mode = mode
        if mode == "r" and not store_exists(self.path):
            raise CacheError("cache not found", self.path)
        try:
            if self.kind == "zarr":
                import zarr
                self._root = zarr.open_group(str(self.path), mode="r" if mode == "r" else "a")
            else:
                import h5py
                self._root = h5py.File(self.path, "r" if mode == "r" else "a")
        except (OSError, ValueError) as error:
            raise CacheError(f"cannot open cache: {error}", self.path) from None
        self._arrays: dict[str, Any] = {}
        self._direct: dict[str, Any] = {}  # name -> ShardedArrayReader, or None to read through zarr

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, layout: CacheLayout, attrs: dict,
               columns: dict[str, np.ndarray]) -> "FeatureStore":
        """Create a cache with every array at full size, the video table and the metadata."""
        path = location(path)
        if store_exists(path):
            raise CacheError("cache already exists", path)
        if isinstance(path, Path) and not path.parent.exists():
            raise CacheError("output folder does not exist", path.parent)
        if isinstance(path, Path) and not os.access(path.parent, os.W_OK):
            raise CacheError("output folder is not writable", path.parent)
        building = _building_path(path)
        store = cls(building, mode="w")
        rows = (layout.shard_size,)
        for name in VIDEO_COLUMNS:
            store._create(f"videos/{name}", (layout.num_videos,), _column_dtype(name), rows, None)
        for name, (shape, chunks, dtype) in layout.feature_arrays().items():
            shards = (layout.shard_size,) + shape[1:]
            store._create(name, shape, dtype, chunks, shards, compress=layout.compress)
        for name, values in columns.items():
            store.write_rows(name, 0, values)
        store.set_attrs({**attrs, "format_version": FORMAT_VERSION})
        if building == path:
            return store
        store.close()
        os.replace(building, path)  # whole or not at all: a run killed while creating leaves nothing at `path`
        return cls(path, mode="r+")

    def _create(self, name: str, shape: tuple[int, ...], dtype: Any, chunks: tuple[int, ...],
                shards: tuple[int, ...] | None, compress: str = "none") -> None:
        chunks = tuple(min(c, max(s, 1)) for c, s in zip(chunks, shape))
        if self.kind == "zarr":
            from zarr.codecs import ZstdCodec
            if shards is not None:
                shards = tuple(min(c, max(s, 1)) for c, s in zip(shards, shape))
            self._root.create_array(name, shape=shape, dtype=dtype, chunks=chunks, shards=shards,
                                    compressors=[ZstdCodec(level=3)] if compress == "zstd" else None,
                                    fill_value=_fill(dtype))
        else:
            import h5py
            h5_dtype = h5py.string_dtype() if dtype is str else dtype
            self._root.create_dataset(name, shape=shape, dtype=h5_dtype, chunks=chunks if shape[0] else None,
                                      fillvalue=None if dtype is str else _fill(dtype))

    # -- metadata -------------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """The cache's description (the root attribute `evl_cache`)."""
        if self.kind == "zarr":
            value = self._root.attrs.get(ATTR)
        else:
            import json
            raw = self._root.attrs.get(ATTR)
            value = json.loads(raw) if raw is not None else None
        if value is None:
            raise CacheError("not an evl-cache store (no 'evl_cache' attribute)", self.path)
        return dict(value)

    def set_attrs(self, attrs: dict) -> None:
        if self.kind == "zarr":
            self._root.attrs[ATTR] = attrs
        else:
            import json
            self._root.attrs[ATTR] = json.dumps(attrs)

    def check_version(self) -> dict:
        """The attributes, after refusing a format version this code does not know."""
        attrs = self.attrs
        version = attrs.get("format_version")
        if version not in READABLE_VERSIONS:
            raise CacheError(f"cache format version {version} is not supported (this evl-cache reads "
                             f"versions {', '.join(map(str, READABLE_VERSIONS))}); upgrade evl-cache or re-extract",
                             self.path)
        return attrs

    # -- arrays ---------------------------------------------------------------------------------
    def array(self, name: str) -> Any:
        """The named array (a zarr Array or h5py Dataset; both index like numpy)."""
        if name not in self._arrays:
            try:
                self._arrays[name] = self._root[name]
            except KeyError:
                raise CacheError(f"cache has no array {name!r}", self.path) from None
        return self._arrays[name]

    def has(self, name: str) -> bool:
        try:
            self.array(name)
            return True
        except CacheError:
            return False

    def column(self, name: str, rows: slice = slice(None)) -> np.ndarray:
        """A per-video column (all of it, or `rows`), strings decoded."""
        values = self.array(f"videos/{name}")
        if _column_dtype(name) is str:
            raw = values.asstr()[rows] if self.kind == "h5" else values[rows]
            return np.array([str(v) for v in raw], dtype=object)
        return np.asarray(values[rows])

    def read_view(self, name: str, video: int, view: int, rows: slice, out: np.ndarray) -> None:
        """Copy rows `rows` (a slice of the frame axis) of one cached (video, view) of feature array `name`
        into `out`: the loader's read. A local Zarr cache is read straight from its shard files
        (`zarr_shards`), an HDF5 one with `read_direct`; a remote one through zarr."""
        if name not in self._direct:
            self.array(name)  # a missing array is refused here, by name
            self._direct[name] = None
            if self.kind == "zarr" and isinstance(self.path, Path):
                from .zarr_shards import sharded_reader
                self._direct[name] = sharded_reader(self.path / name)
        direct = self._direct[name]
        if direct is not None:
            direct.read(video, view, rows, out)
        elif self.kind == "h5" and out.flags.c_contiguous:
            self.array(name).read_direct(out, np.s_[video, view, rows])
        else:
            out[...] = self.array(name)[video, view, rows]

    def write_rows(self, name: str, start: int, values: Iterable) -> None:
        """Write per-video rows start..start+len(values) of column `name`."""
        values = np.asarray(list(values) if not isinstance(values, np.ndarray) else values)
        if _column_dtype(name) is str:
            values = values.astype(object if self.kind == "h5" else str)
        self.array(f"videos/{name}")[start:start + len(values)] = values

    def write_block(self, name: str, start: int, values: np.ndarray) -> None:
        """Write rows start..start+len(values) of a feature array (a whole shard, in one call)."""
        self.array(name)[start:start + len(values)] = values

    def flush(self) -> None:
        if self.kind == "h5":
            self._root.flush()

    def close(self) -> None:
        if self.kind == "h5" and self._root:
            self._root.close()

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def size_on_disk(self) -> int:
        return disk_usage(self.path)

    @property
    def num_videos(self) -> int:
        return int(self.array("videos/status").shape[0])


def _building_path(path: str | Path) -> str | Path:
    """Where a local cache is made before it is renamed to `path` (an object store has no rename)."""
    if not isinstance(path, Path):
        return path
    building = path.with_name(f".{path.name}.creating{path.suffix}")
    remove_store(building)  # left by a run killed while creating
    return building


def remove_partial_files(path: str | Path) -> int:
    """Delete the `*.partial` files a killed writer left in a local Zarr cache (zarr writes each file
    to a `*.partial` file first, then renames it); returns how many there were."""
    if "://" in str(path) or not Path(path).is_dir():
        return 0
    stray = list(Path(path).rglob("*.partial"))
    for file in stray:
        file.unlink(missing_ok=True)
    return len(stray)


def _fill(dtype: Any) -> Any:
    if dtype is str:
        return ""
    if dtype == np.int32:
        return -1
    return 0


def is_url(path: str | Path) -> bool:
    """An fsspec URL (s3://, memory://, ...) rather than a local path (file:// URLs are local paths)."""
    return "://" in str(path) and not str(path).startswith("file://")


def location(path: str | Path) -> str | Path:
    """A cache's location: a Path for local files (file:// URLs included), a URL string otherwise."""
    if str(path).startswith("file://"):
        return Path(str(path)[len("file://"):])
    return str(path) if is_url(path) else Path(path)


def _filesystem(url: str):
    import fsspec
    return fsspec.core.url_to_fs(url)


def store_exists(path: str | Path) -> bool:
    if is_url(path):
        fs, inner = _filesystem(str(path))
        return fs.exists(inner)
    return Path(path).exists()


def store_kind(path: str | Path) -> str:
    """'zarr' for *.zarr (a local path or an fsspec URL), 'h5' for local *.h5/*.hdf5; else refused."""
    suffix = Path(str(path).split("://")[-1]).suffix.lower()
    if suffix == ".zarr":
        return "zarr"
    if suffix in (".h5", ".hdf5"):
        if is_url(path):
            raise CacheError("an HDF5 cache must be a local file; use a .zarr cache for fsspec URLs", path)
        return "h5"
    raise CacheError("cache path must end in .zarr (Zarr v3) or .h5 (HDF5)", path)


def disk_usage(path: str | Path) -> int:
    """Bytes a file or folder takes on disk (allocated blocks, so sparse files count right);
    for an fsspec URL, the sum of its objects' sizes."""
    if is_url(path):
        fs, inner = _filesystem(str(path))
        return int(fs.du(inner, total=True)) if fs.exists(inner) else 0
    path = Path(path)
    if path.is_file():
        return path.stat().st_blocks * 512
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            total += (Path(dirpath) / name).stat().st_blocks * 512
    return total


def remove_store(path: str | Path) -> None:
    """Delete a cache (for --overwrite)."""
    if is_url(path):
        fs, inner = _filesystem(str(path))
        fs.rm(inner, recursive=True)
        return
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


DEFAULT_STORAGE = {"encoding": "fp16", "compress": "none"}


def cache_storage(attrs: dict) -> dict:
    """How the cache stores its values: {"encoding", "compress"} (caches of format version 1, which
    predate the option, are float16 and uncompressed)."""
    return {**DEFAULT_STORAGE, **attrs.get("storage", {})}


def cache_fingerprint(attrs: dict) -> str:
    """sha256 of what decides a cache's contents (not when or with which library versions it was made)."""
    import hashlib
    import json
    content = {k: v for k, v in attrs.items() if k not in ("created", "versions", "extract_config")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
