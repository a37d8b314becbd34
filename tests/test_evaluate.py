"""Evaluate a run on a cache: the run's own or another that serves it, any split, the files it writes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from evl_cache import EvalConfig, ExtractConfig, TrainConfig, evaluate, extract, train
from evl_cache.cache.store import FeatureStore
from evl_cache.errors import CacheError, CheckpointError, EvlCacheError

FAST = dict(batch_size=8, lr=3e-3, mlp_dropout=0.0, head_dropout=0.0, workers=0, heads=2)


@pytest.fixture(scope="module")
def run(learnable_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    train(TrainConfig(features=learnable_cache, out=out, layers=1, epochs=2, **FAST))
    return out


def test_eval_of_the_last_weights_is_the_last_epochs_figure(run):
    metrics = evaluate(EvalConfig(run=run, weights="last", workers=0))
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-2]
    assert last["event"] == "epoch" and metrics["top1"] == pytest.approx(last["val_top1"])
    assert metrics["videos"] == 12 and "confusion" not in metrics


def test_other_splits_write_their_own_files(run):
    metrics = evaluate(EvalConfig(run=run, split="train", workers=0, batch_size=5))
    assert metrics["videos"] == 24
    for name in ("eval_train.json", "per_class_train.csv", "confusion_train.png"):
        assert (run / name).exists(), name
    assert json.loads((run / "eval_train.json").read_text())["top1"] == metrics["top1"]


def test_refusals(run, tmp_path):
    with pytest.raises(EvlCacheError, match="--run is required"):
        evaluate(EvalConfig())
    with pytest.raises(CheckpointError, match="not a run folder"):
        evaluate(EvalConfig(run=tmp_path))
    with pytest.raises(EvlCacheError, match="no finished, labelled videos in split 'test'"):
        evaluate(EvalConfig(run=run, split="test", workers=0))
    with pytest.raises(EvlCacheError, match="only text and clip-text runs"):
        evaluate(EvalConfig(run=run, classes=tmp_path / "names.txt", workers=0))


def test_eval_refuses_a_cache_of_other_backbone_weights(learnable_cache, run, tmp_path):
    with FeatureStore(learnable_cache) as store:
        root = Path(store.attrs["dataset"]["root"])
    other = tmp_path / "other.zarr"
    extract(ExtractConfig(out=other, videos=root, model="EVL-Tiny", pretrained="none", seed=1, frames=4,
                          stride=3, eval_views=2, blocks=3, workers=0))
    with pytest.raises(CacheError, match="backbone weights differ"):
        evaluate(EvalConfig(run=run, features=other, workers=0))
