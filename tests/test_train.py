"""Stage two: training from the cache learns, resumes exactly, refuses what the cache cannot serve."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from evl_cache.cli import main
from evl_cache.errors import CacheError, EvlCacheError
from evl_cache.evaluate import EvalConfig, evaluate
from evl_cache.extract import ExtractConfig, extract
from evl_cache.store import FeatureStore
from evl_cache.synthetic import make_sample_dataset
from evl_cache.train import TrainConfig, train

FAST = dict(batch_size=8, lr=3e-3, mlp_dropout=0.0, head_dropout=0.0, workers=0, heads=2)


@pytest.fixture(scope="module")
def learnable_cache(tmp_path_factory):
    """Tiny model, 4 classes (2 told apart by motion only), 6 train and 3 val videos per class."""
    root = tmp_path_factory.mktemp("learnable")
    videos = make_sample_dataset(root / "videos", videos_per_class={"train": 6, "val": 3}, num_frames=24,
                                 size=(40, 52))
    out = root / "feats.zarr"
    extract(ExtractConfig(out=out, videos=videos, model="EVL-Tiny", pretrained="none", frames=4, stride=3,
                          eval_views=2, blocks=3, workers=0))
    return out


def test_tiny_run_learns_and_writes_its_run_folder(learnable_cache, tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(features=learnable_cache, out=out, layers=2, epochs=30, **FAST))
    assert summary.final["top1"] >= 0.6  # chance is 0.25
    for name in ("config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "curve.png",
                 "per_class_val.csv", "confusion_val.png", "eval_val.json"):
        assert (out / name).exists(), name
    config = json.loads((out / "config.json").read_text())
    assert config["cache"]["path"] == str(learnable_cache.resolve()) and len(config["cache"]["fingerprint"]) == 64
    assert config["train"]["layers"] == 2 and config["decoder"]["layers"] == 2 and "torch" in config["versions"]
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if r["event"] == "epoch"]
    assert len(epochs) == 30 and {"train_loss", "lr", "train_clips_per_s", "data_wait_share",
                                  "val_top1", "val_top5"} <= set(epochs[0])
    result = CliRunner().invoke(main, ["eval", "--run", str(out), "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == pytest.approx(max(r["val_top1"] for r in epochs))


def test_two_layer_run_reads_only_two_blocks_and_no_maps_when_off(learnable_cache, tmp_path, monkeypatch):
    opened = set()
    original = FeatureStore.array

    def spy(self, name):
        opened.add(name)
        return original(self, name)

    monkeypatch.setattr(FeatureStore, "array", spy)
    train(TrainConfig(features=learnable_cache, out=tmp_path / "r", layers=2, epochs=1, **FAST))
    features = {n for n in opened if not n.startswith("videos/")}
    assert features == {"tokens/block_2", "tokens/block_3", "maps/block_2/prev", "maps/block_2/next",
                        "maps/block_3/prev", "maps/block_3/next"}
    opened.clear()
    train(TrainConfig(features=learnable_cache, out=tmp_path / "r2", layers=1, epochs=1,
                      temporal_cross_attention=False, **FAST))
    assert {n for n in opened if not n.startswith("videos/")} == {"tokens/block_3"}


def test_options_the_cache_cannot_serve_are_refused(learnable_cache, tmp_path):
    with pytest.raises(CacheError, match="--layers 4 needs 4 cached blocks; the cache holds 3"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "a", layers=4, **FAST))
    with pytest.raises(CacheError, match="the cache holds 4 per clip"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "b", layers=2, frames=6, **FAST))
    with pytest.raises(CacheError, match="frames 2 apart have no cached map"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "c", layers=2, frames=2, frame_step=2, **FAST))
    # without cross-attention the same subset is exact, so it is allowed
    train(TrainConfig(features=learnable_cache, out=tmp_path / "d", frames=2, frame_step=2, epochs=1,
                      layers=1, temporal_cross_attention=False, **FAST))
    with pytest.raises(EvlCacheError, match="run folder exists"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "d", epochs=1, layers=1, **FAST))


def _train_args(cache, out, epochs=6):
    args = ["train", "--features", str(cache), "--out", str(out), "--layers", "2", "--epochs", str(epochs),
            "--mlp-dropout", "0.5", "--train-views", "all"]
    for key, value in FAST.items():
        if key not in ("mlp_dropout",):
            args += [f"--{key.replace('_', '-')}", str(value)]
    return args


def test_killed_training_resumes_to_the_same_weights(learnable_cache, tmp_path):
    reference = tmp_path / "reference"
    result = CliRunner().invoke(main, _train_args(learnable_cache, reference))
    assert result.exit_code == 0, result.output
    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "evl_cache.cli"] + _train_args(learnable_cache, out),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "checkpoints" / "LATEST"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if latest.exists() and latest.read_text() >= "epoch_0001":
            break
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert latest.exists() and latest.read_text() < "epoch_0005", "the kill did not land mid-way"
    result = CliRunner().invoke(main, _train_args(learnable_cache, out) + ["--resume"])
    assert result.exit_code == 0, result.output
    a, b = load_file(reference / "last.safetensors"), load_file(out / "last.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["event"] == "epoch"] == list(range(6))
    result = CliRunner().invoke(main, _train_args(learnable_cache, out) + ["--resume", "--lr", "0.1"])
    assert result.exit_code == 1 and "cannot resume with different options (lr:" in result.output


def test_eval_refuses_a_cache_of_other_backbone_weights(learnable_cache, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(features=learnable_cache, out=run, layers=1, epochs=1, **FAST))
    with FeatureStore(learnable_cache) as store:
        root = Path(store.attrs["dataset"]["root"])
    other = tmp_path / "other.zarr"
    extract(ExtractConfig(out=other, videos=root, model="EVL-Tiny", pretrained="none", seed=1, frames=4,
                          stride=3, eval_views=2, blocks=3, workers=0))
    with pytest.raises(CacheError, match="backbone weights differ"):
        evaluate(EvalConfig(run=run, features=other, workers=0))


def test_in_memory_equals_reading_the_cache_and_is_refused_when_it_does_not_fit(learnable_cache, tmp_path,
                                                                                 monkeypatch):
    options = dict(features=learnable_cache, layers=2, epochs=2, **FAST)
    train(TrainConfig(out=tmp_path / "disk", **options))
    train(TrainConfig(out=tmp_path / "memory", in_memory=True, **options))
    a, b = load_file(tmp_path / "disk" / "last.safetensors"), load_file(tmp_path / "memory" / "last.safetensors")
    assert all(a[name].equal(b[name]) for name in a)
    import evl_cache.train as train_module
    monkeypatch.setattr(train_module, "memory_available", lambda: 10_000)
    with pytest.raises(EvlCacheError, match=r"--in-memory needs 0\.\d+ GB for the selected features \(one copy\); "
                                            r"memory available is 0\.00 GB"):
        train(TrainConfig(out=tmp_path / "refused", in_memory=True, **options))
    assert not (tmp_path / "refused").exists()  # refused before the run folder is made
