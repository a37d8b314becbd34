"""Plans: the planned bytes are the bytes an extraction writes, for every encoding; --dry-run writes nothing."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from evl_cache.cache.encodings import ENCODINGS
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.plan import format_plan, plan
from evl_cache.cli import main

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, blocks=2, workers=0)


def _feature_files(cache: Path) -> int:
    """Bytes of the feature arrays' files (chunks and shard indexes; not the metadata or the video table)."""
    return sum(p.stat().st_size for p in cache.rglob("*")
               if p.is_file() and p.name != "zarr.json" and "videos" not in p.relative_to(cache).parts)


@pytest.mark.parametrize("encoding", list(ENCODINGS))
def test_planned_bytes_are_the_bytes_written(sample_videos, tmp_path, encoding):
    # 3 training views and 2 evaluation views per video, shards of 5 (the last one partial)
    config = ExtractConfig(out=tmp_path / "c.zarr", videos=sample_videos, storage=encoding, train_views=3,
                           eval_views=2, shard_size=5, randaugment=False, probe_mb=1, **TINY)
    cache_plan = plan(config)
    extract(config)
    assert cache_plan.total_bytes[encoding] == _feature_files(config.out)
    assert cache_plan.videos == {"train": 12, "val": 8} and cache_plan.views == {"train": 36, "val": 16}
    assert cache_plan.epoch_read_bytes[encoding] == 12 * cache_plan.read_per_view[encoding]
    assert cache_plan.probe is not None and cache_plan.probe.cold_bytes_per_s > 0 and cache_plan.probe.warm_bytes_per_s > 0
    assert not list(tmp_path.glob(".evl-cache-probe-*"))  # the probe file is gone
    text = format_plan(cache_plan)
    assert f"{encoding} (chosen)" in text and "disk probe" in text


def test_dry_run_and_plan_command(sample_videos, tmp_path):
    out = tmp_path / "never.zarr"
    args = ["--videos", str(sample_videos), "--out", str(out)] + [
        f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    result = CliRunner().invoke(main, ["extract", "--dry-run"] + args)
    assert result.exit_code == 0, result.output
    assert "fp16 (chosen)" in result.output and "int4" in result.output and not out.exists()
    result = CliRunner().invoke(main, ["plan", "--json", "--probe-mb", "0", "--storage", "int8"] + args)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["chosen"] == "int8" and plan["probe"] is None
    # EVL-Tiny's 64-wide tokens make the scales a larger share than ViT-B/16's (where int8 is 0.505 of fp16)
    assert plan["total_bytes"]["int8"] < 0.6 * plan["total_bytes"]["fp16"]
    assert plan["total_bytes"]["int4"] < 0.65 * plan["total_bytes"]["int8"]
