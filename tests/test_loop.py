"""The training loop's shared steps: the schedule, the generators, restoring a killed run, the epoch log."""
import dataclasses
import json
import math

import pytest
import torch

import evl_cache.decoder.train as train_module
from evl_cache.decoder.loop import cosine_lr, log_epoch, restore, restore_rng, rng_state
from evl_cache.decoder.model import DecoderConfig, EVLModel
from evl_cache.decoder.run import saved_weights
from evl_cache.decoder.train import TrainConfig
from evl_cache.distributed import Process


def test_cosine_schedule_warms_up_then_decays_to_its_floor():
    assert [cosine_lr(step, 10, 4) for step in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine_lr(4, 10, 4) == 1.0 and cosine_lr(10, 10, 4) == pytest.approx(0.0)
    assert cosine_lr(7, 10, 4) == pytest.approx(0.5)  # half way through the decay
    assert cosine_lr(10, 10, 4, floor=0.01) == pytest.approx(0.01)
    assert cosine_lr(7, 10, 4, floor=0.01) == pytest.approx(0.01 + 0.99 * 0.5)
    assert cosine_lr(50, 10, 0, floor=0.01) == pytest.approx(0.01)  # past the end it stays at the floor
    assert math.isclose(cosine_lr(0, 10, 0), 1.0)


def test_a_cpu_run_resumed_on_cuda_starts_its_loss_scaler_afresh(tmp_path):
    """A CPU run's disabled scaler saved {}: an enabled one (CUDA's, here the CPU's own) keeps its start."""
    config = TrainConfig(features=tmp_path, out=tmp_path, batch_size=8)
    model = EVLModel(DecoderConfig(width=16, grid=(2, 2), frames=2, num_classes=3, layers=1, heads=2))
    opt = train_module._optimisation(config, model, 16, torch.device("cpu"), 1)
    resumed = {"weights": saved_weights(model), "optimizer": opt.optimizer.state_dict(), "step": 2,
               "schedule": opt.schedule.state_dict(), "scaler": opt.scaler.state_dict(), "epoch": 0,
               "best_top1": 0.5, "rng": [{"cpu": torch.get_rng_state(), "cuda": None}], "device": "cpu"}
    assert resumed["scaler"] == {}
    enabled = dataclasses.replace(opt, scaler=torch.amp.GradScaler("cpu", init_scale=1024.0))
    assert restore(resumed, tmp_path, model, enabled, Process(), torch.device("cpu"), 0) == (1, 2, 0.5)
    assert enabled.scaler.get_scale() == 1024.0
    assert restore(None, tmp_path, model, enabled, Process(), torch.device("cpu"), 0) == (0, 0, -1.0)


def test_cuda_generators_are_saved_and_restored(monkeypatch):
    """Dropout on CUDA draws from the device's generator: a checkpoint holds it, a resume sets it, and a
    checkpoint without one (a CPU run's) seeds it from (seed, epoch, rank)."""
    cuda = torch.device("cuda", 1)
    calls = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.full((4,), device.index, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: calls.append(("set", state.tolist(), device)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("seed", seed)))
    saved = rng_state(cuda)
    assert saved["cpu"].equal(torch.get_rng_state()) and saved["cuda"].tolist() == [1, 1, 1, 1]
    assert rng_state(torch.device("cpu"))["cuda"] is None
    restore_rng(saved, cuda, 7, 3, 1)
    restore_rng({"cpu": saved["cpu"], "cuda": None}, cuda, 7, 3, 1)
    restore_rng(saved, torch.device("cpu"), 7, 3, 1)  # a GPU run resumed on a CPU: the CPU's only
    assert calls == [("set", [1, 1, 1, 1], cuda), ("seed", 7 * 1_000_003 + 3 * 7_919 + 1)]


def test_each_epoch_is_one_line_of_metrics(tmp_path):
    class Events:
        added = []

        def add(self, record):
            self.added.append(record)

    events = Events()
    log_epoch(tmp_path, {"event": "epoch", "epoch": 0, "train_loss": 1.5}, events)
    log_epoch(tmp_path, {"event": "epoch", "epoch": 1, "train_loss": 1.0}, None)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and [r["epoch"] for r in events.added] == [0]
