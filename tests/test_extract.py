"""Stage one end to end: messy inputs, both store formats, resume after SIGKILL, refusals."""
import errno
import gc
import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import AUTOCAST_TOLERANCE, MAP_TOLERANCE

import evl_cache.cache.extract as extract_module
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import DONE, FAILED, PENDING, FeatureStore
from evl_cache.cache.verify import VerifyConfig, verify
from evl_cache.cli import main
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import CacheError, DatasetError
from evl_cache.towers.backbone import CLIP_MEAN, CLIP_STD, FrozenBackbone, load_clip
from evl_cache.video.clips import ClipSpec
from evl_cache.video.decode import decode_frames, probe_video
from evl_cache.video.pixels import centre_crop
from evl_cache.video.sampling import dense_eval_indices, view_seed, vifi_middle_indices, vifi_random_indices

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
    reasons = {"empty.mp4": "empty file (0 bytes)", "text.mp4": "cannot open as a video: Invalid data",
               "audio_only.mp4": "no video stream", "truncated.mp4": "cannot open as a video",
               "dangling.mp4": "cannot open as a video: No such file"}
    assert {name: by_name[name][1][:len(reason)] for name, reason in reasons.items()} == reasons
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
    np.testing.assert_allclose(cached_tokens, output.block_outputs[1].numpy(), **AUTOCAST_TOLERANCE)
    np.testing.assert_allclose(cached_prev, output.maps_prev[1].numpy(), **MAP_TOLERANCE)
    np.testing.assert_allclose(cached_embed, output.embeddings.numpy(), **AUTOCAST_TOLERANCE)


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


@pytest.mark.slow
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
    assert verify(VerifyConfig(out)).ok  # what was written before the disk filled up is whole
    monkeypatch.setattr(FeatureStore, "write_block", original)
    summary = extract(ExtractConfig(out=out, videos=sample_videos, **TINY))
    assert summary.skipped == 6 and summary.done == summary.videos - 6
    assert verify(VerifyConfig(out)).ok


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


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_spatial_views_and_vifi_sampling_equal_the_crops_computed_directly(sample_videos, tmp_path):
    """2 temporal views (ViFi-CLIP's random segment draws) x 3 crops of frames resized to 32, normalised with
    ImageNet's statistics: view t * 3 + s of a validation video is crop s of draw t; training videos keep
    one plain view (the middle frames, centre crop)."""
    out = tmp_path / "views.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, sampling="vifi", eval_views=2, spatial_views=3,
                          mean=",".join(map(str, IMAGENET_MEAN)), std=",".join(map(str, IMAGENET_STD)), **TINY))
    with FeatureStore(out) as store:
        attrs = store.attrs
        paths, splits, views = list(store.column("path")), store.column("split"), store.column("views")
        embed = np.asarray(store.array("embed")[...])
    assert attrs["preprocessing"] == {"resize": "short_side", "crop": "three", "size": 32,
                                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    assert attrs["sampling"]["mode"] == "vifi" and attrs["sampling"]["views"] == 6
    assert set(views[splits == "val"]) == {6} and set(views[splits == "train"]) == {1}
    clip, _ = load_clip("EVL-Tiny", "none")
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for name, temporal in (("val/slide_left/slide_left_001.mp4", None), ("train/red_still/red_still_002.mp4", 1)):
        index, path = paths.index(name), sample_videos / name
        probe = probe_video(path)
        if temporal is None:  # each view its own seeded draw
            draws = [vifi_random_indices(probe.num_frames, 4, np.random.default_rng(view_seed(0, index, v)))
                     for v in range(2)]
        else:
            draws = [vifi_middle_indices(probe.num_frames, 4)]
        crops = []
        for indices in draws:
            frames = decode_frames(path, indices, 32, probe).frames  # 32 x 42 from 40 x 52
            step = (frames.shape[2] - 32) // 2
            lefts = (0, 2 * step, step) if temporal is None else (step,)
            crops += [torch.from_numpy(frames[:, :, left:left + 32].copy()).permute(0, 3, 1, 2) for left in lefts]
        pixels = (torch.stack(crops).flatten(0, 1).float() / 255 - mean) / std
        with torch.no_grad():
            expected = clip.encode_image(pixels).view(len(crops), 4, -1).numpy()
        np.testing.assert_allclose(embed[index, :len(crops)], expected, **AUTOCAST_TOLERANCE)
        assert not embed[index, len(crops):].any()
    assert verify(VerifyConfig(out)).ok
    text = CliRunner().invoke(main, ["info", str(out)]).output
    assert "vifi 4 frames" in text and "2 x 3 spatial eval views" in text
    assert "three crops of 32, mean 0.485,0.456,0.406, std 0.229,0.224,0.225" in text


def test_default_records_are_those_of_caches_made_before_the_options(messy_cache):
    """A default extraction describes itself exactly as before resize, crops and mean/std were options, so
    old caches resume and serve runs as they did; their records read back with the old meaning."""
    out, _ = messy_cache
    with FeatureStore(out) as store:
        attrs = store.attrs
    assert attrs["preprocessing"] == {"resize": "short_side", "crop": "centre", "size": 32,
                                      "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    spec = ClipSpec.from_cache(attrs)
    assert spec.resize == 32 and spec.spatial_views == 1 and spec.views("val") == 2 and spec.views("train") == 1


def test_view_and_normalisation_options_are_checked(sample_videos, tmp_path):
    runner = CliRunner()
    for extra, message in ((["--spatial-views", "2"], "--spatial-views must be one of 1, 3"),
                           (["--spatial-views", "3", "--resize", "40"], "--resize must equal the input size 32"),
                           (["--resize", "20"], "--resize 20 is below the input size 32"),
                           (["--mean", "0.5,0.5"], "--mean '0.5,0.5': give three comma-separated numbers"),
                           (["--std", "0.2,0,0.2"], "--std '0.2,0,0.2': give three comma-separated numbers, R,G,B, "
                                                    "all positive")):
        result = runner.invoke(main, ["extract"] + _cli_args(sample_videos, tmp_path / "x.zarr") + extra)
        assert result.exit_code == 1 and message in result.output, (extra, result.output)
        assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1


def test_embeddings_only_cache(sample_videos, tmp_path):
    """--blocks 0 stores only the per-frame CLIP embeddings: all that zero-shot and the text heads read."""
    out = tmp_path / "embed.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, **{**TINY, "blocks": 0}))
    reference = tmp_path / "full.zarr"
    extract(ExtractConfig(out=reference, videos=sample_videos, **TINY))
    with FeatureStore(out) as store, FeatureStore(reference) as full:
        assert store.attrs["blocks"] == [] and store.attrs["stored"] == ["embed"]
        assert not store.has("tokens/block_3") and not store.has("maps/block_3/prev")
        np.testing.assert_array_equal(np.asarray(store.array("embed")[...]), np.asarray(full.array("embed")[...]))
        assert full.attrs["stored"] == ["tokens", "maps", "embed"]
    assert verify(VerifyConfig(out)).ok
    with pytest.raises(CacheError, match="--layers 4 needs 4 cached blocks; the cache holds 0"):
        train(TrainConfig(features=out, out=tmp_path / "run", workers=0))


def test_folders_that_cannot_be_read_are_named_in_the_summary(sample_videos, tmp_path, monkeypatch):
    videos = tmp_path / "videos"
    shutil.copytree(sample_videos / "train", videos)
    hidden_class = sorted(p.name for p in videos.iterdir())[0]
    scandir = os.scandir

    def refusing(path="."):  # as listing a folder without read permission does (tests run as root)
        if isinstance(path, (str, os.PathLike)) and Path(path).name == hidden_class:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing)
    summary = extract(ExtractConfig(out=tmp_path / "c.zarr", videos=videos, **TINY))
    assert summary.unreadable_folders == [f"{videos / hidden_class}: Permission denied"]
    assert summary.done == 9 and "1 folder(s) could not be read" in summary.line()


def test_extraction_moves_only_the_image_tower_to_its_device(sample_videos, tmp_path, monkeypatch, device):
    """CLIP is built on the CPU; the frozen image tower alone goes to the device, and the text tower is
    freed once the tower is made (it never reaches a GPU)."""
    built = []

    def spy(*args, **kwargs):
        clip, spec = load_clip(*args, **kwargs)
        built.append((args[3], weakref.ref(clip.transformer)))
        return clip, spec

    monkeypatch.setattr(extract_module, "load_clip", spy)
    tower = extract_module.load_tower(ExtractConfig(out=tmp_path / "x.zarr", videos=sample_videos, **TINY), device)
    gc.collect()
    assert built[0][0] == "cpu" and built[0][1]() is None
    assert {p.device.type for p in tower.backbone.parameters()} == {device.type}


@pytest.mark.parametrize("model, family, prefix", [("EVL-Tiny-SL2", "timm-vit", 0), ("EVL-Tiny-Reg", "timm-vit", 5),
                                                   ("EVL-Tiny-PE", "timm-eva", 1)])
def test_every_family_is_cached_with_its_prefix_tokens(sample_videos, tmp_path, model, family, prefix):
    """The cache records the tower's family and prefix tokens (from format 3; it writes 4) and holds
    L = prefix + P tokens per frame, equal to the backbone's on the same frames; verify reads the layout back."""
    out = tmp_path / "feats.zarr"
    extract(ExtractConfig(out=out, videos=sample_videos, **{**TINY, "model": model}))
    with FeatureStore(out) as store:
        attrs, tokens = store.attrs, store.array("tokens/block_3")
        assert attrs["format_version"] == 4 and tokens.shape[3:] == (prefix + 16, 64)
        index = list(store.column("path")).index("val/slide_left/slide_left_000.mp4")
        cached = np.asarray(tokens[index])
    assert (attrs["backbone"]["family"], attrs["backbone"]["prefix_tokens"]) == (family, prefix)
    path = sample_videos / "val" / "slide_left" / "slide_left_000.mp4"
    probe = probe_video(path)
    clips = torch.stack([centre_crop(decode_frames(path, v, 32, probe).frames, 32)
                         for v in dense_eval_indices(probe.num_frames, 4, 3, 3)])
    clip, spec = load_clip(model, "none")
    output = FrozenBackbone(clip.visual, 1, spec.mean, spec.std, model)(clips)
    np.testing.assert_allclose(cached, output.block_outputs[0].numpy(), **AUTOCAST_TOLERANCE)
    assert verify(VerifyConfig(cache=out)).ok


def test_a_cache_of_format_2_reads_resumes_and_trains_as_an_open_clip_vit(sample_videos, tmp_path):
    """Caches made before format 3 have no family or prefix count in their backbone record: they are of an
    open_clip ViT with one class token, and read, resume and train as such."""
    out = tmp_path / "feats.zarr"
    options = dict(out=out, videos=sample_videos, **TINY)
    extract(ExtractConfig(**options))
    with FeatureStore(out, mode="r+") as store:
        attrs = store.attrs
        for key in ("family", "prefix_tokens"):
            del attrs["backbone"][key]
        store.set_attrs({**attrs, "format_version": 2})
        store.write_rows("status", 0, np.where(np.arange(store.num_videos) == 0, PENDING, DONE).astype(np.uint8))
    summary = extract(ExtractConfig(**options))  # the same options resume it: the same identity
    assert summary.done == 1 and verify(VerifyConfig(cache=out)).ok
    result = train(TrainConfig(features=out, out=tmp_path / "run", layers=2, epochs=1, batch_size=4, workers=0))
    run_config = (tmp_path / "run" / "config.json").read_text()
    assert result.steps > 0 and '"prefix_tokens": 1' in run_config
