"""Errors a user can fix carry the file and a one-line reason; callers tell them apart by type."""
from __future__ import annotations

from pathlib import Path

from evl_cache.errors import (
    BackboneError,
    BadVideoError,
    CacheError,
    CheckpointError,
    DatasetError,
    DownloadError,
    EvlCacheError,
)


def test_the_message_is_the_file_and_the_reason():
    error = BadVideoError("no video stream", Path("a/b.mp4"))
    assert str(error) == "a/b.mp4: no video stream"
    assert (error.path, error.reason) == ("a/b.mp4", "no video stream")
    assert str(EvlCacheError("--out is required")) == "--out is required"


def test_every_kind_is_a_user_error():
    for kind in (BadVideoError, DatasetError, BackboneError, DownloadError, CacheError, CheckpointError):
        assert issubclass(kind, EvlCacheError)
    assert issubclass(DownloadError, BackboneError)  # a missing download is a backbone that cannot load
