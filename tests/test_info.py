"""`evl-cache info`: what a cache holds, as text and as JSON, with the failed videos' reasons and, with
--stats, its tower's feature statistics per cached block."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from evl_cache import ExtractConfig, InfoConfig, extract, info
from evl_cache.cache.info import format_info
from evl_cache.cli import main
from evl_cache.errors import EvlCacheError


def test_info_reports_the_cache(messy_cache):
    out, summary = messy_cache
    result = CliRunner().invoke(main, ["info", str(out), "--json", "--failed"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["status"]["done"] == summary.done and info["status"]["failed"] == summary.failed
    assert info["blocks"] == [2, 3] and info["classes"] == ["bad", "good"]
    assert {Path(f["path"]).name for f in info["failed"]} >= {"empty.mp4", "text.mp4"}
    text = CliRunner().invoke(main, ["info", str(out)]).output
    assert "EVL-Tiny" in text and "failed" in text


def test_info_of_the_python_api_is_what_the_command_prints(tiny_cache):
    described = info(InfoConfig(tiny_cache))
    assert described["videos"] == 20 and described["splits"] == {"train": {"done": 12}, "val": {"done": 8}}
    assert described["storage"] == {"encoding": "fp16", "compress": "none"} and "failed" not in described
    assert CliRunner().invoke(main, ["info", str(tiny_cache)]).output.strip() == format_info(described)
    with pytest.raises(EvlCacheError, match="a cache path is required"):
        info(InfoConfig())


def test_info_stats_show_the_towers_outlier_channels_and_high_norm_tokens(sample_videos, tiny_cache, tmp_path):
    """--stats: per cached block, the spread of channel magnitudes and the share of high-norm tokens, from
    the decoded tokens (here int8 codes of the outlier tower, against float16 random weights)."""
    outlier = tmp_path / "outliers.zarr"
    extract(ExtractConfig(out=outlier, videos=sample_videos, model="EVL-Tiny", pretrained="none+outliers", frames=4,
                          stride=3, blocks=2, eval_views=1, workers=0, storage="int8"))
    stats = info(InfoConfig(outlier, stats=True))["stats"]
    assert list(stats) == ["2", "3"]
    for block in stats.values():
        assert len(block["outlier_channels"]) == 3 and 50 <= block["channel_spread"] <= 500
        assert block["high_norm_share"] == pytest.approx(1 / 17)  # EVL-Tiny's one sink patch of 16, and CLS
        assert block["videos"] == 8 and block["tokens"] == 8 * 4 * 17
    for block in info(InfoConfig(tiny_cache, stats=True))["stats"].values():
        assert block["outlier_channels"] == [] and block["channel_spread"] < 5 and block["high_norm_share"] == 0
    text = CliRunner().invoke(main, ["info", str(outlier), "--stats"]).output
    assert "stats:      block 2: channel spread" in text and "3 outlier channel(s)" in text
    assert "5.9 % of tokens above 4x the median norm" in text
    assert "measured on the first 8 videos: tokens' median per-channel error" in text
    assert "stats" not in info(InfoConfig(outlier))
