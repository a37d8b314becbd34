"""The cache reader: direct shard reads equal zarr's, batches equal item-by-item reads, errors name the file."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evl_cache.cache.dataset import CacheDataset, CacheLoader, EpochBatches, FeatureSelection
from evl_cache.cache.store import DONE, PENDING, CacheLayout, FeatureStore
from evl_cache.cache.zarr_shards import sharded_reader
from evl_cache.errors import CacheError

LAYOUT = dict(num_videos=10, views=2, frames=5, tokens=7, width=8, grid=(2, 3), embed_dim=6, blocks=(2, 3),
              shard_size=4)
PENDING_VIDEOS = (5, 8, 9)  # never written: empty chunks in a shard (5), a shard never written (8, 9)


def _random_values(rng: np.random.Generator, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Random stored values of `dtype`: floats, or any code of an integer type."""
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)


def _random_cache(path: Path, encoding: str = "fp16") -> Path:
    """A cache of random stored values with the store's own layout; PENDING_VIDEOS without data, and
    video 0 with one view of two (its second view's chunks are never written)."""
    layout = CacheLayout(**LAYOUT, encoding=encoding)
    attrs = {"blocks": list(layout.blocks), "sampling": {"frames": layout.frames},
             "backbone": {"width": layout.width, "patch_grid": list(layout.grid)},
             "storage": {"encoding": encoding, "compress": "none"}}
    n = layout.num_videos
    columns = {"path": np.array([f"v{i}.mp4" for i in range(n)], dtype=object),
               "label": (np.arange(n) % 3).astype(np.int32), "split": np.array(["train"] * n, dtype=object)}
    store = FeatureStore.create(path, layout, attrs, columns)
    rng = np.random.default_rng(0)
    views = np.full(n, layout.views, np.int16)
    views[0] = 1
    status = np.full(n, DONE, np.uint8)
    status[list(PENDING_VIDEOS)] = PENDING
    for name, (shape, _, dtype) in layout.feature_arrays().items():
        values = _random_values(rng, shape, dtype)
        values[list(PENDING_VIDEOS)] = 0
        values[0, 1:] = 0
        if store.kind == "zarr":
            for start in range(0, n, layout.shard_size):  # whole shards, as extraction writes them
                store.write_block(name, start, values[start:start + layout.shard_size])
        else:
            for video in np.flatnonzero(status == DONE):
                store.array(name)[video, : views[video]] = values[video, : views[video]]
    store.write_rows("views", 0, views)
    store.write_rows("status", 0, status)
    store.close()
    return path


@pytest.fixture(scope="module", params=["zarr", "h5", "zarr-int4"])
def cache(request, tmp_path_factory) -> Path:
    kind, _, encoding = request.param.partition("-")
    return _random_cache(tmp_path_factory.mktemp("data") / f"random.{kind}", encoding or "fp16")


ROWS = [slice(None), slice(1, 4), slice(0, 5, 2), slice(3, 4)]


def test_direct_reads_equal_zarr_reads(cache: Path) -> None:
    with FeatureStore(cache) as store:
        layout = CacheLayout(**LAYOUT, encoding=store.attrs["storage"]["encoding"])
        names = list(layout.feature_arrays())
        if store.kind == "zarr":  # the direct reader serves every feature array evl-cache writes
            assert all(sharded_reader(cache / name) is not None for name in names)
        for name in names:
            array = store.array(name)
            for video in range(LAYOUT["num_videos"]):
                for view in range(LAYOUT["views"]):
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
    cache = _random_cache(tmp_path / "damaged.zarr")
    shard = cache / "tokens" / "block_3" / "c" / "1" / "0" / "0" / "0" / "0"
    raw = bytearray(shard.read_bytes())
    raw[-10] ^= 0xFF  # a flipped bit inside the index
    shard.write_bytes(bytes(raw))
    with FeatureStore(cache) as store:
        out = np.empty((LAYOUT["frames"], LAYOUT["tokens"], LAYOUT["width"]), np.float16)
        with pytest.raises(CacheError, match="CRC-32C") as error:
            store.read_view("tokens/block_3", 4, 0, slice(None), out)
    assert str(shard) in str(error.value)
    selection = FeatureSelection(blocks=(3,), frame_start=0, frames=5, frame_step=1, maps=False)
    loader = CacheLoader.sequential(CacheDataset(cache, np.arange(4, 8), selection, views="first"), 2, workers=2)
    with pytest.raises(CacheError, match="CRC-32C"):  # a reader thread's error reaches the loop
        list(loader)


SELECTIONS = [FeatureSelection(blocks=(2, 3), frame_start=0, frames=5, frame_step=1, maps=True, embed=True),
              FeatureSelection(blocks=(3,), frame_start=1, frames=3, frame_step=1, maps=True),
              FeatureSelection(blocks=(3,), frame_start=0, frames=3, frame_step=2, maps=False)]


def _expected_item(store: FeatureStore, selection: FeatureSelection, video: int, view: int) -> dict:
    """An item computed by plain zarr/h5py slicing, independently of the reader: key -> arrays
    (an encoded cache's scales under "scales/<key>")."""
    frames = selection.frame_indices
    pairs = slice(selection.frame_start, selection.frame_start + selection.frames - 1)
    names = {"tokens": [(f"tokens/block_{b}", frames) for b in selection.blocks]}
    if selection.maps:
        for d in ("prev", "next"):
            names[f"maps_{d}"] = [(f"maps/block_{b}/{d}", pairs) for b in selection.blocks]
    scaled = store.attrs["storage"]["encoding"] != "fp16"
    item = {}
    for key, group in names.items():
        item[key] = [np.asarray(store.array(name)[video, view])[rows] for name, rows in group]
        if scaled:
            item[f"scales/{key}"] = [np.asarray(store.array(f"scales/{name}")[video, view])[rows]
                                     for name, rows in group]
    if selection.embed:
        item["embed"] = [np.asarray(store.array("embed")[video, view])[frames]]
    return item


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("memory", ["disk", "private", "shared"])
@pytest.mark.parametrize("selection", SELECTIONS, ids=["all", "window", "step2"])
def test_loader_batches_equal_item_reads(cache: Path, selection: FeatureSelection, workers: int,
                                         memory: str, tmp_path: Path) -> None:
    done = np.array([v for v in range(LAYOUT["num_videos"]) if v not in PENDING_VIDEOS])
    dataset = CacheDataset(cache, done, selection, views="random", seed=3)
    if memory == "private":
        dataset.hold_in_memory()
    elif memory == "shared":  # one process reads into a shared file; another (here: a second dataset) maps it
        shared = tmp_path / CacheDataset(cache, done, selection).shared_memory_name()
        CacheDataset(cache, done, selection, views="random", seed=3).hold_in_memory(shared, read=True)
        dataset.hold_in_memory(shared, read=False)
        assert shared.stat().st_size == dataset.memory_bytes() and not list(tmp_path.glob("*.partial-*"))
    sampler = EpochBatches(len(dataset), 3, seed=1)
    loader = CacheLoader(dataset, sampler, workers=workers, prefetch=2)
    with FeatureStore(cache) as store:
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            seen = []
            for batch, keys in zip(loader, sampler):
                samples = dataset.samples(keys)
                assert batch["video"].tolist() == [v for v, _ in samples]
                assert batch["view"].tolist() == [v for _, v in samples]
                for row, (video, view) in enumerate(samples):
                    for key, values in _expected_item(store, selection, video, view).items():
                        got = batch["scales"][key[7:]] if key.startswith("scales/") else batch[key]
                        got = got if isinstance(got, list) else [got]
                        for tensor, want in zip(got, values, strict=True):
                            np.testing.assert_array_equal(tensor[row].numpy(), want, err_msg=key)
                    assert batch["label"][row] == video % 3
                seen += [v for v, _ in samples]
            assert sorted(seen) == sorted(done.tolist())
    groups = [batch, batch.get("scales", {})]
    features = [t for g in groups for key in ("tokens", "maps_prev", "maps_next") for t in g.get(key, [])] + (
        [batch["embed"]] if "embed" in batch else [])
    assert dataset.bytes_per_item() == sum(t[0].nbytes for t in features)


def test_random_views_are_drawn_per_epoch_and_reproducible(cache: Path) -> None:
    selection = SELECTIONS[2]
    dataset = CacheDataset(cache, np.arange(1, 5), selection, views="random", seed=7)
    draws = {epoch: [view for _, view in dataset.samples([(i, epoch) for i in range(4)])] for epoch in range(6)}
    assert len({tuple(d) for d in draws.values()}) > 1  # views change across epochs
    again = CacheDataset(cache, np.arange(1, 5), selection, views="random", seed=7)
    assert draws[3] == [view for _, view in again.samples([(i, 3) for i in range(4)])]
    item = dataset[(2, 3)]  # one item, no batch axis
    assert item["tokens"][0].shape[:2] == (3, LAYOUT["tokens"]) and item["view"] == draws[3][2]
