"""Extraction's writes: never into, over or instead of anything that is not an evl-cache cache; shards
written whole, their done and failed videos kept, batches that never cross a shard."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

from evl_cache import ExtractConfig, extract
from evl_cache.cache.store import DONE, FAILED, PENDING, CacheLayout, FeatureStore
from evl_cache.cache.writer import BatchedWriter, ShardWriter
from evl_cache.cli import main
from evl_cache.errors import CacheError
from evl_cache.video.clips import VideoClips

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, blocks=1, eval_views=1, workers=0)


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def _victim(tmp_path, name="victim"):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "thesis.txt").write_text("three years of work")
    return folder


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("name", ["victim", "victim.zarr"])
def test_a_folder_that_is_not_a_cache_is_never_touched(sample_videos, tmp_path, name, overwrite):
    victim = _victim(tmp_path, name)
    before = _tree(tmp_path)
    with pytest.raises(CacheError, match="thesis.txt|cache path must end in"):
        extract(ExtractConfig(out=victim, videos=sample_videos, overwrite=overwrite, **TINY))
    assert _tree(tmp_path) == before  # nothing removed, no zarr.json written, no hidden leftovers


@pytest.mark.parametrize("overwrite", [False, True])
def test_another_programs_zarr_store_is_never_touched(sample_videos, tmp_path, overwrite):
    other = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    other.attrs["owner"] = "someone else"
    other.create_array("data", shape=(3,), dtype="f4")[:] = [1, 2, 3]
    before = _tree(tmp_path)
    with pytest.raises(CacheError, match="evl-cache did not make"):
        extract(ExtractConfig(out=tmp_path / "other.zarr", videos=sample_videos, overwrite=overwrite, **TINY))
    assert _tree(tmp_path) == before


def test_another_programs_hdf5_file_is_never_touched(sample_videos, tmp_path):
    import h5py
    with h5py.File(tmp_path / "data.h5", "w") as handle:
        handle["x"] = np.arange(3)
    before = _tree(tmp_path)
    result = CliRunner().invoke(main, ["extract", "--videos", str(sample_videos), "--out", str(tmp_path / "data.h5"),
                                       "--overwrite", "--model", "EVL-Tiny", "--pretrained", "none", "--blocks", "1"])
    assert result.exit_code == 1 and "HDF5 file that evl-cache did not make" in result.output
    assert _tree(tmp_path) == before


def test_the_videos_folder_is_never_the_output(sample_videos, tmp_path):
    before = _tree(sample_videos)
    with pytest.raises(CacheError, match="cache path must end in"):
        extract(ExtractConfig(out=sample_videos, videos=sample_videos, overwrite=True, **TINY))
    assert _tree(sample_videos) == before


def test_a_cache_holding_the_videos_is_never_removed(sample_videos, tmp_path):
    import shutil
    out = tmp_path / "c.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, **TINY))
    shutil.copytree(sample_videos, out / "clips")
    before = _tree(tmp_path)
    with pytest.raises(CacheError, match=r"holds\) the --videos"):
        extract(ExtractConfig(out=out, videos=out / "clips", overwrite=True, **TINY))
    assert _tree(tmp_path) == before


def test_overwrite_replaces_an_evl_cache_cache(sample_videos, tmp_path):
    out = tmp_path / "c.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, **TINY))
    with pytest.raises(CacheError, match="different configuration"):
        extract(ExtractConfig(out=out, videos=sample_videos, **{**TINY, "frames": 3}))
    summary = extract(ExtractConfig(out=out, videos=sample_videos, overwrite=True, **{**TINY, "frames": 3}))
    assert summary.done == 20
    with FeatureStore(out) as store:
        assert store.attrs["sampling"]["frames"] == 3


def _layout(videos=5, shard=2, views=2) -> CacheLayout:
    return CacheLayout(num_videos=videos, views=views, frames=2, tokens=5, width=4, grid=(2, 2), embed_dim=3,
                       blocks=(1,), shard_size=shard)


def _store(tmp_path, layout) -> FeatureStore:
    columns = {"path": np.array([f"v{i}.mp4" for i in range(layout.num_videos)], dtype=object),
               "label": np.zeros(layout.num_videos, np.int32),
               "split": np.array(["val"] * layout.num_videos, dtype=object)}
    return FeatureStore.create(tmp_path / "w.zarr", layout, {"shard_size": layout.shard_size}, columns)


def _clips(index: int, views: int = 2) -> VideoClips:
    return VideoClips(index, torch.full((views, 2, 3, 4, 4), index, dtype=torch.uint8), 10, "", 10)


def test_batches_never_cross_a_shard_and_every_shard_is_written_whole(tmp_path):
    layout = _layout()
    store = _store(tmp_path, layout)
    batches, shards = [], []

    def encoded(clips):
        batches.append(clips[:, 0, 0, 0, 0].tolist())
        count = clips.shape[0]
        return {name: np.full((count,) + shape[2:], clips[0, 0, 0, 0, 0].item(), dtype)
                for name, (shape, _, dtype) in layout.feature_arrays().items()}

    output = BatchedWriter(store, layout, encoded, 3, lambda writer, counts: shards.append(writer.shard))
    for item in [_clips(0), _clips(1), VideoClips(2, None, 0, "broken", 0), _clips(3), _clips(4)]:
        output.add(item)
    output.close()
    assert batches == [[0, 0, 1], [1], [3, 3], [4, 4]]  # shard 0 = videos 0-1, shard 1 = 2-3, shard 2 = 4
    assert shards == [0, 1, 2]
    assert (output.counts.done, output.counts.failed, output.counts.clips) == (4, 1, 8)
    assert store.column("status").tolist() == [DONE, DONE, FAILED, DONE, DONE]
    assert store.column("error").tolist() == ["", "", "broken", "", ""]


def test_a_shard_keeps_its_done_and_failed_videos(tmp_path):
    layout = _layout(videos=3, shard=3, views=1)
    store = _store(tmp_path, layout)
    first = ShardWriter(store, layout, 0, 3)
    stored = {name: np.full((1,) + shape[2:], 7, dtype) for name, (shape, _, dtype) in layout.feature_arrays().items()}
    first.put(0, 0, 10, 1, stored)
    first.fail(1, "broken")
    first.write()
    again = ShardWriter(store, layout, 0, 3)  # a resume: video 2 is still pending
    assert again.kept.tolist() == [True, True, False]
    again.put(2, 0, 10, 1, {name: values * 0 + 5 for name, values in stored.items()})
    again.write()
    assert store.column("status").tolist() == [DONE, FAILED, DONE] and store.column("error")[1] == "broken"
    assert np.asarray(store.array("embed")[0]).max() == 7 and np.asarray(store.array("embed")[2]).max() == 5
    assert PENDING not in store.column("status")
