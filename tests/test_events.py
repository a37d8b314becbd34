"""TensorBoard events of a run: each epoch's scalars as metrics.jsonl has them, each step once after a resume."""
import json
import sys

import pytest
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto.event_pb2 import Event

from evl_cache.decoder import train as train_module
from evl_cache.decoder.events import SCALARS
from evl_cache.decoder.train import TrainConfig, train
from evl_cache.errors import EvlCacheError

TINY_RUN = dict(layers=1, batch_size=8, workers=0, heads=2, mlp_dropout=0, head_dropout=0)


def read_events(run) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's event files, read as stored (no reader's purging): tag -> [(step, value)]."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted((run / "tensorboard").iterdir()):
        for raw in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(raw)
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def epoch_records(run) -> list[dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == "epoch"]


def assert_events_are_the_metrics(run, epochs):
    scalars = read_events(run)
    records = epoch_records(run)
    assert [r["epoch"] for r in records] == list(range(epochs))
    for key in ("train_loss", "train_top1", "val_top1", "val_top5", "lr", "train_clips_per_s", "data_wait_share"):
        assert [step for step, _ in scalars[SCALARS[key]]] == list(range(1, epochs + 1)), key  # epochs done
        assert [value for _, value in scalars[SCALARS[key]]] == pytest.approx([r[key] for r in records], rel=1e-6)


def test_train_writes_each_epochs_scalars_as_events(tiny_cache, tmp_path):
    run = tmp_path / "run"
    train(TrainConfig(features=tiny_cache, out=run, epochs=2, tensorboard=True, **TINY_RUN))
    assert_events_are_the_metrics(run, 2)
    train(TrainConfig(features=tiny_cache, out=run, epochs=1, overwrite=True, **TINY_RUN))  # a run's own folder
    assert not (run / "tensorboard").exists()


def test_a_resumed_run_writes_each_epoch_once(tiny_cache, tmp_path, monkeypatch):
    """Killed after logging epoch 1 and before its checkpoint: the resumed run redoes epoch 1, and the
    event files hold it once."""
    run = tmp_path / "run"
    config = TrainConfig(features=tiny_cache, out=run, epochs=3, tensorboard=True, **TINY_RUN)
    save_checkpoint = train_module.save_checkpoint

    def killed_at_epoch_1(out, model, state):
        if state["epoch"] == 1:
            raise KeyboardInterrupt
        save_checkpoint(out, model, state)

    monkeypatch.setattr(train_module, "save_checkpoint", killed_at_epoch_1)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    assert [step for step, _ in read_events(run)["loss/train"]] == [1, 2]
    monkeypatch.undo()
    config.resume = True
    train(config)
    assert_events_are_the_metrics(run, 3)


def test_without_tensorboard_installed_the_option_is_refused_before_anything_is_written(tiny_cache, tmp_path,
                                                                                       monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(EvlCacheError, match=r"pip install 'evl-cache\[tensorboard\]'"):
        train(TrainConfig(features=tiny_cache, out=tmp_path / "run", epochs=1, tensorboard=True, **TINY_RUN))
    assert not (tmp_path / "run").exists()
