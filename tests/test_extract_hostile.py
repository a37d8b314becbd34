"""Extraction against hostile inputs: odd names, extreme sizes and lengths, a file that hangs the decoder,
bad list files and a cache from a newer evl-cache. Each bad input fails alone with a one-line reason."""
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import DONE, FAILED, FeatureStore
from evl_cache.cache.verify import VerifyConfig, verify
from evl_cache.cli import main
from evl_cache.errors import CacheError
from evl_cache.video.synthetic import (
    moving_shape_frames,
    restart_timestamps,
    write_named_pipe,
    write_two_stream_video,
    write_video,
)

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, blocks=2, shard_size=2, eval_views=2)


def _gradient_frames(count: int, height: int, width: int) -> np.ndarray:
    """Smooth moving gradients: large frames that encode fast."""
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(xx + 9 * t) % 256, yy % 256, (xx + yy + 5 * t) % 256], -1).astype(np.uint8)
                     for t in range(count)])


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """One extraction over a folder of hostile videos, into a path with spaces and non-ASCII names."""
    base = tmp_path_factory.mktemp("hostile")
    root = base / "vidéos à traiter 视频"
    videos = root / "classe ünï 类"
    rng = np.random.default_rng(0)
    write_video(videos / "4k 3840x2160.mkv", _gradient_frames(3, 2160, 3840), codec="mpeg4")
    write_video(videos / "one pixel.mkv", rng.integers(0, 256, (5, 1, 1, 3), dtype=np.uint8))
    write_video(videos / "one frame.mp4", moving_shape_frames(1, 32, 40, "square", (200, 40, 40), "right", rng))
    # a header that says ten hours: two frames, 0 s and 36000 s apart
    write_video(videos / "ten hours.mp4", moving_shape_frames(2, 32, 40, "square", (200, 40, 40), "right", rng),
                frame_times=[0.0, 36000.0])
    write_video(videos / "écrit normalement 正常.mp4",
                moving_shape_frames(20, 32, 40, "circle", (40, 60, 220), "left", rng))
    write_named_pipe(videos / "named pipe.mp4")
    (root / "empty class").mkdir()
    out = base / "sortie ü 缓存" / "caché 特征.zarr"
    out.parent.mkdir()
    logger = logging.getLogger("evl_cache.video.find")
    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logger.addHandler(handler)
    started = time.perf_counter()
    try:
        summary = extract(ExtractConfig(out=out, videos=root, workers=0, decode_timeout=1.0, **TINY))
    finally:
        logger.removeHandler(handler)
    with FeatureStore(out) as store:
        rows = {Path(p).name: (int(s), str(e), int(f), int(v)) for p, s, e, f, v in zip(
            store.column("path"), store.column("status"), store.column("error"), store.column("frames"),
            store.column("views"))}
    return {"out": out, "root": root, "summary": summary, "rows": rows, "warnings": warnings,
            "seconds": time.perf_counter() - started}


def test_spaces_and_non_ascii_names(hostile):
    status, error, frames, views = hostile["rows"]["écrit normalement 正常.mp4"]
    assert (status, error, frames, views) == (DONE, "", 20, 2)
    result = CliRunner().invoke(main, ["info", str(hostile["out"]), "--failed"])
    assert result.exit_code == 0 and "named pipe.mp4: decoding took longer than 1 s" in result.output
    assert verify(VerifyConfig(hostile["out"])).ok


def test_huge_and_one_pixel_frames(hostile):
    assert hostile["rows"]["4k 3840x2160.mkv"] == (DONE, "", 3, 2)
    assert hostile["rows"]["one pixel.mkv"] == (DONE, "", 5, 2)


def test_one_frame_and_a_ten_hour_header_with_two_frames(hostile):
    assert hostile["rows"]["one frame.mp4"] == (DONE, "", 1, 2)
    assert hostile["rows"]["ten hours.mp4"] == (DONE, "", 2, 2)


def test_a_file_that_hangs_the_decoder_fails_within_the_timeout(hostile):
    assert hostile["rows"]["named pipe.mp4"] == (FAILED, "decoding took longer than 1 s", 0, 0)
    summary = hostile["summary"]
    assert (summary.done, summary.failed) == (5, 1)
    assert hostile["seconds"] < 60


def test_the_timeout_holds_in_dataloader_workers_too(hostile, tmp_path):
    out = tmp_path / "workers.zarr"
    flags = ["--videos", str(hostile["root"]), "--out", str(out), "--workers", "1", "--decode-timeout", "1"]
    for key, value in TINY.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    result = CliRunner().invoke(main, ["extract"] + flags)
    assert result.exit_code == 0, result.output
    assert "5 done, 1 failed" in result.output
    with FeatureStore(out) as store:
        errors = dict(zip(store.column("path"), store.column("error")))
    assert errors["classe ünï 类/named pipe.mp4"] == "decoding took longer than 1 s"


def test_a_class_folder_without_videos_is_warned_about(hostile):
    assert any("empty class: class folder holds no videos" in w for w in hostile["warnings"])


def test_list_with_duplicates_and_labels_out_of_range(hostile, tmp_path):
    listing = tmp_path / "list.txt"
    listing.write_text("classe ünï 类/one frame.mp4 0\n"
                       "classe ünï 类/ten hours.mp4 1\n"
                       "classe ünï 类/one frame.mp4 0\n"  # the same path again
                       "classe ünï 类/./ten hours.mp4 1\n"  # the same file, spelled differently
                       "classe ünï 类/one pixel.mkv 7\n")  # out of range of the 2 class names
    classes = tmp_path / "classes.txt"
    classes.write_text("a\nb\n")
    summary = extract(ExtractConfig(out=tmp_path / "l.zarr", train_list=listing, data_root=hostile["root"],
                                    classes=classes, workers=0, **TINY))
    assert (summary.done, summary.failed) == (2, 3)
    with FeatureStore(tmp_path / "l.zarr") as store:
        rows = list(zip(store.column("status"), store.column("error")))
    assert rows == [(DONE, ""), (DONE, ""), (FAILED, "list.txt line 3: duplicate of line 1"),
                    (FAILED, "list.txt line 4: duplicate of line 2"), (FAILED, "list.txt line 5: label 7 is out of range")]


def test_a_cache_from_a_newer_version_is_refused(hostile, tmp_path):
    out = tmp_path / "newer.zarr"
    shutil.copytree(hostile["out"], out)
    with FeatureStore(out, mode="r+") as store:
        store.set_attrs({**store.attrs, "format_version": 5})
    reason = ("cache format version 5 is not supported (this evl-cache reads versions 1, 2, 3, 4); upgrade evl-cache "
              "or re-extract")
    with pytest.raises(CacheError, match=r"version 5 is not supported"):
        extract(ExtractConfig(out=out, videos=hostile["root"], workers=0, decode_timeout=1.0, **TINY))
    runner = CliRunner()
    for command in (["info", str(out)], ["verify", str(out)],
                    ["train", "--features", str(out), "--out", str(tmp_path / "run"), "--workers", "0"]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1, (command, result.output)
        assert result.output == f"error: {out}: {reason}\n", command
    assert not (tmp_path / "run").exists()


def test_videos_that_needed_care_are_extracted_with_their_notes(tmp_path):
    rng = np.random.default_rng(1)
    videos = tmp_path / "videos" / "cls"
    frames = moving_shape_frames(24, 32, 40, "square", (200, 40, 40), "right", rng)
    write_two_stream_video(videos / "with a thumbnail track.mkv", frames, frames[:4], default="main")
    plain = write_video(tmp_path / "plain.mkv", frames, keyframe_interval=6)
    restart_timestamps(plain, videos / "joined.mkv", at=12)
    write_video(videos / "healthy.mp4", frames)
    out = tmp_path / "c.zarr"
    summary = extract(ExtractConfig(out=out, videos=tmp_path / "videos", workers=0, **TINY))
    assert (summary.done, summary.failed) == (3, 0)
    with FeatureStore(out) as store:
        notes = dict(zip((Path(p).name for p in store.column("path")), store.column("note")))
    assert notes["healthy.mp4"] == ""
    assert "video stream" in notes["with a thumbnail track.mkv"] and "(default)" in notes["with a thumbnail track.mkv"]
    assert "decode order" in notes["joined.mkv"]
    result = CliRunner().invoke(main, ["info", str(out), "--notes", "--json"])
    listed = {Path(item["path"]).name: item["note"] for item in json.loads(result.stdout)["notes"]}
    assert listed == {name: note for name, note in notes.items() if note}
    assert "2 videos needed care in decoding" in CliRunner().invoke(main, ["info", str(out)]).output
