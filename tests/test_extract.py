"""Stage one end to end: messy inputs, both store formats, resume after SIGKILL, refusals."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from evl_cache.backbone import FrozenBackbone, load_clip
from evl_cache.cli import main
from evl_cache.decode import decode_frames, probe_video
from evl_cache.errors import CacheError, DatasetError
from evl_cache.extract import ExtractConfig, extract
from evl_cache.pixels import centre_crop
from evl_cache.sampling import dense_eval_indices
from evl_cache.store import DONE, FAILED, PENDING, FeatureStore
from evl_cache.verify import verify

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, blocks=2, workers=0, shard_size=3)


def _arrays(path):
    """Every array of a cache, as numpy (strings as str)."""
    with FeatureStore(path) as store:
        names = ["embed"] + [f"tokens/block_{b}" for b in store.attrs["blocks"]] + [
            f"maps/block_{b}/{d}" for b in store.attrs["blocks"] for d in ("prev", "next")]
        arrays = {name: np.asarray(store.array(name)[...]) for name in names}
        for column in ("path", "label", "split", "frames", "views", "status", "error"):
            arrays[column] = store.column(column)
    return arrays


@pytest.fixture(scope="module")
def messy_cache(messy_videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("messy_cache") / "feats.zarr"
    summary = extract(ExtractConfig(out=out, videos=messy_videos, eval_views=2, **TINY))
    return out, summary


def test_bad_inputs_are_recorded_not_fatal(messy_cache):
    out, summary = messy_cache
    arrays = _arrays(out)
    by_name = {Path(p).name: (s, e, f) for p, s, e, f in zip(arrays["path"], arrays["status"],
                                                              arrays["error"], arrays["frames"])}
    bad = {"empty.mp4", "text.mp4", "audio_only.mp4", "truncated.mp4", "dangling.mp4"}
    for name, (status, error, frames) in by_name.items():
        if name in bad:
            assert status == FAILED and error, name
        else:
            assert status == DONE and not error and frames > 0, (name, error)
    assert summary.failed == len(bad) and summary.done == len(by_name) - len(bad)
    assert "no video stream" in by_name["audio_only.mp4"][1].lower() or by_name["audio_only.mp4"][1]
    assert by_name["short.mp4"][2] == 3 and by_name["no_frame_count.ts"][2] == 30


def test_cache_equals_backbone_on_the_same_frames(messy_cache, messy_videos):
    out, _ = messy_cache
    with FeatureStore(out) as store:
        paths = list(store.column("path"))
        index = paths.index("good/portrait.mp4")
        cached_tokens = np.asarray(store.array("tokens/block_3")[index])
        cached_prev = np.asarray(store.array("maps/block_3/prev")[index])
        cached_embed = np.asarray(store.array("embed")[index])
    path = messy_videos / "good" / "portrait.mp4"
    probe = probe_video(path)
    views = dense_eval_indices(probe.num_frames, 4, 3, 2)
    clips = torch.stack([centre_crop(decode_frames(path, v, 32, probe).frames, 32) for v in views])
    clip, spec = load_clip("EVL-Tiny", "none")
    output = FrozenBackbone(clip.visual, 2, spec.mean, spec.std)(clips)
    np.testing.assert_allclose(cached_tokens, output.block_outputs[1].numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(cached_prev, output.maps_prev[1].numpy(), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(cached_embed, output.embeddings.numpy(), rtol=2e-3, atol=2e-3)


def test_short_video_is_padded(messy_cache):
    out, _ = messy_cache
    with FeatureStore(out) as store:
        index = list(store.column("path")).index("good/short.mp4")
        tokens = np.asarray(store.array("tokens/block_3")[index, 0])
    # 3 frames, 4 sampled at stride 3: indices 0, 2, 2, 2 -> the last three frames are the same frame
    np.testing.assert_array_equal(tokens[1], tokens[3])
    assert not np.array_equal(tokens[0], tokens[1])


def test_zarr_and_hdf5_hold_the_same_arrays(sample_videos, tmp_path):
    options = dict(videos=sample_videos, train_views=2, eval_views=2, **TINY)
    extract(ExtractConfig(out=tmp_path / "a.zarr", **options))
    extract(ExtractConfig(out=tmp_path / "a.h5", **options))
    a, b = _arrays(tmp_path / "a.zarr"), _arrays(tmp_path / "a.h5")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with FeatureStore(tmp_path / "a.zarr") as za, FeatureStore(tmp_path / "a.h5") as hb:
        assert za.attrs["class_names"] == hb.attrs["class_names"]
        assert za.attrs["sampling"] == hb.attrs["sampling"]


def _cli_args(videos, out):
    args = ["--videos", str(videos), "--out", str(out)]
    for key, value in {**TINY, "shard_size": 2, "batch_size": 1, "train_views": 2}.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_killed_extraction_resumes_to_the_same_cache(sample_videos, tmp_path):
    reference = tmp_path / "reference.zarr"
    result = CliRunner().invoke(main, ["extract"] + _cli_args(sample_videos, reference))
    assert result.exit_code == 0, result.output
    out = tmp_path / "killed.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "evl_cache.cli", "extract"] + _cli_args(sample_videos, out),
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = Path(str(out) + ".extract.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count('"shard"') >= 2:
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    with FeatureStore(out) as store:
        status = store.column("status")
    assert (status == PENDING).any() and (status == DONE).any(), "the kill did not land mid-way"
    result = CliRunner().invoke(main, ["extract"] + _cli_args(sample_videos, out))
    assert result.exit_code == 0, result.output
    assert "skipped (already done)" in result.output
    a, b = _arrays(reference), _arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_different_configuration_is_refused(sample_videos, tmp_path):
    out = tmp_path / "c.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, **TINY))
    with pytest.raises(CacheError, match=r"sampling.frames: cache has 4, asked for 5.*--overwrite"):
        extract(ExtractConfig(out=out, videos=sample_videos, **{**TINY, "frames": 5}))
    summary = extract(ExtractConfig(out=out, videos=sample_videos, overwrite=True, **{**TINY, "frames": 5}))
    assert summary.done == summary.videos and summary.skipped == 0


def test_cli_errors_are_one_line(tmp_path, sample_videos):
    runner = CliRunner()
    result = runner.invoke(main, ["extract", "--videos", str(tmp_path / "missing"), "--out", str(tmp_path / "x.zarr")])
    assert result.exit_code == 1 and result.output.strip().count("\n") == 0
    assert "missing: videos folder not found" in result.output
    result = runner.invoke(main, ["extract"] + _cli_args(sample_videos, tmp_path / "no" / "dir" / "x.zarr"))
    assert result.exit_code == 1 and "output folder does not exist" in result.output
    result = runner.invoke(main, ["extract"] + _cli_args(sample_videos, tmp_path / "x.npy"))
    assert result.exit_code == 1 and "must end in .zarr" in result.output


def test_all_videos_failing_is_a_failed_job(tmp_path):
    (tmp_path / "videos" / "cls").mkdir(parents=True)
    (tmp_path / "videos" / "cls" / "a.mp4").write_text("not a video")
    with pytest.raises(DatasetError, match="no video could be extracted"):
        extract(ExtractConfig(out=tmp_path / "x.zarr", videos=tmp_path / "videos", **TINY))


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


def test_full_disk_stops_cleanly_and_resumes(sample_videos, tmp_path, monkeypatch):
    import errno
    out = tmp_path / "full.zarr"
    original = FeatureStore.write_block
    calls = {"n": 0}

    def failing_write(self, name, start, values):
        if start >= 6:  # the third shard of 3 videos onwards: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        calls["n"] += 1
        return original(self, name, start, values)

    monkeypatch.setattr(FeatureStore, "write_block", failing_write)
    with pytest.raises(CacheError, match="disk full while writing shard 2; shards written before stay valid"):
        extract(ExtractConfig(out=out, videos=sample_videos, **TINY))
    with FeatureStore(out) as store:
        status = store.column("status")
    assert (status[:6] == DONE).all() and (status[6:] == PENDING).all()
    assert verify(out).ok  # what was written before the disk filled up is whole
    monkeypatch.setattr(FeatureStore, "write_block", original)
    summary = extract(ExtractConfig(out=out, videos=sample_videos, **TINY))
    assert summary.skipped == 6 and summary.done == summary.videos - 6
    assert verify(out).ok


def test_options_from_a_toml_file(sample_videos, tmp_path):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(f'[extract]\nvideos = "{sample_videos}"\nmodel = "EVL-Tiny"\npretrained = "none"\n'
                      f'frames = 3\nstride = 2\nblocks = 1\nworkers = 0\n')
    out = tmp_path / "t.zarr"
    result = CliRunner().invoke(main, ["extract", "--config", str(recipe), "--out", str(out), "--frames", "5"])
    assert result.exit_code == 0, result.output
    with FeatureStore(out) as store:
        attrs = store.attrs
    assert attrs["sampling"]["frames"] == 5 and attrs["sampling"]["stride"] == 2 and attrs["blocks"] == [3]
    assert attrs["extract_config"]["model"] == "EVL-Tiny"
    recipe.write_text('[extract]\nframs = 3\n')
    result = CliRunner().invoke(main, ["extract", "--config", str(recipe), "--out", str(out)])
    assert result.exit_code == 1 and "unknown option(s) frams" in result.output
