"""Other projects' checkpoints are read without running their code, and loaded only when they fit."""
from __future__ import annotations

import pickle
from collections import OrderedDict

import pytest
import torch
from torch import nn

from evl_cache.errors import CheckpointError
from evl_cache.towers.checkpoint_files import load_checkpoint, load_exactly, model_state


class TrainingConfig:
    """A class of someone's training code, pickled beside their weights."""

    def __init__(self):
        self.lr = 0.1


class Payload:
    """An object whose unpickling would run code."""

    def __reduce__(self):
        return (open, ("/tmp/evl-cache-should-not-exist", "w"))


def test_unknown_classes_are_read_as_plain_dicts_and_nothing_runs(tmp_path):
    path = tmp_path / "released.pth"
    torch.save({"model": {"module.w": torch.ones(2)}, "config": TrainingConfig()}, path)
    checkpoint = load_checkpoint(path)
    assert isinstance(checkpoint["config"], OrderedDict) and torch.equal(checkpoint["model"]["module.w"], torch.ones(2))
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as handle:
        pickle.dump({"model": Payload()}, handle)
    with pytest.raises(CheckpointError, match="cannot read as a torch checkpoint"):
        load_checkpoint(evil)
    import os
    assert not os.path.exists("/tmp/evl-cache-should-not-exist")


def test_missing_and_unreadable_files_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "none.pth")
    text = tmp_path / "text.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(text)


def test_state_dicts_lose_the_data_parallel_prefix_and_must_fit_exactly(tmp_path):
    assert list(model_state({"model": {"module.a.weight": torch.zeros(1)}}, "x")) == ["a.weight"]
    with pytest.raises(CheckpointError, match="no state dict"):
        model_state({"model": {"a": 1}}, "x")
    model = nn.Linear(2, 3)
    load_exactly(model, {"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, "x", "the head")
    assert torch.equal(model.weight, torch.ones(3, 2))
    with pytest.raises(CheckpointError, match="missing \\['bias'\\]"):
        load_exactly(model, {"weight": torch.ones(3, 2)}, "x", "the head")
    with pytest.raises(CheckpointError, match="weight has shape \\(2, 2\\), the head needs \\(3, 2\\)"):
        load_exactly(model, {"weight": torch.ones(2, 2), "bias": torch.zeros(3)}, "x", "the head")
