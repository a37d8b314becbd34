"""A run folder is made, checkpointed and removed only when it is one: --overwrite never deletes a
folder of other files or the cache the run reads."""
from __future__ import annotations

import json

import pytest
import torch

from evl_cache.decoder.checkpoints import (
    check_run_folder,
    keep_finished_epochs,
    latest_state,
    prepare_run_folder,
    save_checkpoint,
)
from evl_cache.decoder.model import DecoderConfig, EVLModel
from evl_cache.errors import CheckpointError


def _tree(root):
    return sorted((str(p.relative_to(root)), p.read_bytes() if p.is_file() else None) for p in root.rglob("*"))


def test_a_folder_of_other_files_is_refused_whatever_the_flags(tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "paper.tex").write_text("\\section{}")
    (folder / "metrics.jsonl").write_text("{}\n")
    before = _tree(tmp_path)
    for overwrite, resume in ((False, False), (True, False), (False, True)):
        with pytest.raises(CheckpointError, match="not an evl-cache run folder.*paper.tex"):
            check_run_folder(folder, [], overwrite, resume)
    assert _tree(tmp_path) == before


def test_the_cache_is_never_inside_the_run_folder(tmp_path):
    (tmp_path / "exp" / "feats.zarr").mkdir(parents=True)
    for out in (tmp_path / "exp", tmp_path / "exp" / "feats.zarr"):
        with pytest.raises(CheckpointError, match="is \\(or holds\\)"):
            check_run_folder(out, [tmp_path / "exp" / "feats.zarr"], True, False)


def test_an_existing_run_needs_resume_or_overwrite(tmp_path):
    run = tmp_path / "run"
    prepare_run_folder(run, {"train": {"epochs": 3}, "cache": {"fingerprint": "a"}}, False, False, set())
    with pytest.raises(CheckpointError, match="pass --resume"):
        check_run_folder(run, [], False, False)
    check_run_folder(run, [], False, True)
    check_run_folder(run, [], True, False)
    check_run_folder(tmp_path / "new", [], False, False)


def test_a_resume_with_other_options_is_refused(tmp_path):
    run = tmp_path / "run"
    prepare_run_folder(run, {"train": {"epochs": 3, "workers": 2}, "cache": {"fingerprint": "a"}}, False, False, set())
    prepare_run_folder(run, {"train": {"epochs": 3, "workers": 0}, "cache": {"fingerprint": "a"}}, False, True,
                       {"workers"})
    with pytest.raises(CheckpointError, match="epochs: run has 3, asked for 4"):
        prepare_run_folder(run, {"train": {"epochs": 4}, "cache": {"fingerprint": "a"}}, False, True, set())
    with pytest.raises(CheckpointError, match="cache differs"):
        prepare_run_folder(run, {"train": {"epochs": 3}, "cache": {"fingerprint": "b"}}, False, True, {"workers"})


def test_a_run_of_another_command_names_its_own_options_and_inputs(tmp_path):
    run, inputs = tmp_path / "run", ("inputs", "the videos differ")
    first = {"finetune": {"epochs": 3}, "inputs": {"fingerprint": "a"}}
    prepare_run_folder(run, first, False, False, set(), options="finetune", inputs=inputs)
    prepare_run_folder(run, first, False, True, set(), options="finetune", inputs=inputs)
    with pytest.raises(CheckpointError, match="epochs: run has 3, asked for 4; the videos differ"):
        prepare_run_folder(run, {"finetune": {"epochs": 4}, "inputs": {"fingerprint": "b"}}, False, True, set(),
                           options="finetune", inputs=inputs)


def test_checkpoints_keep_the_last_finished_epoch_only(tmp_path):
    run = tmp_path / "run"
    prepare_run_folder(run, {"train": {}, "cache": {"fingerprint": "a"}}, False, False, set())
    model = EVLModel(DecoderConfig(width=16, grid=(2, 2), frames=2, num_classes=3, layers=1, heads=2))
    for epoch in range(3):
        save_checkpoint(run, model, {"epoch": epoch, "step": 2 * epoch, "best_top1": 0.5})
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["LATEST", "epoch_0002"]
    state = latest_state(run)
    assert state["epoch"] == 2 and state["step"] == 4 and set(state["weights"]) == set(model.state_dict())


def test_metrics_keep_only_checkpointed_epochs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"event": "epoch", "epoch": e}) + "\n" for e in range(4))
                    + '{"event": "summary"}\n{"event": "epo')
    keep_finished_epochs(path, 1)
    assert [json.loads(line)["epoch"] for line in path.read_text().splitlines()] == [0, 1]
    path.write_text('{"event": "start", "val_top1": 0.25}\n' + '{"event": "epoch", "epoch": 0}\n{"event": "summary"}\n')
    keep_finished_epochs(path, 0)
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["start", "epoch"]
    keep_finished_epochs(path, -1)  # killed before its first checkpoint: the resumed run evaluates its start again
    assert path.read_text() == ""


class Note:
    """Anything but tensors and plain values."""


def test_a_state_saved_on_a_gpu_loads_onto_the_cpu_and_other_objects_are_refused(tmp_path, monkeypatch):
    run = tmp_path / "run"
    prepare_run_folder(run, {"train": {}, "cache": {"fingerprint": "a"}}, False, False, set())
    model = EVLModel(DecoderConfig(width=16, grid=(2, 2), frames=2, num_classes=3, layers=1, heads=2))
    state = {"epoch": 0, "step": 1, "best_top1": 0.5, "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}},
             "rng": [{"cpu": torch.get_rng_state(), "cuda": torch.zeros(8, dtype=torch.uint8)}]}
    on_gpu = [(0, lambda storage: "cuda:0", lambda storage, location: None)] + torch.serialization._package_registry
    with monkeypatch.context() as patched:  # every tensor saved as cuda:0's, as a GPU run saves them
        patched.setattr(torch.serialization, "_package_registry", on_gpu)
        save_checkpoint(run, model, state)
    loaded = latest_state(run)
    assert loaded["optimizer"]["state"][0]["exp_avg"].device == torch.device("cpu")
    assert loaded["rng"][0]["cuda"].device == torch.device("cpu") and loaded["step"] == 1
    save_checkpoint(run, model, {**state, "epoch": 1, "note": Note()})
    with pytest.raises(CheckpointError, match=r"epoch_0001/state.pt: holds objects other than tensors and plain "
                                              r"values \(test_checkpoints.Note\): not loaded"):
        latest_state(run)
