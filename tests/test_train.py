"""Stage two: training from the cache learns, resumes exactly, refuses what the cache cannot serve."""
import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from sigkill import kill_at_random_points, time_work

from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import CacheError, EvlCacheError

FAST = dict(batch_size=8, lr=3e-3, mlp_dropout=0.0, head_dropout=0.0, workers=0, heads=2)


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


def _start_train(cache, out, epochs):
    """`python -m evl_cache.cli train` into `out`, on one thread (two at once on two cores run as fast
    as one alone)."""
    return subprocess.Popen([sys.executable, "-m", "evl_cache.cli"] + _train_args(cache, out, epochs),
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _finished(out):
    metrics = out / "metrics.jsonl"
    return metrics.exists() and '"summary"' in metrics.read_text()


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _assert_resumed_like(out, reference, epochs):
    """`out`, resumed, holds the reference run's weights, one metrics line per epoch and the same files."""
    for name in ("last.safetensors", "best.safetensors"):
        resumed, expected = load_file(out / name), load_file(reference / name)
        assert resumed.keys() == expected.keys(), name
        assert all((resumed[k] == expected[k]).all() for k in expected), name
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines if r["event"] == "epoch"] == list(range(epochs))
    assert [r["event"] for r in lines].count("summary") == 1
    assert _files(out) == _files(reference)  # nothing half-written left behind


@pytest.fixture
def one_thread():
    """One torch thread in this process, as the runs started with OMP_NUM_THREADS=1 have: the same float
    reductions (and no threads spinning for a core on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_random_kills_resume_to_the_same_weights(learnable_cache, tmp_path, one_thread):
    """SIGKILLs at seeded random points of the training work (from the run folder's creation to the
    summary: epochs, evaluation, checkpoint writing), then --resume: the uninterrupted run's weights."""
    epochs = 4
    reference = tmp_path / "reference"
    seconds = time_work(_start_train(learnable_cache, reference, epochs), reference.exists,
                        lambda: _finished(reference))
    outs = {seed: tmp_path / f"seed{seed}" for seed in range(4)}
    killed = {}
    for pair in ((0, 1), (2, 3)):  # two at a time: one per core
        starts = {s: functools.partial(_start_train, learnable_cache, outs[s], epochs) for s in pair}
        killed.update(kill_at_random_points(starts, lambda s: outs[s].exists(), lambda s: not _finished(outs[s]),
                                            seconds))
    assert sum(killed.values()) >= 2, f"too few kills landed before the work was done: {killed}"
    for seed, out in outs.items():
        result = CliRunner().invoke(main, _train_args(learnable_cache, out, epochs) + ["--resume"])
        assert result.exit_code == 0, (seed, result.output)
        _assert_resumed_like(out, reference, epochs)
    result = CliRunner().invoke(main, _train_args(learnable_cache, outs[0], epochs) + ["--resume", "--lr", "0.1"])
    assert result.exit_code == 1 and "cannot resume with different options (lr:" in result.output


@pytest.mark.slow
def test_a_kill_while_files_are_replaced_resumes(learnable_cache, tmp_path, monkeypatch, one_thread):
    """The run folder as a SIGKILL leaves it just before each file or checkpoint folder is put in place
    (or an old checkpoint removed), copied during one run, then resumed: the run's own weights."""
    out, epochs = tmp_path / "run", 2
    kills = []
    replace, rmtree = os.replace, shutil.rmtree

    def kill_here(path):
        if out in Path(path).parents:
            kills.append(tmp_path / f"kill{len(kills)}")
            shutil.copytree(out, kills[-1])

    monkeypatch.setattr(os, "replace", lambda src, dst: kill_here(dst) or replace(src, dst))
    monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: kill_here(path) or rmtree(path, *a, **k))
    config = TrainConfig(features=learnable_cache, out=out, layers=2, epochs=epochs, **FAST)
    train(config)
    monkeypatch.undo()
    assert len(kills) >= 8, kills
    reference = tmp_path / "reference"
    out.rename(reference)
    for kill in kills:  # each resumed where the run was (the run folder records its own path)
        kill.rename(out)
        train(dataclasses.replace(config, resume=True))
        _assert_resumed_like(out, reference, epochs)
        shutil.rmtree(out)


def test_in_memory_equals_reading_the_cache_and_is_refused_when_it_does_not_fit(learnable_cache, tmp_path,
                                                                                 monkeypatch):
    options = dict(features=learnable_cache, layers=2, epochs=2, **FAST)
    train(TrainConfig(out=tmp_path / "disk", **options))
    train(TrainConfig(out=tmp_path / "memory", in_memory=True, **options))
    a, b = load_file(tmp_path / "disk" / "last.safetensors"), load_file(tmp_path / "memory" / "last.safetensors")
    assert all(a[name].equal(b[name]) for name in a)
    import evl_cache.decoder.train as train_module
    monkeypatch.setattr(train_module, "memory_available", lambda: 10_000)
    with pytest.raises(EvlCacheError, match=r"--in-memory needs 0\.\d+ GB for the selected features \(one copy\); "
                                            r"memory available is 0\.00 GB"):
        train(TrainConfig(out=tmp_path / "refused", in_memory=True, **options))
    assert not (tmp_path / "refused").exists()  # refused before the run folder is made
