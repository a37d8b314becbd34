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

import evl_cache.decoder.train as train_module
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.decoder.memory import USABLE_SHARE, StepMemory
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


class Stop(Exception):
    """Stands for a kill right after a checkpoint."""


def _stopped_after_first_epoch(config: TrainConfig, monkeypatch) -> Path:
    """Run `config` until epoch 0 is checkpointed, then stop it there; returns its state.pt."""
    save = train_module.save_checkpoint

    def save_then_stop(out, model, state):
        save(out, model, state)
        raise Stop

    with monkeypatch.context() as patched:
        patched.setattr(train_module, "save_checkpoint", save_then_stop)
        with pytest.raises(Stop):
            train(config)
    return Path(config.out) / "checkpoints" / "epoch_0000" / "state.pt"


def _assert_same_weights(run, reference):
    a, b = load_file(run / "last.safetensors"), load_file(reference / "last.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


@pytest.fixture(scope="module")
def dropout_reference(learnable_cache, tmp_path_factory):
    """Two uninterrupted epochs with dropout on the CPU (so that a resume must restore the generator)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    config = TrainConfig(features=learnable_cache, out=out, layers=1, epochs=2, device="cpu",
                         **{**FAST, "mlp_dropout": 0.5})
    train(config)
    return config


def test_a_run_checkpointed_on_a_gpu_resumes_on_a_cpu(dropout_reference, tmp_path, monkeypatch, caplog):
    """Its state.pt names cuda:0 for every tensor, an enabled loss scaler and CUDA generators: loaded onto
    the CPU, it resumes (here to the very weights, the values being a CPU run's), saying it is not exact."""
    config = dataclasses.replace(dropout_reference, out=tmp_path / "run")
    state_path = _stopped_after_first_epoch(config, monkeypatch)
    state = torch.load(state_path, weights_only=True)
    assert state["device"] == "cpu" and state["rng"][0]["cuda"] is None and state["scaler"] == {}
    state.update(device="cuda", scaler=torch.amp.GradScaler("cpu").state_dict(),
                 rng=[{**rng, "cuda": torch.zeros(16, dtype=torch.uint8)} for rng in state["rng"]])
    on_gpu = [(0, lambda storage: "cuda:0", lambda storage, location: None)] + torch.serialization._package_registry
    with monkeypatch.context() as patched:
        patched.setattr(torch.serialization, "_package_registry", on_gpu)
        torch.save(state, state_path)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):  # as a load without map_location does here
            torch.load(state_path, weights_only=True)
    with caplog.at_level("WARNING"):
        train(dataclasses.replace(config, resume=True))
    assert "checkpointed on cuda on cpu: it continues, but not bit-exactly" in caplog.text
    _assert_same_weights(config.out, dropout_reference.out)


def test_a_run_checkpointed_by_earlier_versions_resumes_exactly(dropout_reference, tmp_path, monkeypatch):
    """state.pt as evl-cache wrote it before it saved CUDA generators ("torch_rng", CPU states only)."""
    config = dataclasses.replace(dropout_reference, out=tmp_path / "run")
    state_path = _stopped_after_first_epoch(config, monkeypatch)
    state = torch.load(state_path, weights_only=True)
    old = {key: state[key] for key in ("epoch", "step", "best_top1", "optimizer", "schedule", "scaler")}
    torch.save({**old, "torch_rng": [rng["cpu"] for rng in state["rng"]]}, state_path)
    train(dataclasses.replace(config, resume=True))
    _assert_same_weights(config.out, dropout_reference.out)


def test_a_state_file_that_would_run_code_is_refused_in_one_line(dropout_reference, tmp_path, monkeypatch):
    config = dataclasses.replace(dropout_reference, out=tmp_path / "run")
    state_path = _stopped_after_first_epoch(config, monkeypatch)
    state = torch.load(state_path, weights_only=True)
    torch.save({**state, "note": Stop()}, state_path)
    args = _train_args(config.features, config.out, epochs=2) + ["--layers", "1", "--device", "cpu", "--resume"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert "state.pt: holds objects other than tensors and plain values (test_train.Stop): not loaded" in result.output


def test_a_micro_batch_that_does_not_fit_is_split_and_a_resume_keeps_the_split(dropout_reference, tmp_path,
                                                                               monkeypatch, caplog):
    """With free memory for 4 clips of the batch of 8, train takes 2 micro-batches per step: the run of
    --grad-accum 2 exactly. Resumed where memory is plenty, it keeps its 2."""
    halves = dataclasses.replace(dropout_reference, out=tmp_path / "halves", grad_accum=2)
    train(halves)
    config = dataclasses.replace(dropout_reference, out=tmp_path / "run")
    monkeypatch.setattr(train_module, "step_memory", lambda *args: StepMemory(fixed=0, per_clip=1000))
    monkeypatch.setattr(train_module, "device_memory_available", lambda device: int(4 * 1000 / USABLE_SHARE) + 1)
    with caplog.at_level("WARNING"):
        _stopped_after_first_epoch(config, monkeypatch)
    assert "a micro-batch of 8 clips per process would not fit cpu" in caplog.text
    assert "2 micro-batches of 4 per step instead of 1" in caplog.text
    monkeypatch.setattr(train_module, "device_memory_available", lambda device: 10**12)
    train(dataclasses.replace(config, resume=True))
    _assert_same_weights(config.out, halves.out)


@pytest.mark.parametrize("head, reads", [("attentive-probe", {"tokens/block_3"}), ("linear-probe", {"embed"})])
def test_probe_heads_read_only_what_they_need_learn_and_evaluate(learnable_cache, tmp_path, monkeypatch, head, reads):
    """The attentive probe reads the final cached block (no maps), the linear probe the frame embeddings;
    both learn (chance is 0.25) and their run folders evaluate like any run's."""
    opened = set()
    original = FeatureStore.array
    monkeypatch.setattr(FeatureStore, "array", lambda self, name: opened.add(name) or original(self, name))
    out = tmp_path / head
    summary = train(TrainConfig(features=learnable_cache, out=out, head=head, epochs=20, **FAST))
    assert {n for n in opened if not n.startswith("videos/")} == reads
    assert summary.final["top1"] >= 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["head"] == {"kind": head} and config["decoder"] is None
    if head == "attentive-probe":
        assert config["probe"] == {"width": 64, "tokens": 17, "frames": 4, "num_classes": 4, "heads": 2,
                                   "queries": 1, "depth": 1, "mlp_factor": 4.0}
    result = CliRunner().invoke(main, ["eval", "--run", str(out), "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["top1"] == pytest.approx(summary.best_top1)


def test_an_attentive_probe_resumes_to_the_same_weights(learnable_cache, tmp_path, monkeypatch):
    options = dict(features=learnable_cache, head="attentive-probe", probe_queries=2, probe_depth=2, epochs=2,
                   **FAST)
    reference = TrainConfig(out=tmp_path / "reference", **options)
    train(reference)
    config = TrainConfig(out=tmp_path / "run", **options)
    _stopped_after_first_epoch(config, monkeypatch)
    train(dataclasses.replace(config, resume=True))
    _assert_same_weights(config.out, reference.out)


def test_probes_take_a_frame_subset_and_refuse_what_does_not_fit(learnable_cache, tmp_path):
    out = tmp_path / "subset"
    train(TrainConfig(features=learnable_cache, out=out, head="attentive-probe", frames=2, frame_step=3, epochs=1,
                      **FAST))
    selection = json.loads((out / "config.json").read_text())["selection"]
    assert (selection["blocks"], selection["frame_start"], selection["frames"], selection["maps"]) == ([3], 0, 2,
                                                                                                      False)
    with pytest.raises(EvlCacheError, match="--probe-queries and --probe-depth: only for --head attentive-probe"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "a", probe_depth=2, **FAST))
    with pytest.raises(EvlCacheError, match="--prompt-tokens: only for --head text or --head clip-text"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "b", head="linear-probe", prompt_tokens=4, **FAST))
    with pytest.raises(EvlCacheError, match="--probe-queries must be at least 1"):
        train(TrainConfig(features=learnable_cache, out=tmp_path / "c", head="attentive-probe", probe_queries=0,
                          **FAST))
