"""Prediction on new videos equals evaluation from a cache, and the spec's equations computed directly."""
import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_evl_checkpoints import authors_checkpoint
from test_model import naive_forward

from evl_cache.apps.predict import OnlineModel, PredictConfig, predict
from evl_cache.cache.dataset import CacheDataset, CacheLoader, select_features, usable_videos
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.decoder.evaluate import EvalConfig, evaluate
from evl_cache.decoder.evl_checkpoints import ImportConfig, import_evl
from evl_cache.decoder.metrics import average_views
from evl_cache.decoder.run import build_model, load_run, load_weights, predict_views, run_selection
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import CacheError
from evl_cache.towers.backbone import load_clip
from evl_cache.video.decode import decode_frames, probe_video
from evl_cache.video.pixels import centre_crop
from evl_cache.video.sampling import dense_eval_indices
from evl_cache.video.synthetic import write_named_pipe


@pytest.fixture(scope="module")
def cache_and_run(tiny_cache, tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    cache = tiny_cache
    with FeatureStore(cache) as store:
        class_names = store.attrs["class_names"]
    names = root / "classes.txt"
    names.write_text("\n".join(class_names))
    authors_checkpoint(root / "evl.pth", layers=2, frames=4, classes=len(class_names))
    run = import_evl(ImportConfig(checkpoint=root / "evl.pth", out=root / "run", model="EVL-Tiny",
                                  pretrained="none", classes=names, stride=3, eval_views=2))
    return cache, run


def test_predict_equals_eval_from_the_cache(cache_and_run, sample_videos):
    cache, run = cache_and_run
    run_config = load_run(run)
    model = build_model(run_config)
    model.load_state_dict(load_file(run / "best.safetensors"))
    with FeatureStore(cache) as store:
        attrs = store.attrs
        videos = usable_videos(store, ("val",))
        paths = store.column("path")
    selection = select_features(attrs, 2, None, 1, True)
    loader = CacheLoader.sequential(CacheDataset(cache, videos, selection), 4)
    cached = average_views(*predict_views(model, loader, torch.device("cpu"), False))
    predictions = predict(PredictConfig(videos=[str(sample_videos / paths[v]) for v in cached["videos"]], run=run))
    for i, prediction in enumerate(predictions):
        assert not prediction.error
        np.testing.assert_allclose(prediction.probabilities, cached["probabilities"][i], atol=2e-4)
        np.testing.assert_allclose(prediction.logits, cached["logits"][i], atol=2e-3, rtol=2e-3)
    metrics = evaluate(EvalConfig(run=run, features=cache, workers=0))
    top1 = np.mean([np.argmax(p.probabilities) == cached["labels"][i] for i, p in enumerate(predictions)])
    assert metrics["top1"] == pytest.approx(top1)


def test_logits_equal_the_spec_computed_directly(cache_and_run, sample_videos):
    """Backbone blocks run by hand, maps by the formula, the decoder by the naive test implementation."""
    _, run = cache_and_run
    online = OnlineModel(run)
    path = sample_videos / "val" / "slide_left" / "slide_left_000.mp4"
    probe = probe_video(path)
    clip, spec = load_clip("EVL-Tiny", "none")
    visual = clip.visual
    views = dense_eval_indices(probe.num_frames, 4, 3, 2)
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
    view_logits = []
    for indices in views:
        x = (centre_crop(decode_frames(path, indices, 32, probe).frames, 32).float() / 255 - mean) / std
        outputs, prevs, nexts = [], [], []
        with torch.no_grad():
            h = visual._embeds(x)
            for b, block in enumerate(visual.transformer.resblocks):
                if b >= 2:
                    y = block.ln_1(h)
                    attn = block.attn
                    q = (y @ attn.in_proj_weight[:64].T + attn.in_proj_bias[:64]).view(4, 17, 2, 32)[:, 1:]
                    k = (y @ attn.in_proj_weight[64:128].T + attn.in_proj_bias[64:128]).view(4, 17, 2, 32)[:, 1:]

                    def amap(t, s):
                        return sum(torch.softmax(q[t, :, hd] @ k[s, :, hd].T / math.sqrt(32), -1) for hd in range(2)) / 2
                    prevs.append(torch.stack([amap(t, t - 1) for t in range(1, 4)])[None].half().double())
                    nexts.append(torch.stack([amap(t, t + 1) for t in range(0, 3)])[None].half().double())
                h = block(h)
                if b >= 2:
                    outputs.append(h[None].half().double())
        model = online.model.double()
        view_logits.append(naive_forward(model, outputs, prevs, nexts))
        online.model.float()
    expected = torch.cat(view_logits).mean(0)
    got = torch.tensor(online.predict(path).logits, dtype=torch.float64)
    assert torch.equal(got.argmax(), expected.argmax())
    assert ((got - expected).norm() / expected.norm()) < 1e-3


def test_predict_cli_folders_lists_and_bad_files(cache_and_run, sample_videos, tmp_path):
    _, run = cache_and_run
    listing = tmp_path / "videos.txt"
    video = sample_videos / "val" / "red_still" / "red_still_000.mp4"
    listing.write_text(f"{video} 1\n")
    bad = tmp_path / "bad.mp4"
    bad.write_text("not a video")
    runner = CliRunner()
    result = runner.invoke(main, ["predict", str(sample_videos / "val" / "blue_still"), str(listing), str(bad),
                                  "--run", str(run), "--topk", "2"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.endswith(tuple("0123456789"))]
    assert len(lines) == 3 and "bad.mp4: error:" in result.output
    result = runner.invoke(main, ["predict", str(video), "--run", str(run), "--json"])
    rows = json.loads(result.stdout)
    assert len(rows[0]["probabilities"]) == len(rows[0]["classes"]) == len(rows[0]["logits"]) == 4
    assert sum(rows[0]["probabilities"]) == pytest.approx(1.0, abs=1e-5)
    result = runner.invoke(main, ["predict", str(bad), "--run", str(run)])
    assert result.exit_code == 1 and "no video could be predicted" in result.output
    # every video failing still prints the JSON, with each video's error
    url = "https://example.com/clip.mp4"
    result = runner.invoke(main, ["predict", str(bad), url, "--run", str(run), "--json"])
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert [row["path"] for row in rows] == [str(bad), url]  # the URL as written, not mangled into a path
    assert rows[0]["error"].startswith("cannot open as a video") and rows[0]["probabilities"] == []
    assert rows[1]["error"] == "URLs are not read: download the video and pass the file"


def test_predict_uses_the_caches_crops_and_normalisation(sample_videos, tmp_path):
    """A cache of 2 temporal x 3 spatial views with ImageNet's mean/std: predict takes the same six views,
    normalised the same way, and gives the probabilities evaluation gives from the cache."""
    cache = tmp_path / "crops.zarr"
    extract(ExtractConfig(out=cache, videos=sample_videos, model="EVL-Tiny", pretrained="none", frames=4, stride=3,
                          eval_views=2, spatial_views=3, mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                          blocks=1, workers=0))
    run = tmp_path / "run"
    train(TrainConfig(features=cache, out=run, head="text", prompt_tokens=2, epochs=1, batch_size=8, workers=0))
    with FeatureStore(cache) as store:
        videos = usable_videos(store, ("val",))
        paths = store.column("path")
    model = build_model(load_run(run))
    load_weights(model, load_file(run / "best.safetensors"), run)
    selection = run_selection(FeatureStore(cache).attrs, load_run(run))
    loader = CacheLoader.sequential(CacheDataset(cache, videos, selection), 8)
    cached = average_views(*predict_views(model, loader, torch.device("cpu"), False))
    assert len(cached["videos"]) == 8
    predictions = predict(PredictConfig(videos=[str(sample_videos / paths[v]) for v in cached["videos"]], run=run))
    for i, prediction in enumerate(predictions):
        np.testing.assert_allclose(prediction.probabilities, cached["probabilities"][i], atol=2e-4)
    # the run evaluates on a cache of the same pixels with another number of crops, not other pixels
    options = dict(videos=sample_videos, model="EVL-Tiny", pretrained="none", frames=4, stride=3, eval_views=2,
                   blocks=1, workers=0)
    extract(ExtractConfig(out=tmp_path / "centre.zarr", mean="0.485,0.456,0.406", std="0.229,0.224,0.225",
                          **options))
    assert evaluate(EvalConfig(run=run, features=tmp_path / "centre.zarr", workers=0))["videos"] == 8
    extract(ExtractConfig(out=tmp_path / "clip_mean.zarr", **options))
    with pytest.raises(CacheError, match="clip_mean.zarr: preprocessing differs from the run's cache"):
        evaluate(EvalConfig(run=run, features=tmp_path / "clip_mean.zarr", workers=0))


def test_a_video_that_hangs_the_decoder_fails_alone_after_the_timeout(cache_and_run, sample_videos, tmp_path):
    _, run = cache_and_run
    hanging = write_named_pipe(tmp_path / "named pipe.mp4")
    video = sample_videos / "val" / "red_still" / "red_still_000.mp4"
    result = CliRunner().invoke(main, ["predict", str(hanging), str(video), "--run", str(run),
                                       "--decode-timeout", "1"])
    assert result.exit_code == 0, result.output
    assert f"{hanging}: error: decoding took longer than 1 s" in result.output
    assert any(line.startswith(f"{video}: ") and "error" not in line for line in result.output.splitlines())
    result = CliRunner().invoke(main, ["predict", str(video), "--run", str(run), "--decode-timeout", "-1"])
    assert result.exit_code == 1 and "--decode-timeout must be 0 (no limit) or more" in result.output


@pytest.fixture(scope="module")
def family_caches(sample_videos, tmp_path_factory):
    """The sample videos cached by a tiny tower of each timm family (made on first use)."""
    root, caches = tmp_path_factory.mktemp("families"), {}

    def cache_of(model):
        if model not in caches:
            caches[model] = root / f"{model}.zarr"
            extract(ExtractConfig(out=caches[model], videos=sample_videos, model=model, pretrained="none", frames=4,
                                  stride=3, eval_views=2, blocks=2, workers=0))
        return caches[model]
    return cache_of


@pytest.mark.parametrize("model, head", [
    ("EVL-Tiny-SL2", "linear"), ("EVL-Tiny-SL2", "attentive-probe"), ("EVL-Tiny-SL2", "clip-text"),
    ("EVL-Tiny-Reg", "linear"), ("EVL-Tiny-Reg", "linear-probe"), ("EVL-Tiny-PE", "attentive-probe"),
    ("EVL-Tiny-EVA02", "linear")])
def test_every_family_and_head_predicts_what_it_evaluates(family_caches, sample_videos, tmp_path, model, head):
    """A run on any tower and head gives the same probabilities for new videos (its backbone online) as for
    the same videos evaluated from its cache."""
    cache = family_caches(model)
    run = tmp_path / "run"
    train(TrainConfig(features=cache, out=run, head=head, layers=2, epochs=1, batch_size=4, workers=0, heads=2))
    run_config = load_run(run)
    model_ = build_model(run_config)
    load_weights(model_, load_file(run / "best.safetensors"), run)
    with FeatureStore(cache) as store:
        attrs, videos, paths = store.attrs, usable_videos(store, ("val",)), store.column("path")
    loader = CacheLoader.sequential(CacheDataset(cache, videos, run_selection(attrs, run_config)), 4)
    cached = average_views(*predict_views(model_, loader, torch.device("cpu"), False))
    predictions = predict(PredictConfig(videos=[str(sample_videos / paths[v]) for v in cached["videos"]], run=run))
    for i, prediction in enumerate(predictions):
        assert not prediction.error
        np.testing.assert_allclose(prediction.probabilities, cached["probabilities"][i], atol=2e-4)
