"""The results table: one row per run folder, the options that differ, the figures from the run's files."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_pages import check_offline_page

from evl_cache import CompareConfig, compare
from evl_cache.apps.results import markdown_table, read_run, write_results
from evl_cache.cli import main
from evl_cache.decoder.metrics import plot_confusion, plot_curves
from evl_cache.errors import EvlCacheError


def _run(folder, options: dict, top1: float | None, epochs: int = 2):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"layers": 4, "workers": 2, "out": str(folder),
                                                              **options}}))
    lines = [{"event": "epoch", "epoch": e, "epoch_seconds": 1.5, "train_clips_per_s": 10.0 * (e + 1),
              "train_loss": 1.0 / (e + 1), "val_top1": 0.2 * e, "val_top5": 0.5} for e in range(epochs)]
    if top1 is not None:
        lines.append({"event": "summary", "val_top1": top1, "val_top5": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_rows_come_from_the_run_files(tmp_path):
    row = read_run(_run(tmp_path / "full", {}, 0.75))
    assert (row.name, row.top1, row.top5, row.train_seconds, row.clips_per_second) == ("full", 0.75, 1.0, 3.0, 15.0)
    unfinished = read_run(_run(tmp_path / "half", {}, None, epochs=1))
    assert unfinished.status == "unfinished (1 epochs)" and unfinished.top1 is None
    assert read_run(tmp_path / "nothing").status == "missing"


def test_the_table_shows_only_the_options_that_differ(tmp_path):
    rows = compare(CompareConfig([_run(tmp_path / "a", {"workers": 0}, 0.5),
                                  _run(tmp_path / "b", {"layers": 2, "workers": 8}, 0.25)]))
    table = markdown_table(rows).splitlines()
    assert table[0] == "| run | layers | top1 | top5 | parameters | train_s | clips_per_s | status |"
    assert table[2].startswith("| a | 4 | 0.5000 |") and table[3].startswith("| b | 2 | 0.2500 |")
    write_results(tmp_path, rows)
    assert [r["run"] for r in csv.DictReader(open(tmp_path / "results.csv"))] == ["a", "b"]
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b")])
    assert result.exit_code == 0 and result.output == markdown_table(rows)


def test_compare_needs_runs():
    with pytest.raises(EvlCacheError, match="run folders"):
        compare(CompareConfig())


def test_results_html_shows_the_table_and_every_runs_pictures_offline(tmp_path):
    finished = _run(tmp_path / "runs" / "evl", {"layers": 4}, 0.75, epochs=3)
    plot_curves(finished / "curve.png", finished / "metrics.jsonl")
    plot_confusion(finished / "confusion_val.png", np.array([[3, 1], [0, 4]]), ["left", "right"])
    unfinished = _run(tmp_path / "runs" / "half", {"layers": 2}, None, epochs=2)
    out = tmp_path / "compared"
    result = CliRunner().invoke(main, ["compare", str(finished), str(unfinished), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.html", "results.md", "results.png"]
    images, links, text = check_offline_page(out / "results.html")
    # top-1 per run, all runs' curves; the finished run's curves and confusion; the unfinished run's curves so far
    assert len(images) == 5 and links == []
    assert images[0] == (out / "results.png").read_bytes()
    assert (finished / "curve.png").read_bytes() in images and (finished / "confusion_val.png").read_bytes() in images
    assert "evl" in text and "half" in text and "0.7500" in text and "unfinished (2 epochs)" in text
