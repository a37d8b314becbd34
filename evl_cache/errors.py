"""Error types: each carries the file it concerns and a one-line reason.

The CLI turns any `EvlCacheError` into a one-line message and a non-zero exit; anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

from pathlib import Path


class EvlCacheError(Exception):
    """Base class for errors a user can fix (bad input, incompatible options)."""

    def __init__(self, reason: str, path: str | Path | None = None):
        self.reason = reason
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {reason}" if self.path else reason)


class BadVideoError(EvlCacheError):
    """A video that cannot be decoded or sampled; extraction records it as failed and goes on."""


class DatasetError(EvlCacheError):
    """The video folder, list or CSV cannot be read, or holds no usable videos."""


class BackboneError(EvlCacheError):
    """The open_clip model or its weights cannot be loaded."""


class DownloadError(BackboneError):
    """Weights named by an open_clip tag could not be downloaded (no network?); a local file would do."""


class CacheError(EvlCacheError):
    """A cache that cannot be opened, written, or cannot serve the requested options."""


class CheckpointError(EvlCacheError):
    """A run folder or checkpoint that is missing, incomplete, or does not match."""
