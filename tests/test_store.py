"""The store recognises its own caches, and creates, opens and removes nothing else."""
from __future__ import annotations

import h5py
import numpy as np
import pytest
import zarr

from evl_cache.cache.store import CacheLayout, FeatureStore, foreign_content, part_files_beside, remove_store
from evl_cache.errors import CacheError

LAYOUT = CacheLayout(num_videos=3, views=1, frames=2, tokens=5, width=4, grid=(2, 2), embed_dim=3, blocks=(1,),
                     shard_size=2)
COLUMNS = {"path": np.array(["a.mp4", "b.mp4", "c.mp4"], dtype=object), "label": np.zeros(3, np.int32),
           "split": np.array(["train"] * 3, dtype=object)}


def test_a_cache_is_recognised_and_nothing_else_is(tmp_path):
    FeatureStore.create(tmp_path / "c.zarr", LAYOUT, {"shard_size": 2}, COLUMNS).close()
    FeatureStore.create(tmp_path / "c.h5", LAYOUT, {"shard_size": 2}, COLUMNS).close()
    FeatureStore.create(tmp_path / "j.h5", LAYOUT, {"shard_size": 2}, COLUMNS, parts=2).close()
    assert [foreign_content(tmp_path / name) for name in ("c.zarr", "c.h5", "j.h5", "missing.zarr")] == [None] * 4
    assert [p.name for p in part_files_beside(tmp_path / "j.h5")] == ["j.part-0-of-2.h5", "j.part-1-of-2.h5"]
    assert all(foreign_content(p) is None for p in part_files_beside(tmp_path / "j.h5"))
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "notes.txt").write_text("mine")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with h5py.File(tmp_path / "other.h5", "w") as handle:
        handle["x"] = 1
    (tmp_path / "text.h5").write_text("not hdf5")
    assert "holding 1 entries (e.g. 'notes.txt')" in foreign_content(tmp_path / "folder.zarr")
    assert "did not make" in foreign_content(tmp_path / "other.zarr")
    assert "HDF5 file that evl-cache did not make" in foreign_content(tmp_path / "other.h5")
    assert "not HDF5" in foreign_content(tmp_path / "text.h5")


def test_remove_store_removes_caches_and_refuses_the_rest(tmp_path):
    FeatureStore.create(tmp_path / "j.h5", LAYOUT, {"shard_size": 2}, COLUMNS, parts=2).close()
    remove_store(tmp_path / "j.h5")
    assert list(tmp_path.iterdir()) == []
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").attrs["x"] = 1
    with pytest.raises(CacheError, match="refusing to remove it"):
        remove_store(tmp_path / "other.zarr")
    assert (tmp_path / "other.zarr" / "zarr.json").exists()


def test_a_foreign_part_file_stops_the_removal_of_its_main_file(tmp_path):
    FeatureStore.create(tmp_path / "j.h5", LAYOUT, {"shard_size": 2}, COLUMNS).close()
    (tmp_path / "j.part-0-of-1.h5").write_text("someone's file with a part file's name")
    with pytest.raises(CacheError, match="j.part-0-of-1.h5: refusing"):
        remove_store(tmp_path / "j.h5")
    assert (tmp_path / "j.h5").exists()


def test_opening_never_creates_a_store(tmp_path):
    folder = tmp_path / "plain.zarr"
    folder.mkdir()
    for mode in ("r", "r+"):
        with pytest.raises(CacheError):
            FeatureStore(folder, mode=mode).attrs
        with pytest.raises(CacheError, match="cache not found"):
            FeatureStore(tmp_path / "missing.h5", mode=mode)
    assert list(folder.iterdir()) == [] and not (tmp_path / "missing.h5").exists()


def test_create_refuses_an_existing_path(tmp_path):
    FeatureStore.create(tmp_path / "c.zarr", LAYOUT, {"shard_size": 2}, COLUMNS).close()
    with pytest.raises(CacheError, match="already exists"):
        FeatureStore.create(tmp_path / "c.zarr", LAYOUT, {"shard_size": 2}, COLUMNS)
