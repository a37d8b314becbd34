"""Extraction's options are checked before anything is read or written, and decide the cache's shapes and
identity."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from evl_cache import ExtractConfig
from evl_cache.cache.options import (
    cache_layout,
    channel_values,
    check_sizes,
    clip_spec_of,
    dataset_fingerprint,
    dataset_of,
    output_paths,
    validate,
)
from evl_cache.errors import EvlCacheError
from evl_cache.video.find import VideoEntry, VideoList


def _config(**options) -> ExtractConfig:
    return ExtractConfig(**{"out": Path("c.zarr"), "videos": Path("v"), **options})


@pytest.mark.parametrize("options, message", [
    ({"frames": 0}, "--frames must be at least 1"),
    ({"frames": 1}, "temporal maps pair adjacent frames"),
    ({"blocks": -1}, "--blocks must be 0"),
    ({"workers": -1}, "--workers must be 0"),
    ({"decode_timeout": -1.0}, "--decode-timeout"),
    ({"probe_mb": -1.0}, "--probe-mb"),
    ({"spatial_views": 2}, "--spatial-views must be one of 1, 3"),
    ({"mean": "0.5,0.5"}, "three comma-separated numbers"),
    ({"std": "1,0,1"}, "all positive"),
    ({"list": Path("a.csv"), "train_list": Path("b.csv")}, "--list is the same as --train-list"),
    ({"out": Path("c.h5"), "compress": "zstd"}, "for Zarr caches"),
    ({"out": Path("c.npy")}, "must end in .zarr"),
    ({"out": None}, "--out is required"),
    ({"dataset": "ucf101", "root": Path("r")}, "--dataset reads its own files under --root: leave out --videos"),
    ({"videos": None, "dataset": "ucf101"}, "--dataset and --root go together"),
    ({"videos": None, "root": Path("r")}, "--dataset and --root go together"),
    ({"videos": None, "dataset": "ssv2", "root": Path("r"), "fold": 2}, "--fold picks the official split of "
                                                                        "--dataset ucf101 or hmdb51"),
])
def test_options_that_cannot_work_are_refused(options, message):
    with pytest.raises(EvlCacheError, match=message):
        validate(_config(**options))


def test_sizes_are_checked_once_the_input_size_is_known():
    check_sizes(_config(resize=256), 224)
    with pytest.raises(EvlCacheError, match="below the input size"):
        check_sizes(_config(resize=200), 224)
    with pytest.raises(EvlCacheError, match="--resize must equal the input size"):
        check_sizes(_config(resize=256, spatial_views=3), 224)
    assert channel_values("0.1, 0.2,0.3", "mean") == (0.1, 0.2, 0.3)


def test_views_per_video_are_the_most_any_split_needs(sample_videos):
    config = _config(videos=sample_videos, train_views=2, eval_views=3, spatial_views=3, frames=4, blocks=2)
    dataset = dataset_of(config)
    layout = cache_layout(config, dataset, width=64, layers=4, grid=(4, 4), embed_dim=32)
    assert layout.views == 9 and layout.blocks == (2, 3) and layout.tokens == 17
    spec = clip_spec_of(config, 32)
    assert (spec.views("train"), spec.views("val")) == (2, 9)
    only_train = dataclasses.replace(config, eval_views=1, spatial_views=1)
    assert cache_layout(only_train, dataset, 64, 4, (4, 4), 32).views == 2


def test_the_output_and_its_part_files_are_never_inputs(tmp_path):
    (tmp_path / "c.part-0-of-2.h5").write_bytes(b"")
    (tmp_path / "c.part-1-of-2.h5").write_bytes(b"")
    config = _config(out=tmp_path / "c.h5")
    assert [p.name for p in output_paths(config)] == ["c.h5", "c.part-0-of-2.h5", "c.part-1-of-2.h5"]
    assert output_paths(_config(out="memory://x/c.zarr")) == []


def test_segments_are_part_of_the_fingerprint_and_plain_entries_hash_as_before(tmp_path):
    def fingerprint(*entries):
        return dataset_fingerprint(VideoList(tmp_path, list(entries), ["run"]))

    before_segments = hashlib.sha256(json.dumps(["run"]).encode())
    before_segments.update(b"a.mp4\t0\ttrain\t\n")
    assert fingerprint(VideoEntry("a.mp4", 0, "train")) == before_segments.hexdigest()  # old caches resume
    cuts = [fingerprint(VideoEntry("a.mp4", 0, "train", segment=s)) for s in [(1.0, 2.0), (1.0, 3.0), (0.5, 2.0)]]
    assert len(set(cuts) | {before_segments.hexdigest()}) == 4
