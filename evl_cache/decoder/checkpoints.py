"""A training run's folder on disk: made (or checked for a resume), checkpointed every epoch so that a
kill anywhere resumes to the same weights, and removed by `--overwrite` only when it is one.

Every file is written under a temporary name and renamed into place. Epoch E is finished once
`checkpoints/LATEST` names it, and that is written last: a kill before it redoes epoch E (and rewrites
every file of it), a kill after it finds all of them written.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from .run import saved_weights

# What a run folder holds; --overwrite removes a folder only when it holds nothing else.
RUN_FILES = ("config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "curve.png", "checkpoints",
             "eval_*.json", "per_class_*.csv", "confusion_*.png", "*.partial", "tensorboard", "towers.pt")


CACHE_DIFFERS = "the cache differs from the one the run started on"


def atomic_save(write: Callable[[Path], None], path: Path) -> None:
    """Write `path` through `write(temporary path)`, then rename it into place."""
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def _foreign_entries(out: Path) -> list[str]:
    """Entries of `out` that no evl-cache run writes."""
    return sorted(p.name for p in out.iterdir() if not any(p.match(pattern) for pattern in RUN_FILES))


def check_run_folder(out: Path, protected: list[Path], overwrite: bool, resume: bool) -> None:
    """Refuse a run folder that is not ours to write, before anything is written: one that is (or
    holds) a path in `protected` (the cache), or that holds files no run writes, or an existing run
    without --resume or --overwrite."""
    resolved = out.resolve()
    for path in protected:
        if "://" not in str(path) and (Path(path).resolve() == resolved or resolved in Path(path).resolve().parents):
            raise CheckpointError(f"the run folder is (or holds) {path}: give the run a folder of its own", out)
    if not out.exists():
        return
    if not out.is_dir():
        raise CheckpointError("exists and is not a folder", out)
    foreign = _foreign_entries(out)
    if foreign:
        raise CheckpointError(f"exists and is not an evl-cache run folder (it holds {foreign[0]!r}"
                              f"{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}); choose another "
                              f"--out", out)
    if any(out.iterdir()) and not (resume or overwrite):
        raise CheckpointError("run folder exists; pass --resume to continue it or --overwrite to start again", out)


def prepare_run_folder(out: Path, run_config: dict, overwrite: bool, resume: bool, resumable_changes: set[str],
                       options: str = "train", inputs: tuple[str, str] = ("cache", CACHE_DIFFERS)) -> None:
    """Create the run folder, or check that a resumed one was started with the same options (those in
    `resumable_changes` may differ) and inputs. `options` names the run config's table of options,
    `inputs` its table holding the inputs' `fingerprint` and the reason given when it differs.
    `check_run_folder` has accepted the folder."""
    if out.exists() and overwrite:
        shutil.rmtree(out)
    saved_config = out / "config.json"
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    for stray in (*out.glob("*.partial"), *(out / "checkpoints").glob("*.partial")):  # a kill mid-write left it
        shutil.rmtree(stray) if stray.is_dir() else stray.unlink()
    latest = out / "checkpoints" / "LATEST"
    if latest.exists():  # a kill after LATEST moved on, before the older checkpoint was removed
        _remove_checkpoints_but(out, latest.read_text().strip())
    if resume and saved_config.exists():
        old = json.loads(saved_config.read_text())
        diffs = [f"{k}: run has {old[options].get(k)!r}, asked for {v!r}"
                 for k, v in run_config[options].items()
                 if k not in resumable_changes and old[options].get(k) != v]
        table, reason = inputs
        if old.get(table, {}).get("fingerprint") != run_config[table]["fingerprint"]:
            diffs.append(reason)
        if diffs:
            raise CheckpointError("cannot resume with different options (" + "; ".join(diffs) + ")", out)
        return
    atomic_save(lambda p: p.write_text(json.dumps(run_config, indent=2)), saved_config)


def keep_finished_epochs(metrics_path: Path, last_epoch: int) -> None:
    """Drop what a killed run wrote to metrics.jsonl after its last checkpointed epoch (the epochs a
    resumed run redoes, a summary, a line the kill cut short), so that each epoch is there once. A
    `start` record (the evaluation before the first epoch) stays once an epoch is finished (before that,
    the resumed run makes it again)."""
    if not metrics_path.exists():
        return
    kept = []
    for line in metrics_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # only the last line can be cut short, and it is redone
            continue
        finished = record.get("event") == "epoch" and record["epoch"] <= last_epoch
        if finished or (record.get("event") == "start" and last_epoch >= 0):
            kept.append(line)
    atomic_save(lambda p: p.write_text("".join(line + "\n" for line in kept)), metrics_path)


def latest_state(out: Path) -> dict | None:
    """The weights and training state of the last finished epoch, if any, on the CPU (the optimizer
    moves its state to its parameters' device when it loads it).

    `state.pt` holds tensors and plain values only, and is read as such (`weights_only`): unpickling
    anything else would run whatever code a run folder from elsewhere names. Run folders of earlier
    versions of evl-cache hold the same kinds of values and resume too."""
    latest = out / "checkpoints" / "LATEST"
    if not latest.exists():
        return None
    state_dir = out / "checkpoints" / latest.read_text().strip()
    try:
        state = torch.load(state_dir / "state.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f" ({named.group(1)})" if named else ""
        raise CheckpointError(f"holds objects other than tensors and plain values{what}: not loaded, as unpickling "
                              f"them could run any code", state_dir / "state.pt") from None
    return {"weights": load_file(state_dir / "weights.safetensors"), **state}


def save_checkpoint(out: Path, model: nn.Module, state: dict) -> None:
    """Write epoch E's weights and state to checkpoints/epoch_E and last.safetensors, then point LATEST
    at it: the step that makes epoch E finished."""
    name = f"epoch_{state['epoch']:04d}"
    folder = out / "checkpoints" / name
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = saved_weights(model)
    save_file(weights, tmp / "weights.safetensors")
    torch.save(state, tmp / "state.pt")
    os.replace(tmp, folder)
    atomic_save(lambda p: save_file(weights, p), out / "last.safetensors")
    atomic_save(lambda p: p.write_text(name), out / "checkpoints" / "LATEST")
    _remove_checkpoints_but(out, name)


def _remove_checkpoints_but(out: Path, name: str) -> None:
    for old in (out / "checkpoints").glob("epoch_*"):
        if old.name != name:
            shutil.rmtree(old)
