"""Processes under torchrun: several (gloo, CPU) and one alone (NCCL on a GPU suite) give the results of
one process without torchrun; a collective's tensor is made where the group's backend takes it."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from click.testing import CliRunner
from conftest import DEVICE, assert_trained_alike

import evl_cache.distributed as distributed
from evl_cache.cache.dataset import CacheDataset, CacheLoader, select_features, usable_videos
from evl_cache.cache.store import DONE, PENDING, FeatureStore
from evl_cache.cache.verify import VerifyConfig, verify
from evl_cache.cli import main
from evl_cache.distributed import Process, barrier, collective_device, gather_objects, init_process, sum_across

slow = pytest.mark.slow  # the tests that start torchrun jobs

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _extract_args(videos, out, device="cpu"):
    """An int8 cache of the outlier tower: its calibration is fitted by the main process before any shard
    is written, and read from the cache by the others (and by a resume)."""
    return ["extract", "--videos", str(videos), "--out", str(out), "--model", "EVL-Tiny", "--pretrained",
            "none+outliers", "--storage", "int8", "--frames", "4", "--stride", "3", "--eval-views", "2",
            "--train-views", "2", "--blocks", "2", "--shard-size", "2", "--workers", "0", "--batch-size", "2",
            "--device", device]


def _torchrun(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(29500 + os.getpid() % 1000), "-m", "evl_cache.cli"] + args


def _run_torchrun(args, nproc=2):
    """Run `args` under torchrun on `nproc` processes; it must succeed."""
    result = subprocess.run(_torchrun(args, nproc), env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _start_torchrun_until(args, metrics: Path, condition) -> subprocess.Popen:
    """Start `args` under torchrun on 2 processes; return once `condition(text of metrics)` holds."""
    process = subprocess.Popen(_torchrun(args), env=ONE_THREAD, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and condition(metrics.read_text()):
            break
        time.sleep(0.01)
    return process


def _workers(process) -> list[int]:
    """The process ids of a torchrun job's processes (torchrun starts each in a session of its own, so
    killing torchrun's process group leaves them running)."""
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as handle:
        return [int(pid) for pid in handle.read().split()]


def _all_arrays(path):
    """Every array of a cache as its own library sees it: zarr, or plain h5py (strings decoded)."""
    if path.suffix == ".h5":
        import h5py
        found = {}
        with h5py.File(path, "r") as file:
            file.visititems(lambda name, item: found.__setitem__(name, item.asstr()[...] if h5py.check_string_dtype(
                item.dtype) else item[...]) if isinstance(item, h5py.Dataset) else None)
        return found
    import zarr
    group = zarr.open_group(str(path), mode="r")

    def walk(g, prefix=""):
        for name, member in g.members():
            if isinstance(member, zarr.Group):
                yield from walk(member, prefix + name + "/")
            else:
                yield prefix + name
    return {name: np.asarray(group[name][...]) for name in walk(group)}


def _assert_same_cache(actual, expected):
    a, b = _all_arrays(actual), _all_arrays(expected)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _status(cache):
    with FeatureStore(cache) as store:
        return store.column("status")


@pytest.fixture(scope="module")
def reference_cache(sample_videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    subprocess.run([sys.executable, "-m", "evl_cache.cli"] + _extract_args(sample_videos, out), env=ONE_THREAD,
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def reference_h5(sample_videos, tmp_path_factory):
    """The same extraction into one HDF5 file, by one process."""
    out = tmp_path_factory.mktemp("ref_h5") / "ref.h5"
    result = CliRunner().invoke(main, _extract_args(sample_videos, out))
    assert result.exit_code == 0, result.output
    return out


@slow
def test_two_process_extraction_equals_one_process(sample_videos, reference_cache, tmp_path):
    out = tmp_path / "two.zarr"
    result = _run_torchrun(_extract_args(sample_videos, out))
    assert result.stdout.count("extract: ") == 1  # one summary, from the main process
    ranks = {line.split('"rank": ')[1][0] for line in Path(str(out) + ".extract.jsonl").read_text().splitlines()
             if '"rank"' in line}
    assert ranks == {"0", "1"}
    _assert_same_cache(out, reference_cache)


@slow
def test_killed_two_process_extraction_resumes(sample_videos, reference_cache, tmp_path):
    out = tmp_path / "killed.zarr"
    process = _start_torchrun_until(_extract_args(sample_videos, out), Path(str(out) + ".extract.jsonl"),
                                    lambda text: text.count('"shard"') >= 2)
    for pid in _workers(process):  # each with its session (and DataLoader workers), then torchrun
        os.killpg(pid, signal.SIGKILL)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    status = _status(out)
    assert (status == PENDING).any() and (status == DONE).any(), "the kill did not land mid-way"
    result = _run_torchrun(_extract_args(sample_videos, out))
    assert f"{int((status == DONE).sum())} skipped" in result.stdout  # only what was missing
    _assert_same_cache(out, reference_cache)


@slow
def test_two_process_hdf5_extraction_is_one_cache_of_two_part_files(sample_videos, reference_h5, tmp_path):
    out = tmp_path / "two.h5"
    _run_torchrun(_extract_args(sample_videos, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two.h5", "two.h5.extract.jsonl", "two.part-0-of-2.h5",
                                                          "two.part-1-of-2.h5"]
    _assert_same_cache(out, reference_h5)  # every array, read through the virtual datasets by plain h5py
    with FeatureStore(out) as store, FeatureStore(tmp_path / "two.part-1-of-2.h5") as part:
        assert store.parts == 2 and part.parts == 1
        shards = -(-store.num_videos // store.attrs["shard_size"])
        # shard s lives in part s % 2: the other part holds nothing of it (pending, no data)
        for s in range(shards):
            rows = slice(2 * s, 2 * s + 2)
            written = (part.column("status", rows) != PENDING).any() or part.array("embed")[rows].any()
            assert written == (s % 2 == 1), s
    assert verify(VerifyConfig(out)).ok
    # the loader reads each video from its part file: the batches of the one-file cache
    with FeatureStore(out) as store:
        attrs, videos = store.attrs, usable_videos(store, ("train", "val"))
    selection = select_features(attrs, 2, None, 1, True)
    joined, single = (list(CacheLoader.sequential(CacheDataset(c, videos, selection), 5, workers=2))
                      for c in (out, reference_h5))
    for a, b in zip(joined, single, strict=True):
        for key in ("tokens", "maps_prev", "maps_next"):
            assert all(x.equal(y) for x, y in zip(a[key], b[key], strict=True)), key
    result = CliRunner().invoke(main, ["info", str(out)])
    assert result.exit_code == 0 and "h5 joined from 2 part files" in result.output, result.output
    (tmp_path / "two.part-0-of-2.h5").rename(tmp_path / "elsewhere.h5")
    result = CliRunner().invoke(main, ["info", str(out)])
    assert result.exit_code == 1 and "part file two.part-0-of-2.h5 of the cache is missing" in result.output


def _rank_of(pid):
    with open(f"/proc/{pid}/environ", "rb") as handle:
        variables = dict(v.split(b"=", 1) for v in handle.read().split(b"\0") if b"=" in v)
    return int(variables.get(b"RANK", b"-1"))


@slow
def test_hdf5_extraction_resumes_after_a_rank_died(sample_videos, reference_h5, tmp_path):
    """SIGKILL rank 1 once it wrote a shard (torchrun then stops rank 0); the same command finishes
    only what is missing; a copy of the killed cache resumed by one process (which then writes both
    parts) gives the same cache."""
    out = tmp_path / "killed.h5"
    process = _start_torchrun_until(_extract_args(sample_videos, out), Path(str(out) + ".extract.jsonl"),
                                    lambda text: '"rank": 1' in text)
    rank_one = [pid for pid in _workers(process) if _rank_of(pid) == 1]
    assert rank_one, "rank 1 was not running"
    os.kill(rank_one[0], signal.SIGKILL)
    assert process.wait(timeout=120) != 0
    status = _status(out)
    assert (status == PENDING).any() and (status == DONE).any(), "the kill did not land mid-way"
    copy = tmp_path / "copy"
    copy.mkdir()
    for file in tmp_path.glob("killed*.h5"):
        shutil.copy(file, copy / file.name)
    result = _run_torchrun(_extract_args(sample_videos, out))
    assert f"{int((status == DONE).sum())} skipped" in result.stdout
    _assert_same_cache(out, reference_h5)
    result = CliRunner().invoke(main, _extract_args(sample_videos, copy / "killed.h5"))
    assert result.exit_code == 0, result.output
    _assert_same_cache(copy / "killed.h5", reference_h5)


def _train_args(cache, out, device="cpu"):
    return ["train", "--features", str(cache), "--out", str(out), "--layers", "2", "--epochs", "3",
            "--batch-size", "8", "--lr", "3e-3", "--mlp-dropout", "0", "--head-dropout", "0", "--heads", "2",
            "--workers", "0", "--device", device]


@pytest.fixture(scope="module")
def one_process_run(reference_cache, tmp_path_factory):
    one = tmp_path_factory.mktemp("one") / "run"
    result = subprocess.run([sys.executable, "-m", "evl_cache.cli"] + _train_args(reference_cache, one),
                            env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return one


@slow
@pytest.mark.parametrize("in_memory", [False, True], ids=["from-disk", "in-shared-memory"])
def test_two_process_training_equals_one_process(reference_cache, one_process_run, tmp_path, in_memory):
    from safetensors.torch import load_file
    two = tmp_path / "two"
    before = set(Path("/dev/shm").glob("evl-cache-*"))
    result = _run_torchrun(_train_args(reference_cache, two) + (["--in-memory"] if in_memory else []))
    assert "2 process(es)" in result.stderr and result.stdout.count("train: ") == 1
    if in_memory:  # one copy for the node, its name gone once both processes had it open
        assert result.stderr.count("in memory shared by this node's processes") == 2
        assert set(Path("/dev/shm").glob("evl-cache-*")) == before
    steps = json.loads((two / "metrics.jsonl").read_text().splitlines()[-1])["steps"]
    assert_trained_alike(load_file(two / "last.safetensors"), load_file(one_process_run / "last.safetensors"),
                         lr=3e-3, steps=steps)
    metrics = [line for line in (two / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert len(metrics) == 3  # written once, by the main process


@pytest.fixture
def group(tmp_path):
    """make(backend): a process group of this process alone, made as `backend` says; gone after the test."""
    def make(backend: str) -> Process:
        dist.init_process_group(backend, init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
        return Process(joined=True)

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_collective_takes_the_device_its_backend_needs(group, monkeypatch):
    process = group("cpu:gloo,cuda:gloo")
    assert collective_device() == torch.device("cpu")
    assert sum_across(process, [1.5, 2, 3]) == [1.5, 2.0, 3.0]
    assert gather_objects(process, {"a": 1}) == [{"a": 1}]
    barrier(process)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    for config, device in (("nccl", torch.device("cuda", 2)), ("cpu:gloo,cuda:nccl", torch.device("cpu")),
                           ("gloo", torch.device("cpu")), ("cuda:nccl", torch.device("cuda", 2))):
        monkeypatch.setattr(dist, "get_backend_config", lambda group=None, config=config: config)
        assert collective_device() == device, config


class Reached(Exception):
    pass


def test_sums_and_barriers_are_made_on_that_device(group, monkeypatch):
    """NCCL takes CUDA tensors only: the tensor of a sum is made on the device `collective_device` names
    (here a stand-in), and an NCCL barrier names its GPU."""
    process = group("gloo")
    seen = []
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("meta"))

    def all_reduce(tensor):
        seen.append(tensor.device)
        raise Reached

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reached):
        sum_across(process, [1.0, 2.0])
    assert seen == [torch.device("meta")]
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("cuda", 3))
    monkeypatch.setattr(dist, "barrier", lambda device_ids=None: seen.append(device_ids))
    barrier(process)
    assert seen[-1] == [3]
    assert sum_across(Process(), [1.0]) == [1.0] and not Process().joined  # no job: no collective


def _join_a_one_process_job(monkeypatch) -> None:
    """The environment torchrun gives its one process (on a free port)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for name, value in dict(WORLD_SIZE="1", RANK="0", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)


def test_one_process_under_torchrun_joins_the_job(monkeypatch):
    """torchrun with one process: the same collectives as many (and NCCL's device rules on a GPU)."""
    _join_a_one_process_job(monkeypatch)
    try:
        process = init_process(torch.device("cpu"))
        assert process.joined and process.world_size == 1 and dist.get_backend() == "gloo"
        assert sum_across(process, [2.0]) == [2.0]
    finally:
        dist.destroy_process_group()
    monkeypatch.delenv("WORLD_SIZE")
    assert init_process(torch.device("cpu")) == Process()


def test_a_command_leaves_the_job_when_it_ends(sample_videos, tmp_path, monkeypatch):
    """The command line leaves the process group when its command ends, whether it succeeded or failed."""
    _join_a_one_process_job(monkeypatch)
    out = tmp_path / "cache.zarr"
    args = ["extract", "--videos", str(sample_videos), "--out", str(out), "--model", "EVL-Tiny", "--pretrained",
            "none", "--frames", "2", "--eval-views", "1", "--train-views", "1", "--workers", "0"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert not dist.is_initialized()
    result = CliRunner().invoke(main, args + ["--frames", "3"])  # resuming with other frames is refused
    assert result.exit_code == 1 and "error: " in result.output, result.output
    assert not dist.is_initialized()


@slow
def test_one_process_under_torchrun_extracts_and_trains_as_without_it(sample_videos, tmp_path):
    """On the suite's device: NCCL on a GPU, the backend that takes CUDA tensors only."""
    plain, joined = tmp_path / "plain.zarr", tmp_path / "joined.zarr"
    for out, command in ((plain, [sys.executable, "-m", "evl_cache.cli"]), (joined, None)):
        args = _extract_args(sample_videos, out, DEVICE)
        if command is None:
            _run_torchrun(args, nproc=1)
        else:
            subprocess.run(command + args, env=ONE_THREAD, check=True, capture_output=True, timeout=300)
    _assert_same_cache(joined, plain)
    subprocess.run([sys.executable, "-m", "evl_cache.cli"] + _train_args(plain, tmp_path / "one", DEVICE),
                   env=ONE_THREAD, check=True, capture_output=True, timeout=300)
    result = _run_torchrun(_train_args(plain, tmp_path / "torchrun", DEVICE), nproc=1)
    assert "1 process(es)" in result.stderr and result.stdout.count("train: ") == 1
    from safetensors.torch import load_file
    a, b = load_file(tmp_path / "one" / "last.safetensors"), load_file(tmp_path / "torchrun" / "last.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
