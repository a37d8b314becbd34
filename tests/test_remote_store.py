"""Caches at fsspec URLs: an in-memory file system and file:// URLs work like local paths."""
import fsspec
import numpy as np
import pytest
from click.testing import CliRunner

from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import CacheError

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, eval_views=2, blocks=2, workers=0,
            shard_size=3)


def test_memory_filesystem_extract_resume_and_train(sample_videos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the extraction log of a URL cache goes to the current folder
    url = "memory://evl-test/feats.zarr"
    summary = extract(ExtractConfig(out=url, videos=sample_videos, **TINY))
    assert summary.done == summary.videos and summary.bytes_written > 0
    assert fsspec.filesystem("memory").exists("/evl-test/feats.zarr/tokens/block_3/zarr.json")
    again = extract(ExtractConfig(out=url, videos=sample_videos, **TINY))
    assert again.skipped == again.videos  # resumed: nothing left to do
    local = tmp_path / "local.zarr"
    extract(ExtractConfig(out=local, videos=sample_videos, **TINY))
    with FeatureStore(url) as remote, FeatureStore(local) as disk:
        for name in ("embed", "tokens/block_3", "maps/block_2/prev"):
            np.testing.assert_array_equal(remote.array(name)[...], disk.array(name)[...])
    run = train(TrainConfig(features=url, out=tmp_path / "run", layers=2, epochs=1, batch_size=8, heads=2,
                            workers=0))
    assert run.final["videos"] > 0
    result = CliRunner().invoke(main, ["info", url])
    assert result.exit_code == 0 and "EVL-Tiny" in result.stdout
    fsspec.filesystem("memory").rm("/evl-test", recursive=True)


def test_file_url_with_loader_workers(sample_videos, tmp_path):
    url = f"file://{tmp_path}/feats.zarr"
    result = CliRunner().invoke(main, ["extract", "--videos", str(sample_videos), "--out", url, "--model", "EVL-Tiny",
                                       "--pretrained", "none", "--frames", "4", "--stride", "3", "--blocks", "1",
                                       "--workers", "2"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "feats.zarr" / "zarr.json").exists()
    train(TrainConfig(features=url, out=tmp_path / "run", layers=1, epochs=1, batch_size=8, heads=2, workers=2))


def test_hdf5_urls_are_refused():
    with pytest.raises(CacheError, match="an HDF5 cache must be a local file"):
        FeatureStore("memory://x/feats.h5")
