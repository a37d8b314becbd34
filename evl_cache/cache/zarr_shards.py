"""Direct reads of single chunks from the Zarr v3 shard files of a local cache.

Training reads one (video, view) chunk of each selected array per item, in random order. Through
zarr's public API each such read pays a fixed overhead (an event-loop round trip, a separate read of
the shard index, a copy into a new array) that keeps the loader far below the disk's speed
(`benchmarks/bench_loader.py` measures both). The shard format is simple and documented (the `sharding_indexed` codec of the
Zarr v3 specification): a shard file holds its chunks' bytes followed by an index of (offset, length)
pairs and its CRC-32C. For the layout evl-cache writes (one chunk per (video, view), chunk bytes in C
order, little-endian, uncompressed or zstd-compressed), this module reads one chunk, or a range of its
rows, with two `pread` calls straight into the caller's buffer. `sharded_reader` returns None for any
other layout; the store then reads through zarr. Tests check the two give identical arrays.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CacheError

_EMPTY = 2**64 - 1  # offset and length of a chunk that was never written (all fill value)


@dataclass(frozen=True)
class ShardedArrayReader:
    """Reads chunks of one sharded array of shape [N, V, *rows] whose chunks are [1, 1, *rows]."""
    folder: Path
    shape: tuple[int, ...]
    shard_shape: tuple[int, ...]
    dtype: np.dtype
    fill_value: float
    compressed: bool  # zstd after the bytes codec: a chunk is read whole and decompressed

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return self.shape[2:]

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_shape[0] * self.shard_shape[1]

    def _shard_file(self, video: int, view: int) -> Path:
        return self.folder.joinpath("c", str(video // self.shard_shape[0]), str(view // self.shard_shape[1]),
                                    *["0"] * (len(self.shape) - 2))

    def _chunk_extent(self, handle: int, path: Path, video: int, view: int) -> tuple[int, int]:
        """(offset, length) of the chunk in its shard file, from the shard's index (checksum verified)."""
        import google_crc32c  # zarr's own CRC-32C implementation (a zarr dependency)

        index_bytes = 16 * self.chunks_per_shard + 4
        size = os.fstat(handle).st_size
        if size < index_bytes:
            raise CacheError(f"shard file is shorter ({size} bytes) than its index", path)
        raw = os.pread(handle, index_bytes, size - index_bytes)
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:], "little"):
            raise CacheError("shard index fails its CRC-32C check (damaged file)", path)
        index = np.frombuffer(raw[:-4], dtype="<u8").reshape(-1, 2)
        position = (video % self.shard_shape[0]) * self.shard_shape[1] + view % self.shard_shape[1]
        offset, length = (int(v) for v in index[position])
        if offset != _EMPTY and offset + length > size - index_bytes:
            raise CacheError("shard index points past the end of the file (damaged file)", path)
        return offset, length

    def read(self, video: int, view: int, rows: slice, out: np.ndarray) -> None:
        """Fill `out` with rows `rows` (a slice of the chunk's first axis) of chunk (video, view)."""
        start, stop, step = rows.indices(self.chunk_shape[0])
        path = self._shard_file(video, view)
        try:
            handle = os.open(path, os.O_RDONLY)
        except FileNotFoundError:  # a shard whose chunks are all fill value is not written
            out[...] = self.fill_value
            return
        try:
            offset, length = self._chunk_extent(handle, path, video, view)
            if offset == _EMPTY:
                out[...] = self.fill_value
                return
            row_bytes = self.dtype.itemsize * int(np.prod(self.chunk_shape[1:]))
            if self.compressed:
                chunk = _zstd().decode(os.pread(handle, length, offset))
                values = np.frombuffer(chunk, dtype=self.dtype).reshape(self.chunk_shape)
                out[...] = values[start:stop:step]
                return
            if length != row_bytes * self.chunk_shape[0]:
                raise CacheError(f"chunk ({video}, {view}) has {length} bytes, expected "
                                 f"{row_bytes * self.chunk_shape[0]} (damaged file)", path)
            if step == 1 and out.flags.c_contiguous and out.dtype == self.dtype:
                target = out
            else:
                target = np.empty((stop - start,) + self.chunk_shape[1:], self.dtype)
            read = os.preadv(handle, [memoryview(target).cast("B")], offset + start * row_bytes)
            if read != target.nbytes:
                raise CacheError(f"chunk ({video}, {view}) is truncated (damaged file)", path)
            if target is not out:
                out[...] = target[::step]
        finally:
            os.close(handle)


def _zstd():
    from numcodecs import Zstd  # the codec zarr itself uses for zstd
    return Zstd()


def sharded_reader(folder: Path) -> ShardedArrayReader | None:
    """A direct reader for the array stored in `folder`, or None when its layout is not one this
    module reads (then read it through zarr)."""
    try:
        meta = json.loads((folder / "zarr.json").read_text())
    except (OSError, ValueError):
        return None
    codecs = meta.get("codecs", [])
    if meta.get("zarr_format") != 3 or meta.get("node_type") != "array" or len(codecs) != 1:
        return None
    if meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}:
        return None
    sharding = codecs[0]
    if sharding.get("name") != "sharding_indexed" or meta.get("storage_transformers"):
        return None
    config = sharding["configuration"]
    shape = tuple(meta["shape"])
    shard_shape = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
    inner = [c["name"] for c in config["codecs"]]
    little = [c for c in config["codecs"] if c["name"] == "bytes"]
    if (len(shape) < 3 or tuple(config["chunk_shape"]) != (1, 1) + shape[2:] or shard_shape[2:] != shape[2:]
            or inner not in (["bytes"], ["bytes", "zstd"])
            or any(c.get("configuration", {}).get("endian", "little") != "little" for c in little)
            or [c["name"] for c in config["index_codecs"]] != ["bytes", "crc32c"]
            or config["index_codecs"][0].get("configuration", {}).get("endian", "little") != "little"
            or config.get("index_location", "end") != "end"):
        return None
    try:
        dtype = np.dtype(meta["data_type"]).newbyteorder("<")
    except TypeError:
        return None
    fill = meta.get("fill_value", 0)
    if not isinstance(fill, (int, float)):
        return None
    return ShardedArrayReader(folder, shape, shard_shape, dtype, fill, compressed=inner == ["bytes", "zstd"])
