"""The feature cache on disk: one Zarr v3 group (`*.zarr`) or one HDF5 file (`*.h5`), same layout.

Layout (N videos, V views, T frames, L = prefix + P tokens, C width, E embedding width; the backbone
record says the tower's prefix tokens: 0, 1, or a class token and registers):
- `videos/{path,label,split,frames,views,status,error,checksum}`: one row per video;
- `tokens/block_{b}`: [N, V, T, L, C] float16, one chunk per (video, view), one array per block;
- `maps/block_{b}/prev`, `maps/block_{b}/next`: [N, V, T-1, P, P] float16;
- `embed`: [N, V, T, E] float16.
The root attribute `evl_cache` describes everything else (backbone, sampling, classes, versions).

How it is written (docs/cache-format.md, "How a cache is written"): arrays are created at full size up
front; a shard of videos is written whole, once; per-video rows are chunked like the shards; status is
written after the data.

HDF5 takes one writer per file, so an HDF5 cache made by several processes is joined from part files
beside it (`feats.part-0-of-2.h5`, ...): each part holds every array at full size (HDF5 allocates only
the chunks written), shard s is written to part s % parts, and the main file maps each array's rows
to the parts with HDF5 virtual datasets, one strided hyperslab per part. Readers (and plain h5py) see
one cache; writes go to the parts (`for_shard`), never through the virtual datasets (writing strings
through one crashes HDF5 2.0). One mapping per part keeps the main file small and quick to open
however many shards there are; a row is read from its part file, which skips the mapping's lookup
(`benchmarks/bench_join.py` measures both).
"""
from __future__ import annotations

import functools
import glob
import json
import os
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..errors import CacheError

# 2: storage encodings and compression (`storage`); a version-1 cache is float16, uncompressed.
# 3: towers of every family: the backbone record's `family` and `prefix_tokens` (L = prefix_tokens + P); a
#    cache of versions 1 and 2 is of an open_clip ViT with one class token.
# 4: int8/int4 codes calibrated per channel (tokens) and log-coded (maps), `storage` says so (its code kinds
#    and calibration); a cache of versions 2 and 3 holds the per-token and per-row codes (`encodings.LEGACY`).
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
ATTR = "evl_cache"
PARTS_ATTR = "evl_cache_parts"  # in a joined HDF5 cache's main file: its part files, in part order
PART_ATTR = "evl_cache_part"  # in each part file of a joined HDF5 cache: its main file and part number
PENDING, DONE, FAILED = 0, 1, 2
STATUS_NAMES = {PENDING: "pending", DONE: "done", FAILED: "failed"}
VIDEO_COLUMNS = ("path", "label", "split", "frames", "views", "status", "error", "checksum", "note")


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
    encoding: str = "fp16"  # the encoding's key (`encodings.encoding`): a name, or a legacy encoding's
    compress: str = "none"

    def feature_arrays(self) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], np.dtype]]:
        """Name -> (shape, chunk shape, stored dtype) of every feature array, in the checksum's order:
        per block its tokens, then its prev and next maps (each followed by its scales when the
        encoding has them: per token or map row, and a log-coded row's two), then `embed` (always
        float16)."""
        from .encodings import encoding

        enc = encoding(self.encoding)
        n, v, t = self.num_videos, self.views, self.frames
        patches = self.grid[0] * self.grid[1]

        def add(name: str, rows: tuple[int, ...], dim: int, signed: bool) -> None:
            shape = (n, v) + rows + (enc.stored_dim(dim),)
            arrays[name] = (shape, (1, 1) + shape[2:], enc.stored_dtype(signed))
            if enc.scaled:
                trailing, dtype = enc.scale_layout(signed)
                arrays[f"scales/{name}"] = ((n, v) + rows + trailing, (1, 1) + rows + trailing, dtype)

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

    def all_arrays(self) -> list[tuple[str, tuple[int, ...], Any, tuple[int, ...], tuple[int, ...] | None]]:
        """(name, shape, dtype, chunks, shards) of every array: the video table, then the features."""
        rows = (self.shard_size,)
        arrays = [(f"videos/{name}", (self.num_videos,), _column_dtype(name), rows, None) for name in VIDEO_COLUMNS]
        for name, (shape, chunks, dtype) in self.feature_arrays().items():
            arrays.append((name, shape, dtype, chunks, (self.shard_size,) + shape[1:]))
        return arrays


def _column_dtype(name: str) -> Any:
    return {"path": str, "split": str, "error": str, "note": str, "label": np.int32, "frames": np.int32,
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
        if mode != "w" and not store_exists(self.path):
            raise CacheError("cache not found", self.path)
        self.part_files: list[Path] = []  # a joined HDF5 cache's parts
        self._parts: dict[int, FeatureStore] = {}
        try:
            if self.kind == "zarr":
                import zarr
                self._root = zarr.open_group(str(self.path), mode=mode)  # r+ never creates a store
            else:
                self._root = self._open_h5()
        except (OSError, ValueError) as error:
            raise CacheError(f"cannot open cache: {error}", self.path) from None
        self._arrays: dict[str, Any] = {}
        self._direct: dict[str, Any] = {}  # name -> ShardedArrayReader, or None to read through zarr

    def _open_h5(self) -> Any:
        """The HDF5 file; a joined cache's main file is opened read-only (only its parts take writes)."""
        import h5py
        if self.mode == "w":
            return h5py.File(self.path, "w")
        root = h5py.File(self.path, "r")
        if PARTS_ATTR in root.attrs:
            self.part_files = [self.path.with_name(name) for name in json.loads(root.attrs[PARTS_ATTR])]
            missing = [p.name for p in self.part_files if not p.exists()]
            if missing:  # HDF5 would read a missing part's rows as fill values: pending, all zeros
                root.close()
                raise CacheError(f"part file {missing[0]} of the cache is missing ({len(missing)} of "
                                 f"{len(self.part_files)} missing); a joined HDF5 cache is its main file and "
                                 f"all its parts, kept side by side", self.path)
            return root
        if self.mode == "r":
            return root
        root.close()
        return h5py.File(self.path, "r+")

    # -- creation -------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, layout: CacheLayout, attrs: dict,
               columns: dict[str, np.ndarray], parts: int = 1) -> "FeatureStore":
        """Create a cache with every array at full size, the video table and the metadata.

        `parts` > 1 makes an HDF5 cache of that many part files joined by its main file, so that as many
        processes can write it at once (Zarr needs none: each of its shards is its own file)."""
        path = location(path)
        if store_exists(path):
            raise CacheError("cache already exists", path)
        if isinstance(path, Path) and not path.parent.exists():
            raise CacheError("output folder does not exist", path.parent)
        if isinstance(path, Path) and not os.access(path.parent, os.W_OK):
            raise CacheError("output folder is not writable", path.parent)
        building = _building_path(path)
        for stale in part_files_beside(path):  # left by a run killed while creating a joined cache
            remove_store(stale)
        attrs = {**attrs, "format_version": FORMAT_VERSION}
        if parts > 1 and store_kind(path) == "h5":
            part_files = [path.with_name(f"{path.stem}.part-{p}-of-{parts}{path.suffix}") for p in range(parts)]
            for p, file in enumerate(part_files):
                with cls(file, mode="w") as part:
                    part._root.attrs[PART_ATTR] = json.dumps({"main": path.name, "part": p, "parts": parts})
                    part._create_arrays(layout, columns)
            _write_join(building, layout, part_files, attrs)
        else:
            store = cls(building, mode="w")
            store.set_attrs(attrs)  # first: whatever a kill leaves is recognisably an evl-cache cache
            store._create_arrays(layout, columns)
            if building == path:
                return store
            store.close()
        os.replace(building, path)  # whole or not at all: a run killed while creating leaves nothing at `path`
        return cls(path, mode="r+")

    def _create_arrays(self, layout: CacheLayout, columns: dict[str, np.ndarray]) -> None:
        for name, shape, dtype, chunks, shards in layout.all_arrays():
            self._create(name, shape, dtype, chunks, shards, layout.compress if shards else "none")
        for name, values in columns.items():
            self.write_rows(name, 0, values)

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

    @functools.cached_property
    def _shard_size(self) -> int:
        return int(self.attrs["shard_size"])

    def read_view(self, name: str, video: int, view: int, rows: slice, out: np.ndarray) -> None:
        """Copy rows `rows` (a slice of the frame axis) of one cached (video, view) of feature array `name`
        into `out`: the loader's read. A local Zarr cache is read straight from its shard files
        (`zarr_shards`), an HDF5 one with `read_direct` (a joined one from the part file that holds the
        video: its virtual datasets' lookup grows with the number of shards); a remote one through zarr."""
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
            holder = self.for_shard(video // self._shard_size) if self.part_files else self
            holder.array(name).read_direct(out, np.s_[video, view, rows])
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

    # -- writers ----------------------------------------------------------------------------------
    @property
    def parts(self) -> int:
        """How many files take this cache's writes, one process each at a time: 1 for an HDF5 file, its
        part count for a joined one; 0 for Zarr (each shard is its own file)."""
        return 0 if self.kind == "zarr" else max(len(self.part_files), 1)

    def shard_owner(self, shard: int, world_size: int) -> int:
        """The process (of `world_size`) that writes `shard`: shard s % world_size in Zarr; in HDF5, part
        p = s % parts is written by process p % world_size, so that no file has two writers whatever
        the number of processes (a cache made by as many processes as it has parts: s % world_size)."""
        return (shard % self.parts if self.parts else shard) % world_size

    def for_shard(self, shard: int) -> "FeatureStore":
        """The store that holds shard `shard`'s rows and takes their writes: its part file in a joined
        HDF5 cache (opened on first use, in this store's mode), this store otherwise. Reading the rows
        from it skips the virtual dataset's lookup, which grows with the number of shards."""
        if not self.part_files:
            return self
        part = shard % len(self.part_files)
        if part not in self._parts:
            self._parts[part] = FeatureStore(self.part_files[part], mode=self.mode)
        return self._parts[part]

    def flush(self) -> None:
        if self.kind == "h5":
            self._root.flush()

    def close(self) -> None:
        for part in self._parts.values():
            part.close()
        self._parts.clear()
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
    if store_exists(building):  # left by a run killed while creating: a cache, or still an empty store
        if foreign_content(building) is not None and not _empty_store(building):
            raise CacheError(f"refusing to remove it: {foreign_content(building)}; it is in the way of creating "
                             f"{path.name}", building)
        remove_store(building, unfinished=True)
    return building


def _write_join(path: Path, layout: CacheLayout, part_files: list[Path], attrs: dict) -> None:
    """Write the main file of a joined HDF5 cache: every array a virtual dataset whose shard s comes
    from part s % len(part_files), and the description."""
    import h5py
    with h5py.File(path, "w", libver=("v110", "latest")) as main:  # 1.10's format stores a strided mapping
        for name, shape, dtype, _, _ in layout.all_arrays():      # in a few numbers (the oldest: every block)
            plist = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
            if dtype is not str:
                plist.set_fill_value(np.array(_fill(dtype), dtype=dtype))
            for part, file in enumerate(part_files):
                for start, stride, count, block in _part_rows(shape[0], layout.shard_size, len(part_files), part):
                    rows = h5py.h5s.create_simple(shape)
                    rest = (0,) * (len(shape) - 1), (1,) * (len(shape) - 1)
                    rows.select_hyperslab((start,) + rest[0], (count,) + rest[1], (stride,) + rest[1],
                                          (block,) + shape[1:])
                    plist.set_virtual(rows, file.name.encode(), name.encode(), rows)  # the same rows of the part
            group_name, _, leaf = name.rpartition("/")
            group = main.require_group(group_name) if group_name else main
            h5_type = h5py.h5t.py_create(h5py.string_dtype() if dtype is str else np.dtype(dtype), logical=True)
            h5py.h5d.create(group.id, leaf.encode(), h5_type, h5py.h5s.create_simple(shape), dcpl=plist).close()
        main.attrs[PARTS_ATTR] = json.dumps([file.name for file in part_files])
        main.attrs[ATTR] = json.dumps(attrs)


def _part_rows(rows: int, shard_size: int, parts: int, part: int) -> list[tuple[int, int, int, int]]:
    """The rows of the shards s % parts == part, as regular hyperslabs (start, stride, count, block): one
    strided run of whole shards, and the last shard if it is short. A virtual dataset then has at most
    parts + 1 mappings however many shards it has (one mapping per shard slows opening it a lot)."""
    whole = rows // shard_size
    slabs = []
    count = len(range(part, whole, parts))
    if count:
        slabs.append((part * shard_size, parts * shard_size, count, shard_size))
    if rows % shard_size and whole % parts == part:
        slabs.append((whole * shard_size, shard_size, 1, rows - whole * shard_size))
    return slabs


def part_files_beside(path: str | Path) -> list[Path]:
    """The part files of the joined HDF5 cache at `path` found beside it (by name, nothing opened)."""
    path = Path(str(path))
    if is_url(path) or path.suffix.lower() not in (".h5", ".hdf5"):
        return []
    return sorted(path.parent.glob(f"{glob.escape(path.stem)}.part-*-of-*{path.suffix}"))


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
    """Bytes a file or folder takes on disk (allocated blocks, so sparse files count right; a joined
    HDF5 cache with its parts); for an fsspec URL, the sum of its objects' sizes."""
    if is_url(path):
        fs, inner = _filesystem(str(path))
        return int(fs.du(inner, total=True)) if fs.exists(inner) else 0
    path = Path(path)
    if path.is_file():
        return sum(file.stat().st_blocks * 512 for file in [path] + part_files_beside(path))
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            total += (Path(dirpath) / name).stat().st_blocks * 512
    return total


def foreign_content(path: str | Path) -> str | None:
    """What is at `path` if it is not an evl-cache cache, in words for a refusal; None for a cache (or a
    part file of one) or for nothing at all. Only the description is read: nothing is created."""
    if not store_exists(path):
        return None
    kind = Path(str(path).split("://")[-1]).suffix.lower()
    if kind == ".zarr" or (not is_url(path) and Path(path).is_dir()):
        return _foreign_zarr(path)
    return _foreign_h5(Path(path))


def _foreign_zarr(path: str | Path) -> str | None:
    if is_url(path):
        fs, inner = _filesystem(str(path))
        if not fs.exists(f"{inner}/zarr.json"):
            return "a location that is not a Zarr store"
        meta = json.loads(fs.cat_file(f"{inner}/zarr.json"))
    else:
        folder = Path(path)
        if not folder.is_dir():
            return "a file, not a Zarr store (a folder)"
        if not (folder / "zarr.json").is_file():
            entries = sorted(p.name for p in folder.iterdir())
            return (f"a folder holding {len(entries)} entries" + (f" (e.g. {entries[0]!r})" if entries else "")
                    + ", not a Zarr store")
        try:
            meta = json.loads((folder / "zarr.json").read_text())
        except (OSError, ValueError):
            return "a Zarr store whose zarr.json cannot be read"
    if ATTR not in meta.get("attributes", {}):
        return "a Zarr store that evl-cache did not make (no 'evl_cache' attribute)"
    return None


def _foreign_h5(path: Path) -> str | None:
    if path.is_dir():
        return "a folder, not an HDF5 file"
    try:
        import h5py
        with h5py.File(path, "r") as handle:
            if ATTR in handle.attrs or PART_ATTR in handle.attrs:
                return None
            return "an HDF5 file that evl-cache did not make (no 'evl_cache' attribute)"
    except OSError:
        return "a file that is not HDF5"


def _empty_store(path: Path) -> bool:
    """A Zarr group or HDF5 file with no attributes and nothing in it: what a run killed at the very start
    of creating a cache leaves."""
    if path.is_dir():
        entries = list(path.iterdir())
        return [p.name for p in entries] == ["zarr.json"] and not json.loads(entries[0].read_text()).get("attributes")
    try:
        import h5py
        with h5py.File(path, "r") as handle:
            return not handle.attrs and not list(handle)
    except OSError:
        return False


def remove_store(path: str | Path, unfinished: bool = False) -> None:
    """Delete an evl-cache cache (for --overwrite), a joined HDF5 cache with its parts; anything that is
    not recognisably one is refused, named in one line, and left as it is (`unfinished`: an empty store
    a killed creation left is one too)."""
    for target in [path] + [part for part in part_files_beside(path)]:
        found = foreign_content(target)
        if found is not None and not (unfinished and _empty_store(Path(target))):
            raise CacheError(f"refusing to remove it: {found}; choose another --out", target)
    if is_url(path):
        fs, inner = _filesystem(str(path))
        fs.rm(inner, recursive=True)
        return
    path = Path(path)
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
    for part in part_files_beside(path):
        part.unlink()


DEFAULT_STORAGE = {"encoding": "fp16", "compress": "none"}


def cache_storage(attrs: dict) -> dict:
    """How the cache stores its values: {"encoding", "compress"}, and from format version 4 the code
    kinds and any calibration (caches of format version 1, which predate the option, are float16 and
    uncompressed)."""
    return {**DEFAULT_STORAGE, **attrs.get("storage", {})}


def storage_choice(attrs: dict) -> dict:
    """The storage options a cache was made with, {"encoding", "compress"}: what a resume must match."""
    storage = cache_storage(attrs)
    return {key: storage[key] for key in DEFAULT_STORAGE}


def cache_fingerprint(attrs: dict) -> str:
    """sha256 of what decides a cache's contents (not when or with which library versions it was made)."""
    import hashlib
    import json
    content = {k: v for k, v in attrs.items() if k not in ("created", "versions", "extract_config")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
