"""Several processes under torchrun (gloo, CPU): the same results as one process."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from evl_cache.store import DONE, PENDING, FeatureStore

ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _extract_args(videos, out):
    return ["extract", "--videos", str(videos), "--out", str(out), "--model", "EVL-Tiny", "--pretrained", "none",
            "--frames", "4", "--stride", "3", "--eval-views", "2", "--train-views", "2", "--blocks", "2",
            "--shard-size", "2", "--workers", "0", "--batch-size", "2"]


def _torchrun(args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
            str(29500 + os.getpid() % 1000), "-m", "evl_cache.cli"] + args


def _all_arrays(path):
    import zarr
    group = zarr.open_group(str(path), mode="r")

    def walk(g, prefix=""):
        for name, member in g.members():
            if isinstance(member, zarr.Group):
                yield from walk(member, prefix + name + "/")
            else:
                yield prefix + name
    return {name: np.asarray(group[name][...]) for name in walk(group)}


@pytest.fixture(scope="module")
def reference_cache(sample_videos, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "ref.zarr"
    subprocess.run([sys.executable, "-m", "evl_cache.cli"] + _extract_args(sample_videos, out), env=ONE_THREAD,
                   check=True, capture_output=True)
    return out


def test_two_process_extraction_equals_one_process(sample_videos, reference_cache, tmp_path):
    out = tmp_path / "two.zarr"
    result = subprocess.run(_torchrun(_extract_args(sample_videos, out)), env=ONE_THREAD, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("extract: ") == 1  # one summary, from the main process
    ranks = {line.split('"rank": ')[1][0] for line in Path(str(out) + ".extract.jsonl").read_text().splitlines()
             if '"rank"' in line}
    assert ranks == {"0", "1"}
    a, b = _all_arrays(reference_cache), _all_arrays(out)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_killed_two_process_extraction_resumes(sample_videos, reference_cache, tmp_path):
    out = tmp_path / "killed.zarr"
    process = subprocess.Popen(_torchrun(_extract_args(sample_videos, out)), env=ONE_THREAD,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = Path(str(out) + ".extract.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if metrics.exists() and metrics.read_text().count('"shard"') >= 2:
            break
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    with FeatureStore(out) as store:
        status = store.column("status")
    assert (status == PENDING).any() and (status == DONE).any(), "the kill did not land mid-way"
    result = subprocess.run(_torchrun(_extract_args(sample_videos, out)), env=ONE_THREAD, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _all_arrays(reference_cache), _all_arrays(out)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_hdf5_under_torchrun_is_refused(sample_videos, tmp_path):
    result = subprocess.run(_torchrun(_extract_args(sample_videos, tmp_path / "x.h5")), env=ONE_THREAD,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "under torchrun, extract to a .zarr cache" in result.stderr


def _train_args(cache, out):
    return ["train", "--features", str(cache), "--out", str(out), "--layers", "2", "--epochs", "3",
            "--batch-size", "8", "--lr", "3e-3", "--mlp-dropout", "0", "--head-dropout", "0", "--heads", "2",
            "--workers", "0"]


@pytest.fixture(scope="module")
def one_process_run(reference_cache, tmp_path_factory):
    one = tmp_path_factory.mktemp("one") / "run"
    result = subprocess.run([sys.executable, "-m", "evl_cache.cli"] + _train_args(reference_cache, one),
                            env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return one


@pytest.mark.parametrize("in_memory", [False, True], ids=["from-disk", "in-shared-memory"])
def test_two_process_training_equals_one_process(reference_cache, one_process_run, tmp_path, in_memory):
    from safetensors.torch import load_file
    two = tmp_path / "two"
    before = set(Path("/dev/shm").glob("evl-cache-*"))
    result = subprocess.run(_torchrun(_train_args(reference_cache, two) + (["--in-memory"] if in_memory else [])),
                            env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stderr and result.stdout.count("train: ") == 1
    if in_memory:  # one copy for the node, its name gone once both processes had it open
        assert result.stderr.count("in memory shared by this node's processes") == 2
        assert set(Path("/dev/shm").glob("evl-cache-*")) == before
    a, b = load_file(one_process_run / "last.safetensors"), load_file(two / "last.safetensors")
    assert a.keys() == b.keys()
    for name in a:  # the same global batches; only the order of float reductions differs
        torch_close = np.allclose(a[name].numpy(), b[name].numpy(), rtol=1e-4, atol=1e-5)
        assert torch_close, (name, float((a[name] - b[name]).abs().max()))
    metrics = [line for line in (two / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    assert len(metrics) == 3  # written once, by the main process
