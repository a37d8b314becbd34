"""The device a command runs on, the versions it records, the memory it may take."""
from __future__ import annotations

import pytest
import torch

from evl_cache.errors import EvlCacheError
from evl_cache.runtime import __version__, library_versions, memory_available, resolve_device


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
