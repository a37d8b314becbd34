"""Direct reads of single chunks from Zarr shard files equal zarr's own reads; other layouts go through
zarr; a damaged shard index is refused naming the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import PENDING_VIDEOS, RANDOM_LAYOUT, random_cache

from evl_cache.cache.dataset import CacheDataset, CacheLoader, FeatureSelection
from evl_cache.cache.store import CacheLayout, FeatureStore
from evl_cache.cache.zarr_shards import sharded_reader
from evl_cache.errors import CacheError


@pytest.fixture(scope="module", params=["zarr", "h5", "zarr-int4"])
def cache(request, tmp_path_factory) -> Path:
    kind, _, encoding = request.param.partition("-")
    return random_cache(tmp_path_factory.mktemp("data") / f"random.{kind}", encoding or "fp16")


ROWS = [slice(None), slice(1, 4), slice(0, 5, 2), slice(3, 4)]


def test_direct_reads_equal_zarr_reads(cache: Path) -> None:
    with FeatureStore(cache) as store:
        layout = CacheLayout(**RANDOM_LAYOUT, encoding=store.attrs["storage"]["encoding"])
        names = list(layout.feature_arrays())
        if store.kind == "zarr":  # the direct reader serves every feature array evl-cache writes
            assert all(sharded_reader(cache / name) is not None for name in names)
        for name in names:
            array = store.array(name)
            for video in range(RANDOM_LAYOUT["num_videos"]):
                for view in range(RANDOM_LAYOUT["views"]):
                    for rows in ROWS:
                        expected = np.asarray(array[video, view, rows])
                        out = np.full(expected.shape, 77, expected.dtype)
                        store.read_view(name, video, view, rows, out)
                        np.testing.assert_array_equal(out, expected, err_msg=f"{name} {video} {view} {rows}")
        for video in PENDING_VIDEOS:  # a chunk never written reads as the fill value
            shape, _, dtype = layout.feature_arrays()["tokens/block_2"]
            empty = np.ones(shape[2:], dtype)
            store.read_view("tokens/block_2", video, 0, slice(None), empty)
            assert not empty.any()
    if cache.suffix == ".zarr":  # both kinds of empty: an index entry, and a shard file not written at all
        assert (cache / "tokens/block_2/c/1/0/0/0/0").exists() and not (cache / "tokens/block_2/c/2").exists()


def test_zstd_shards_are_read_directly(tmp_path: Path) -> None:
    import zarr
    from zarr.codecs import BytesCodec, ZstdCodec

    root = zarr.open_group(str(tmp_path / "z.zarr"), mode="w")
    values = np.random.default_rng(1).standard_normal((6, 2, 4, 5)).astype(np.float16)
    array = root.create_array("a", shape=values.shape, dtype=np.float16, chunks=(1, 1, 4, 5), shards=(3, 2, 4, 5),
                              serializer=BytesCodec(), compressors=[ZstdCodec(level=3)], fill_value=0)
    array[:] = values
    reader = sharded_reader(tmp_path / "z.zarr" / "a")
    assert reader is not None and reader.compressed
    for video in range(6):
        for view in range(2):
            for rows in ROWS:
                out = np.empty_like(values[video, view, rows])
                reader.read(video, view, rows, out)
                np.testing.assert_array_equal(out, values[video, view, rows])


def test_other_layouts_are_read_through_zarr(tmp_path: Path) -> None:
    import zarr

    root = zarr.open_group(str(tmp_path / "plain.zarr"), mode="w")
    values = np.arange(2 * 2 * 3 * 4, dtype=np.float16).reshape(2, 2, 3, 4)
    root.create_array("a", shape=values.shape, dtype=np.float16, chunks=(1, 1, 3, 4))[:] = values  # not sharded
    assert sharded_reader(tmp_path / "plain.zarr" / "a") is None
    with FeatureStore(tmp_path / "plain.zarr") as store:
        out = np.empty((2, 4), np.float16)
        store.read_view("a", 1, 0, slice(1, 3), out)
        np.testing.assert_array_equal(out, values[1, 0, 1:3])


def test_damaged_shard_index_names_the_file(tmp_path: Path) -> None:
    cache = random_cache(tmp_path / "damaged.zarr")
    shard = cache / "tokens" / "block_3" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit inside the index
    shard.write_bytes(bytes(raw))
    with FeatureStore(cache) as store:
        out = np.empty((RANDOM_LAYOUT["frames"], RANDOM_LAYOUT["tokens"], RANDOM_LAYOUT["width"]), np.float16)
        with pytest.raises(CacheError, match="CRC-32C") as error:
            store.read_view("tokens/block_3", 4, 0, slice(None), out)
    assert str(shard) in str(error.value)
    selection = FeatureSelection(blocks=(3,), frame_start=0, frames=5, frame_step=1, maps=False)
    loader = CacheLoader.sequential(CacheDataset(cache, np.arange(4, 8), selection, views="first"), 2, workers=2)
    with pytest.raises(CacheError, match="CRC-32C"):  # a reader thread's error reaches the loop
        list(loader)
