"""`explain`: the decoder's own attention and logits, the same for a cached video and its file, pages that
work offline, frames only from the file that was cached, the text head's per-frame similarities."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_pages import check_offline_page

from evl_cache import ExplainConfig, explain
from evl_cache.apps.explain import best_matches, cached_frames, cached_videos, new_videos
from evl_cache.cache.dataset import CacheDataset, CacheLoader, usable_videos
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.decoder.run import build_model, load_run, load_weights, predict_views, run_selection
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import EvlCacheError
from evl_cache.video.clips import ClipSpec, read_video_clips
from evl_cache.video.synthetic import numbered_frames, write_video

TINY_RUN = dict(batch_size=8, workers=0, heads=2, mlp_dropout=0, head_dropout=0, epochs=1)


@pytest.fixture(scope="module")
def runs(tiny_cache, tmp_path_factory):
    """Runs on the tiny cache: EVL (2 layers), EVL without temporal modules, a text head."""
    root = tmp_path_factory.mktemp("explain_runs")
    made = {"evl": dict(layers=2), "no_temporal": dict(layers=1, temporal_conv=False, temporal_pos_embed=False,
                                                       temporal_cross_attention=False),
            "text": dict(head="text", prompt_tokens=2), "probe": dict(head="attentive-probe", probe_queries=2),
            "linear_probe": dict(head="linear-probe")}
    for name, options in made.items():
        train(TrainConfig(features=tiny_cache, out=root / name, **TINY_RUN, **options))
    return {name: root / name for name in made}


@pytest.fixture(scope="module")
def val_rows(tiny_cache):
    with FeatureStore(tiny_cache) as store:
        rows = usable_videos(store, ("val",))
        return {int(row): str(store.column("path")[row]) for row in rows[:2]}


def _model_probabilities(run, cache, row):
    """What evaluation's own code gives for the row's views, without any recording."""
    run_config = load_run(run)
    with FeatureStore(cache) as store:
        selection = run_selection(store.attrs, run_config)
    model = build_model(run_config)
    load_weights(model, load_file(run / "best.safetensors"), run)
    dataset = CacheDataset(cache, np.array([row]), selection, views="all")
    return predict_views(model, CacheLoader.sequential(dataset, 8), torch.device("cpu"), False)[0].numpy()


@pytest.mark.parametrize("name", ["evl", "no_temporal", "probe"])
def test_a_cached_video_and_its_file_give_the_same_explanation(runs, tiny_cache, sample_videos, val_rows, name):
    rows = list(val_rows)
    config = ExplainConfig(run=runs[name], out=None, features=tiny_cache, cached=[str(r) for r in rows])
    cached = list(cached_videos(config))
    online = list(new_videos(ExplainConfig(videos=[str(sample_videos / val_rows[r]) for r in rows], run=runs[name])))
    for row, from_cache, from_file in zip(rows, cached, online):
        assert not from_cache.error and not from_cache.frames_note and from_cache.label == val_rows[row].split("/")[1]
        np.testing.assert_array_equal(from_cache.probabilities, _model_probabilities(runs[name], tiny_cache, row))
        views, layers = len(from_cache.probabilities), len(from_cache.blocks)
        assert from_cache.attention.shape == (views, layers, 4, 1 + 4 * 4)  # EVL-Tiny: 4 x 4 patches
        np.testing.assert_allclose(from_cache.attention.sum((2, 3)), 1, atol=1e-5)
        np.testing.assert_allclose(from_file.probabilities, from_cache.probabilities, atol=2e-4)
        np.testing.assert_allclose(from_file.attention, from_cache.attention, atol=2e-4)
        np.testing.assert_array_equal(from_file.frames, from_cache.frames)
        assert from_file.frame_numbers == from_cache.frame_numbers
        assert from_cache.matches is not None  # maps read for the arrows even when the run does not use them
        agree = [np.mean(a == b) for a, b in zip(from_file.matches, from_cache.matches)]
        assert min(agree) > 0.95, agree


def test_a_tower_without_a_class_token_is_drawn_from_its_patches(sample_videos, val_rows, tmp_path):
    """EVL-Tiny-SL2 has no prefix token: every token of a frame is a patch, and the pictures are made."""
    cache = tmp_path / "sl2.zarr"
    extract(ExtractConfig(out=cache, videos=sample_videos, model="EVL-Tiny-SL2", pretrained="none", frames=4,
                          stride=3, eval_views=2, blocks=2, workers=0))
    train(TrainConfig(features=cache, out=tmp_path / "run", layers=2, **TINY_RUN))
    row = min(val_rows)
    summary = explain(ExplainConfig(run=tmp_path / "run", out=tmp_path / "out", features=cache, cached=[str(row)]))
    explanation = next(cached_videos(ExplainConfig(run=tmp_path / "run", features=cache, cached=[str(row)])))
    assert explanation.prefix_tokens == 0 and explanation.attention.shape == (2, 2, 4, 16)
    assert len(summary.pages) == 1 and not summary.errors


def test_best_matches_follow_the_maps_averaged_over_blocks():
    patches = 6
    shift = torch.eye(patches)[(torch.arange(patches) + 1) % patches]  # patch p matches p + 1
    stay = torch.eye(patches)
    prev = [0.7 * shift.expand(1, 2, patches, patches), 0.3 * stay.expand(1, 2, patches, patches)]
    nxt = [0.4 * shift.expand(1, 2, patches, patches), 0.6 * stay.expand(1, 2, patches, patches)]
    match_prev, match_next = best_matches(prev, nxt)
    assert match_prev.tolist() == [[[1, 2, 3, 4, 5, 0]] * 2] and match_next.tolist() == [[list(range(patches))] * 2]


def test_pages_show_every_view_and_work_offline(runs, tiny_cache, val_rows, tmp_path):
    out = tmp_path / "explained"
    result = CliRunner().invoke(main, ["explain", "--run", str(runs["evl"]), "--out", str(out), "--features",
                                       str(tiny_cache)] + [arg for row in val_rows for arg in ("--videos", str(row))])
    assert result.exit_code == 0, result.output
    assert f"explain: 2 videos explained; open {out / 'index.html'}" in result.output
    _, links, text = check_offline_page(out / "index.html")
    assert len(links) == 2 and "predicted class" in text
    for link, path in zip(links, val_rows.values()):
        images, back, text = check_offline_page(out / link)
        assert back == ["index.html"] and len(images) == 2  # the tiny cache has 2 views per video
        assert images == [(out / link.removesuffix(".html") / f"view_{v}.png").read_bytes() for v in (1, 2)]
        assert f"true class: {path.split('/')[1]}" in text and "How to read the pictures" in text


def test_frames_come_only_from_the_file_that_was_cached(tiny_cache, val_rows, sample_videos, tmp_path):
    row, path = next(iter(val_rows.items()))
    with FeatureStore(tiny_cache) as store:
        attrs = store.attrs
        columns = {name: store.column(name) for name in ("path", "split", "frames")}
    frames, note = cached_frames(attrs, row, columns, 0)
    clips = read_video_clips(sample_videos / path, "val", row, ClipSpec.from_cache(attrs)).clips
    assert note == "" and np.array_equal(frames, clips.permute(0, 1, 3, 4, 2).numpy())
    moved = {**attrs, "dataset": {**attrs["dataset"], "root": str(tmp_path)}}
    assert cached_frames(moved, row, columns, 0) == (None, f"frames not drawn: the video is not at {tmp_path / path}"
                                                           f" (the cache's dataset root and its path)")
    (tmp_path / path).parent.mkdir(parents=True)
    write_video(tmp_path / path, numbered_frames(7, 40, 52))
    frames, note = cached_frames(moved, row, columns, 0)
    assert frames is None and note.endswith(f"has 7 frames, the cache recorded {columns['frames'][row]}: not the "
                                            f"file that was cached")


def test_without_its_file_a_cached_video_is_explained_without_frames(runs, tiny_cache, val_rows, tmp_path):
    copy = tmp_path / "feats.zarr"
    shutil.copytree(tiny_cache, copy)
    with FeatureStore(copy, "a") as store:
        attrs = store.attrs
        store.set_attrs({**attrs, "dataset": {**attrs["dataset"], "root": str(tmp_path / "gone")}})
    row = next(iter(val_rows))
    summary = explain(ExplainConfig(run=runs["evl"], out=tmp_path / "out", features=copy, cached=[str(row)]))
    images, _, text = check_offline_page(summary.pages[0])
    assert len(images) == 2 and "frames not drawn: the video is not at" in text and "heatmaps are drawn alone" in text


def test_the_text_head_shows_each_frames_similarity_with_the_classes(runs, tiny_cache, val_rows, tmp_path):
    row = next(iter(val_rows))
    e, = cached_videos(ExplainConfig(run=runs["text"], features=tiny_cache, cached=[str(row)]))
    assert e.attention is None and e.matches is None and e.similarities.shape == (2, 4, 4)
    run_config = load_run(runs["text"])
    model = build_model(run_config)
    load_weights(model, load_file(runs["text"] / "best.safetensors"), runs["text"])
    with FeatureStore(tiny_cache) as store:
        embeddings = torch.from_numpy(store.array("embed")[row, :2].astype(np.float32))
    with torch.no_grad():
        classes = model.text()
        expected = torch.nn.functional.normalize(embeddings, dim=-1) @ classes.t()
        logits = model(embeddings)
    np.testing.assert_allclose(e.similarities, expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(e.probabilities, logits.softmax(-1).numpy(), atol=1e-6)
    summary = explain(ExplainConfig(run=runs["text"], out=tmp_path, features=tiny_cache, cached=[str(row)]))
    assert len(check_offline_page(summary.pages[0])[0]) == 2


def test_what_cannot_work_is_refused_in_one_line(runs, tiny_cache, tmp_path, val_rows):
    run = runs["evl"]
    refusals = [
        (["--run", str(run)], "--run and --out are required"),
        (["--run", str(run), "--out", str(tmp_path), "--videos", "3"], "--videos names videos of a cache"),
        (["v.mp4", "--run", str(run), "--out", str(tmp_path), "--features", str(tiny_cache)], "not both"),
        (["--run", str(run), "--out", str(tmp_path), "--features", str(tiny_cache)],
         f"its validation videos are rows {min(val_rows)} to"),
        (["--run", str(run), "--out", str(tmp_path), "--features", str(tiny_cache), "--videos", "999"],
         "--videos 999: not a row number (0-19) or a path of the cache"),
    ]
    for args, message in refusals:
        result = CliRunner().invoke(main, ["explain"] + args)
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, args
    result = CliRunner().invoke(main, ["explain", str(tmp_path / "missing.mp4"), "--run", str(run), "--out",
                                       str(tmp_path / "o")])
    assert result.exit_code == 1 and "no video could be explained (1 failed)" in result.output
    assert "failed: " in (tmp_path / "o" / "index.html").read_text()
    by_path = ExplainConfig(run=run, features=tiny_cache, cached=[val_rows[min(val_rows)]])
    assert next(cached_videos(by_path)).source.endswith(f"row {min(val_rows)}: {val_rows[min(val_rows)]}")
    with pytest.raises(EvlCacheError, match="--topk must be at least 1"):
        explain(dataclasses.replace(by_path, out=tmp_path, topk=0))
    with pytest.raises(EvlCacheError, match="a linear-probe run attends to nothing"):
        explain(dataclasses.replace(by_path, run=runs["linear_probe"], out=tmp_path))
