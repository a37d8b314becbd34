"""Zero-shot from the cache equals CLIP run directly on the same frames and prompts."""
import json

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner

from evl_cache.apps.zeroshot import ZeroShotConfig, zeroshot, zeroshot_scores
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.errors import EvlCacheError
from evl_cache.towers.backbone import load_clip
from evl_cache.video.clips import ClipSpec, read_video_clips


@pytest.fixture(scope="module")
def cache(tiny_cache):
    return tiny_cache


def clip_directly(cache, root, videos, names, templates):
    """Per-video probabilities [N, K] from the whole open_clip model on freshly decoded frames."""
    with FeatureStore(cache) as store:
        attrs = store.attrs
        paths = store.column("path")
    backbone = attrs["backbone"]
    clip, _ = load_clip(backbone["model"], "none", backbone["image_size"], "cpu", seed=attrs["sampling"]["seed"])
    tokenizer = open_clip.get_tokenizer(backbone["model"])
    mean = torch.tensor(backbone["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(backbone["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        per_template = [clip.encode_text(tokenizer([t.format(n) for n in names]), normalize=True) for t in templates]
        text = torch.nn.functional.normalize(torch.stack(per_template).mean(0), dim=-1)
        probabilities = []
        for video in videos:
            clips = read_video_clips(root / paths[video], "val", int(video), ClipSpec.from_cache(attrs)).clips
            views, frames = clips.shape[:2]
            pixels = (clips.flatten(0, 1).float() / 255 - mean) / std
            frame_embeddings = clip.encode_image(pixels).view(views, frames, -1)
            video_embeddings = torch.nn.functional.normalize(frame_embeddings.mean(1), dim=-1)
            logits = clip.logit_scale.exp() * video_embeddings @ text.t()
            probabilities.append(logits.softmax(-1).mean(0))
    return torch.stack(probabilities).numpy()


@pytest.mark.parametrize("templates", [["{}"], ["a video of {}.", "{}, in motion", "a photo of a {}."]])
def test_zeroshot_from_the_cache_equals_clip_on_the_frames(cache, sample_videos, tmp_path, templates, monkeypatch):
    template_file = None
    if templates != ["{}"]:
        template_file = tmp_path / "templates.txt"
        template_file.write_text("# ensemble\n" + "\n".join(templates) + "\n")
    opened = set()
    original = FeatureStore.array
    monkeypatch.setattr(FeatureStore, "array", lambda self, name: opened.add(name) or original(self, name))
    names, scores, _ = zeroshot_scores(ZeroShotConfig(features=cache, templates=template_file, workers=0))
    assert {n for n in opened if not n.startswith("videos/")} == {"embed"}  # no tokens, no maps
    direct = clip_directly(cache, sample_videos, scores["videos"], names, templates)
    assert len(scores["videos"]) == 8 and direct.shape == (8, 4)
    # the cache holds the frame embeddings in float16: that is the only difference
    np.testing.assert_allclose(scores["probabilities"], direct, atol=3e-4)
    assert (scores["probabilities"].argmax(1) == direct.argmax(1)).all()


def test_zeroshot_command_renames_or_subsets_the_classes(cache, tmp_path):
    with FeatureStore(cache) as store:
        names = store.attrs["class_names"]
    runner = CliRunner()
    result = runner.invoke(main, ["zeroshot", "--features", str(cache), "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    plain = json.loads(result.stdout)
    assert plain["videos"] == 8 and plain["classes"] == 4 and plain["templates"] == ["{}"]
    assert 0 <= plain["top1"] <= plain["top5"] <= 1 and list(plain["per_class_accuracy"]) == names

    readable = tmp_path / "readable.txt"  # one name per cache class, in the cache's order: a rename
    readable.write_text("".join(f"a clip of {name.replace('_', ' ')}\n" for name in names))
    result = runner.invoke(main, ["zeroshot", "--features", str(cache), "--workers", "0", "--json",
                                  "--classes", str(readable)])
    assert result.exit_code == 0, result.output
    renamed = json.loads(result.stdout)
    assert renamed["videos"] == 8
    assert list(renamed["per_class_accuracy"])[0] == "a clip of " + names[0].replace("_", " ")

    subset = tmp_path / "subset.txt"  # cache names: only those classes' videos, scored over them
    subset.write_text(f"{names[2]}\n{names[0]}\n")
    result = zeroshot(ZeroShotConfig(features=cache, classes=subset, workers=0))
    assert result["videos"] == 4 and result["classes"] == 2
    assert list(result["per_class_accuracy"]) == [names[2], names[0]]

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("a\nb\nc\n")
    result = runner.invoke(main, ["zeroshot", "--features", str(cache), "--workers", "0", "--classes", str(wrong)])
    assert result.exit_code == 1 and "3 of 3 class names are not classes of the cache" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bad_templates_are_refused(cache, tmp_path):
    templates = tmp_path / "t.txt"
    templates.write_text("a photo of a dog\n")
    with pytest.raises(EvlCacheError, match="must hold {} exactly once"):
        zeroshot(ZeroShotConfig(features=cache, templates=templates, workers=0))
