"""The demo: its scores agree with its runs' own files, its table says what a model blind to frame
order can expect, and the CLI reruns it from what it wrote. At a tiny size, so no accuracy is asserted."""
from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
from click.testing import CliRunner

from evl_cache.apps.demo import DemoConfig, _score, run_demo
from evl_cache.cli import main

TINY = dict(model="EVL-Tiny", train_videos=1, val_videos=1, epochs=1, workers=0, device="cpu")
CLASSES = ["blue_still", "red_still", "slide_left", "slide_right"]  # the cache's order


def test_score_counts_the_twins_against_a_guess_between_them():
    evl = np.array([[6, 0, 0, 0], [0, 6, 0, 0], [0, 0, 5, 1], [0, 1, 0, 5]])
    blind = np.array([[6, 0, 0, 0], [0, 6, 0, 0], [0, 0, 3, 3], [0, 0, 4, 2]])
    results = _score({"evl": {"top1": 22 / 24, "confusion": evl}, "no_temporal": {"top1": 17 / 24, "confusion": blind}},
                     CLASSES)
    assert results.twins == ("slide_left", "slide_right")
    assert (results.videos, results.twin_videos) == (24, 12)
    assert results.runs["evl"].temporal_modules and not results.runs["no_temporal"].temporal_modules
    assert results.runs["evl"].twins_top1 == pytest.approx(10 / 12)  # a twin taken for a still class is wrong
    assert results.runs["no_temporal"].twins_top1 == pytest.approx(5 / 12)
    assert dict(results) == {"evl": pytest.approx(22 / 24), "no_temporal": pytest.approx(17 / 24)}
    assert results.chance == 0.5 and results.chance_sd == pytest.approx(0.5 / np.sqrt(12))
    assert results.blind_top1 == pytest.approx(0.75)
    header, evl_row, blind_row, limit, note = results.table()
    assert header.split()[:4] == ["run", "temporal", "modules", "top-1,"] and "12 of slide_left/slide_right" in header
    assert evl_row.split() == ["evl", "on", "0.917", "0.833"]
    assert blind_row.split() == ["no_temporal", "off", "0.708", "0.417"]
    assert limit.split() == ["blind", "to", "frame", "order", "0.750", "at", "best", "0.500", "=", "chance",
                             "(±", "0.144)"]
    assert note.startswith("slide_left and slide_right show the same frames in opposite orders")


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, run_demo(DemoConfig(out=out, **TINY))


def test_tiny_demo_scores_its_runs_last_weights(tiny_demo):
    out, results = tiny_demo
    assert sorted((out / "videos" / "val").iterdir()) == [out / "videos" / "val" / name for name in CLASSES]
    assert list(results) == ["evl", "no_temporal"]
    for name, run in results.runs.items():
        with open(out / "runs" / name / "per_class_val.csv") as file:
            rows = {row["class"]: row for row in csv.DictReader(file)}
        assert [int(rows[c]["videos"]) for c in CLASSES] == [1, 1, 1, 1]
        correct = {c: int(rows[c]["correct"]) for c in CLASSES}
        assert run.top1 == pytest.approx(sum(correct.values()) / 4)
        assert run.twins_top1 == pytest.approx((correct["slide_left"] + correct["slide_right"]) / 2)
    assert (results.chance, results.blind_top1, results.twin_videos) == (0.5, 0.75, 2)


def test_cli_reruns_the_demo_from_its_files_and_logs_the_table(tiny_demo, caplog):
    out, results = tiny_demo
    weights = out / "runs" / "evl" / "last.safetensors"
    mtime = weights.stat().st_mtime
    options = [f"--{key.replace('_', '-')}={value}" for key, value in TINY.items()]
    with caplog.at_level(logging.INFO, logger="evl_cache.apps.demo"):
        result = CliRunner().invoke(main, ["demo", "--out", str(out), *options])
    assert result.exit_code == 0, result.output
    assert weights.stat().st_mtime == mtime  # finished runs are scored, not trained again
    assert all(name in result.stdout and f"{top1:.3f}" in result.stdout for name, top1 in results.items())
    logged = [r.getMessage() for r in caplog.records if r.name == "evl_cache.apps.demo"]
    assert [f"demo: {line}" for line in results.table()] == [m for m in logged if not m.startswith("demo: videos in")]
