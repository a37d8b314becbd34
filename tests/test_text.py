"""CLIP's text tower on class names, and the text and clip-text heads trained from the cache."""
import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from click.testing import CliRunner
from conftest import AUTOCAST_TOLERANCE, ON_GPU
from safetensors.torch import load_file

import evl_cache.decoder.train as train_module
from evl_cache.apps.predict import PredictConfig, predict
from evl_cache.cache.dataset import CacheDataset, CacheLoader
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.decoder.evaluate import EvalConfig, evaluate
from evl_cache.decoder.evl_checkpoints import ExportConfig, export_evl
from evl_cache.decoder.metrics import average_views
from evl_cache.decoder.model import TextHeadModel
from evl_cache.decoder.run import build_model, harmonic_mean, load_run, load_weights, predict_views, run_selection
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import CheckpointError, EvlCacheError
from evl_cache.towers.backbone import load_clip
from evl_cache.towers.text import ClassPrompts, TextTower, load_text_tower

FAST = dict(batch_size=8, lr=3e-3, mlp_dropout=0.0, head_dropout=0.0, workers=0, heads=2)


@pytest.fixture(scope="module")
def cache(learnable_cache):
    """Tiny model, 4 classes, 6 train and 3 val videos per class, 2 eval views."""
    return learnable_cache


@pytest.fixture
def built_models(monkeypatch):
    """The models train() builds, kept for inspection after training."""
    models = []
    original = train_module.build_model

    def keep(*args, **kwargs):
        models.append(original(*args, **kwargs))
        return models[-1]

    monkeypatch.setattr(train_module, "build_model", keep)
    return models


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cache_attrs(cache) -> dict:
    with FeatureStore(cache) as store:
        return store.attrs


def test_text_tower_equals_open_clip_and_learned_prompts_are_token_embeddings():
    clip, _ = load_clip("EVL-Tiny", "none", seed=3)
    tokenizer = open_clip.get_tokenizer("EVL-Tiny")
    prompts = ["a photo of a dog.", "cat", "a much longer prompt " * 30]  # the last one is truncated at 77
    ids = tokenizer(prompts)
    tower = TextTower(clip)
    assert tower.causal  # so sequences are cut after the last end-of-text token
    torch.testing.assert_close(tower(ids), clip.encode_text(ids), atol=1e-5, rtol=1e-5)
    # Learned context set to the embedding of the placeholder word gives the literal prompt's embedding.
    names = ["dog", "riding a bike"]
    learned = ClassPrompts(TextTower(clip), tokenizer, names, context_tokens=3)
    with torch.no_grad():
        learned.context.copy_(clip.token_embedding(tokenizer(["X"])[0, 1]).expand(3, -1))
        literal = clip.encode_text(tokenizer([f"X X X {n}." for n in names]), normalize=True)
        torch.testing.assert_close(learned(), literal, atol=1e-5, rtol=1e-5)
    # Templates: each normalised, averaged, renormalised.
    templates = ["a photo of a {}.", "{}"]
    ensemble = ClassPrompts(TextTower(clip), tokenizer, names, templates=templates)
    with torch.no_grad():
        each = [clip.encode_text(tokenizer([t.format(n) for n in names]), normalize=True) for t in templates]
        torch.testing.assert_close(ensemble(), torch.nn.functional.normalize(each[0] + each[1], dim=-1))


@pytest.mark.parametrize("model", ["EVL-Tiny-SL2", "EVL-Tiny-PE", "EVL-Tiny-EVA02", "EVL-Tiny-Reg"])
def test_every_familys_text_tower_and_logits_are_the_models_own(model):
    """The text transformer of a CustomTextCLIP (SigLIP's: no causal mask, last-token pooling, a biased
    projection) equals encode_text, and a text head's logits are the model's own get_logits: its logit
    scale, and SigLIP's logit bias."""
    clip, _ = load_clip(model, "none", seed=3)
    tokenizer = open_clip.get_tokenizer(model)
    names = ["dog", "riding a bike", "cat"]
    tower = TextTower(clip)
    assert (tower.logit_bias is not None) == (model == "EVL-Tiny-SL2")
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(tower(tokenizer(names)), clip.encode_text(tokenizer(names)), atol=1e-5, rtol=1e-5)
        expected, _ = clip.get_logits(images, tokenizer(names))
        head = TextHeadModel(ClassPrompts(tower, tokenizer, names))
        torch.testing.assert_close(head(clip.encode_image(images)[:, None]), expected, atol=1e-5, rtol=1e-5)


def test_text_tower_must_match_the_cached_weights(cache):
    backbone = cache_attrs(cache)["backbone"]
    tower, _ = load_text_tower(backbone, seed=0)
    assert isinstance(tower, TextTower)
    with pytest.raises(EvlCacheError, match="differ from the cache's"):
        load_text_tower(backbone, seed=1)  # other random weights


def test_text_run_trains_only_the_prompt_context(cache, tmp_path, built_models, monkeypatch):
    opened = set()
    original = FeatureStore.array
    monkeypatch.setattr(FeatureStore, "array", lambda self, name: opened.add(name) or original(self, name))
    out = tmp_path / "run"
    summary = train(TrainConfig(features=cache, out=out, head="text", prompt_tokens=4, epochs=4, **FAST))
    assert {n for n in opened if not n.startswith("videos/")} == {"embed"}  # no blocks, no maps
    torch.manual_seed(0)  # as train() does before building the model: the same initial context
    trained, initial = built_models[0].state_dict(), build_model(load_run(out)).state_dict()
    assert set(trained) == set(initial)
    for name in trained:
        if name != "text.context":
            assert torch.equal(trained[name].cpu(), initial[name]), name  # the text tower, bit for bit
    assert not torch.equal(trained["text.context"], initial["text.context"])
    saved = load_file(out / "last.safetensors")
    assert list(saved) == ["text.context"]  # the frozen tower is rebuilt from the backbone, not saved
    config = load_run(out)
    assert config["decoder"] is None and config["head"]["kind"] == "text" and config["selection"]["embed"]
    result = CliRunner().invoke(main, ["eval", "--run", str(out), "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == pytest.approx(summary.best_top1)
    # resuming the finished run loads its saved weights (context only) into a rebuilt model
    resumed = train(TrainConfig(features=cache, out=out, head="text", prompt_tokens=4, epochs=4, resume=True, **FAST))
    assert resumed.final["top1"] == pytest.approx(summary.final["top1"])


def test_tune_text_trains_the_tower_and_saves_it(cache, tmp_path, built_models):
    out = tmp_path / "run"
    train(TrainConfig(features=cache, out=out, head="text", prompt_tokens=0, tune="text",
                      templates=None, epochs=1, **FAST))
    trained, initial = built_models[0].state_dict(), build_model(load_run(out)).state_dict()
    changed = [name for name in trained if not torch.equal(trained[name].cpu(), initial[name])]
    assert {"text.tower.text_projection", "text.tower.transformer.resblocks.0.attn.in_proj_weight"} <= set(changed)
    assert torch.equal(built_models[0].text.tower.logit_scale, build_model(load_run(out)).text.tower.logit_scale)
    assert set(load_file(out / "last.safetensors")) == set(trained)


def test_clip_text_run_scores_class_names_it_never_saw(cache, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(features=cache, out=run, head="clip-text", layers=1, epochs=1, **FAST))
    saved = load_file(run / "best.safetensors")
    assert all(k.startswith(("decoder.", "proj.")) for k in saved) and saved["proj.2.weight"].shape == (32, 64)
    attrs = cache_attrs(cache)
    names = attrs["class_names"]
    unseen = tmp_path / "unseen.txt"  # one new name per cache class, in its order: a rename
    unseen.write_text("".join(f"something {i} that {name.split('_')[0]} looks like\n" for i, name in enumerate(names)))
    metrics = evaluate(EvalConfig(run=run, classes=unseen, workers=0))
    assert metrics["videos"] == 12 and len(metrics["per_class_accuracy"]) == 4
    assert (run / "eval_val_unseen.json").exists() and (run / "per_class_val_unseen.csv").exists()
    # Predict on a new video with the unseen names: the same scores as from the cache.
    with FeatureStore(cache) as store:
        paths, splits = store.column("path"), store.column("split")
    video = int(next(i for i, s in enumerate(splits) if s == "val"))
    path = Path(attrs["dataset"]["root"]) / paths[video]
    unseen_names = unseen.read_text().splitlines()
    model = build_model(load_run(run), unseen_names)
    load_weights(model, load_file(run / "best.safetensors"), run)
    loader = CacheLoader.sequential(CacheDataset(cache, np.array([video]), run_selection(attrs, load_run(run))), 1)
    cached = average_views(*predict_views(model, loader, torch.device("cpu"), False))
    result = CliRunner().invoke(main, ["predict", str(path), "--run", str(run), "--classes", str(unseen), "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)[0]
    assert row["classes"] == unseen_names
    np.testing.assert_allclose(row["probabilities"], cached["probabilities"][0],
                               atol=AUTOCAST_TOLERANCE["atol"] if ON_GPU else 2e-4)
    # Three unseen names only: a smaller problem, still scored.
    assert len(predict(PredictConfig(videos=[str(path)], run=run, classes=write(tmp_path / "3.txt", "a\nb\nc\n")))[0]
               .probabilities) == 3
    with pytest.raises(CheckpointError, match="authors' format cannot hold it"):
        export_evl(ExportConfig(run, tmp_path / "x.pth"))


def test_linear_runs_refuse_text_options_and_class_lists(cache, tmp_path):
    with pytest.raises(EvlCacheError, match="--prompt-tokens, --base-classes: only for --head text"):
        train(TrainConfig(features=cache, out=tmp_path / "a", prompt_tokens=2, base_classes=tmp_path / "b.txt",
                          **FAST))
    with pytest.raises(EvlCacheError, match="trains nothing"):
        train(TrainConfig(features=cache, out=tmp_path / "b", head="text", prompt_tokens=0, **FAST))
    run = tmp_path / "linear"
    train(TrainConfig(features=cache, out=run, layers=1, epochs=1, **FAST))
    names = tmp_path / "names.txt"
    names.write_text("x\ny\n")
    with pytest.raises(EvlCacheError, match="linear head"):
        evaluate(EvalConfig(run=run, classes=names, workers=0))


def test_base_to_novel_bookkeeping(cache, tmp_path):
    names = cache_attrs(cache)["class_names"]
    base_file = tmp_path / "base.txt"
    base_file.write_text(f"{names[3]}\n{names[1]}\n")
    out = tmp_path / "run"
    summary = train(TrainConfig(features=cache, out=out, head="clip-text", layers=1, epochs=2,
                                base_classes=base_file, **FAST))
    config = load_run(out)
    base, novel = [names[1], names[3]], [names[0], names[2]]  # in the cache's order
    assert config["head"]["class_names"] == base and config["head"]["novel_classes"] == novel
    assert config["videos"] == {"train": 12, "val": 6, "val_novel": 6}  # 6 train and 3 val videos per class
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["event"] == "epoch"]
    for record in epochs:
        assert record["val_harmonic_mean"] == pytest.approx(harmonic_mean(record["val_top1"], record["val_novel_top1"]))
    final = json.loads((out / "eval_val.json").read_text())
    assert len(final["per_class_accuracy"]) == 2 and len(final["novel"]["per_class_accuracy"]) == 2
    assert final["videos"] == 6 and final["novel"]["videos"] == 6
    assert final["harmonic_mean"] == pytest.approx(summary.final["harmonic_mean"])
    assert "harmonic mean" in summary.line()
    # eval of the run reports the same split; its novel scores are over the novel names only
    metrics = evaluate(EvalConfig(run=out, weights="last", workers=0))
    assert metrics["novel"]["top1"] == pytest.approx(epochs[-1]["val_novel_top1"])
    assert metrics["top1"] == pytest.approx(epochs[-1]["val_top1"])
    assert metrics["harmonic_mean"] == pytest.approx(epochs[-1]["val_harmonic_mean"])
    assert (out / "per_class_val_novel.csv").read_text().splitlines()[1].startswith(novel[0])
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{names[0]}\nnot a class\n")
    with pytest.raises(EvlCacheError, match="1 base classes are not classes of the cache"):
        train(TrainConfig(features=cache, out=tmp_path / "bad", head="text", base_classes=bad, **FAST))
