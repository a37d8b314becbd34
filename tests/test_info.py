"""`evl-cache info`: what a cache holds, as text and as JSON, with the failed videos' reasons."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from evl_cache import InfoConfig, info
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
