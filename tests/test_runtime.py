"""The device a command runs on, the versions it records, the memory it may take."""
from __future__ import annotations

import os

import pytest
import torch

from evl_cache.errors import EvlCacheError
from evl_cache.runtime import (
    __version__,
    bind_device,
    deterministic_kernels,
    device_memory_available,
    library_versions,
    memory_available,
    resolve_device,
)


def test_auto_is_cuda_only_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(EvlCacheError, match="CUDA is not available"):
        resolve_device("cuda:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_a_device_that_is_not_one_is_a_user_error():
    with pytest.raises(EvlCacheError, match="not a device"):
        resolve_device("gpu0")


def test_versions_name_the_libraries_that_shape_the_numbers():
    versions = library_versions()
    assert versions["evl_cache"] == __version__ and versions["torch"] == torch.__version__
    assert set(versions) == {"evl_cache", "torch", "open_clip", "av", "zarr", "h5py", "numpy"}


def test_memory_available_reads_meminfo():
    available = memory_available()
    assert available is None or available > 2**20


def test_a_cuda_device_gets_its_index_and_becomes_the_current_one(monkeypatch):
    current = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: current.append(index))
    assert bind_device(torch.device("cuda")) == torch.device("cuda", 2)
    assert bind_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert bind_device(torch.device("cpu")) == torch.device("cpu") and current == [2, 1]


def test_cuda_runs_use_deterministic_kernels_while_they_run(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    with deterministic_kernels(torch.device("cpu")):
        assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(torch.device("cuda", 0)):
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert torch.is_deterministic_algorithms_warn_only_enabled()  # an op without one warns, and runs
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.deterministic


def test_device_memory_counts_what_torch_holds_on_the_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3_000, 10_000))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 500)
    assert device_memory_available(torch.device("cuda", 0)) == 3_500
    assert device_memory_available(torch.device("cpu")) == memory_available()
