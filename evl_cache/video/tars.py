"""WebDataset tar shards: videos read from the members of `.tar` files in place, never unpacked.

The layout is the one video2dataset and clip-video-encode write: members grouped by key, a member's
name up to the first dot of its file name (`0000042.mp4` beside `0000042.json`, `0000042.txt`,
`0000042.cls`). Each video member is one entry, with the path `SHARD#MEMBER` relative to the shards'
folder (`000003.tar#0000042.mp4`). Its label is the `.cls` member's text or, with `label_field`, that
field of the `.json` member: a class index or a class name, as in a CSV.

Shards are a brace pattern (`shards/{000000..000127}.tar`, or `{a,b}` lists), one `.tar` file, or a
folder whose top level holds `.tar` files. A shard that is missing or is not a tar is listed in
`VideoList.unreadable` with a warning. A truncated shard keeps its whole members: a video member cut
short fails alone, and the members after the cut, which cannot be listed, are named in `unreadable`.

Decoding opens a member with `open_tar_member`: each process lists a shard's headers once
(`member_index`, kept per process and inherited by forked DataLoader workers) and reads the member's
byte range with `os.pread`, so one open shard serves any number of readers.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadVideoError, DatasetError
from .find import VIDEO_SUFFIXES, ClassNames, VideoEntry, VideoList, label_index, warn_near_duplicates

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".tar"
MEMBER_SEPARATOR = "#"
_BLOCK = 512  # a tar header block; the archive ends with zero blocks


def expand_braces(pattern: str) -> list[str]:
    """Every name a brace pattern spells, in order: `{000..012}` numbers (zero-padded to the width
    written), `{a,b}` alternatives; several braces multiply."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if match is None:
        return [pattern]
    body, head, tail = match.group(1), pattern[:match.start()], pattern[match.end():]
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        if int(last) < int(first):
            raise DatasetError(f"brace range {{{body}}} runs backwards", pattern)
        items = [str(n).zfill(len(first)) for n in range(int(first), int(last) + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise DatasetError(f"brace {{{body}}} is neither a range {{000..127}} nor a list {{a,b}}", pattern)
    return [name for item in items for name in expand_braces(head + item + tail)]


def is_tar_input(videos: str | Path) -> bool:
    """Whether `--videos` names tar shards: a `.tar` file or a pattern of them (`{000..127}.tar`), or a
    folder whose top level holds `.tar` files."""
    path = Path(videos)
    try:
        if path.is_dir():
            return any(_is_shard_name(p.name) and p.is_file() for p in path.iterdir())
    except OSError:
        return False  # the folder scan reports it
    return str(videos).lower().endswith(SHARD_SUFFIX)


def _is_shard_name(name: str) -> bool:
    return name.lower().endswith(SHARD_SUFFIX) and not name.startswith(".")


def shard_paths(videos: str | Path) -> list[Path]:
    """The shards `--videos` names, in order; a folder holding class folders beside its shards is
    refused, as either reading would leave videos out."""
    path = Path(videos)
    if path.is_file():
        return [path]
    if path.is_dir():
        entries = sorted(path.iterdir())
        folders = [p.name for p in entries if p.is_dir() and not p.name.startswith(".")]
        if folders:
            raise DatasetError(f"holds both .tar shards and folders ({', '.join(folders[:3])}): give the shards "
                               "as a pattern ('DIR/{000000..000127}.tar') or move them to a folder of their own", path)
        return [p for p in entries if _is_shard_name(p.name) and p.is_file()]
    return [Path(name) for name in expand_braces(str(videos))]


@dataclass(frozen=True)
class TarIndex:
    """Where each whole regular member of a shard lies, the members cut short, and what was wrong with
    the shard ("" if nothing)."""
    members: dict[str, tuple[int, int]]  # name -> (offset of its data, size)
    cut: frozenset[str] = frozenset()
    problem: str = ""


KEPT_INDEXES = 64  # shards whose index a process keeps: a worker reads a shard's videos in runs
_INDEXES: OrderedDict[str, tuple[tuple[int, int], TarIndex]] = OrderedDict()  # real path -> ((size, mtime), index)


def member_index(shard: str | Path) -> TarIndex:
    """The shard's index, listed once per process while it is among the last `KEPT_INDEXES` used (again
    if the file changed); OSError if the shard cannot be read."""
    real = os.path.realpath(shard)
    stat = os.stat(real)
    key = (stat.st_size, stat.st_mtime_ns)
    known = _INDEXES.pop(real, None)
    if known is None or known[0] != key:
        known = key, _list_members(real, stat.st_size)
    _INDEXES[real] = known
    while len(_INDEXES) > KEPT_INDEXES:
        _INDEXES.popitem(last=False)
    return known[1]


def _list_members(path: str, size: int) -> TarIndex:
    """Read the headers of a tar (seeking past member data), noting members cut short and a damaged or
    missing end: tarfile stops silently at a bad header after the first."""
    members: dict[str, tuple[int, int]] = {}
    cut: set[str] = set()
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    info = tar.next()
                except tarfile.ReadError:  # the last member's data runs past the end of the file
                    break
                if info is None:
                    break
                if info.isfile() and info.offset_data + info.size > size:
                    cut.add(info.name)
                elif info.isfile():
                    members[info.name] = (info.offset_data, info.size)
            end = tar.offset
    except tarfile.ReadError as error:
        return TarIndex({}, problem=f"not a tar file ({error})")
    with open(path, "rb") as handle:
        handle.seek(end)
        whole = handle.read(_BLOCK) == bytes(_BLOCK)
    if whole and not cut:
        return TarIndex(members)
    return TarIndex(members, frozenset(cut), f"truncated after {len(members)} whole members; any members "
                                             "after the cut cannot be listed")


def tar_member(path: str | Path) -> tuple[str, str] | None:
    """(shard, member) of a `SHARD.tar#MEMBER` path whose shard is a file; None for any other path (a
    file whose own name holds `.tar#` is read as that file)."""
    text = str(path)
    at = text.find(SHARD_SUFFIX + MEMBER_SEPARATOR)
    if at < 0 or os.path.lexists(text):
        return None
    shard = text[:at + len(SHARD_SUFFIX)]
    return (shard, text[at + len(SHARD_SUFFIX) + 1:]) if os.path.isfile(shard) else None


class MemberFile(io.RawIOBase):
    """A read-only file of one member's bytes, read in place from the shard (`os.pread`)."""

    def __init__(self, shard: str, offset: int, size: int):
        super().__init__()
        self.fd = os.open(shard, os.O_RDONLY)
        self.offset, self.size, self.position = offset, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        count = max(0, min(len(buffer), self.size - self.position))
        data = os.pread(self.fd, count, self.offset + self.position)
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def close(self) -> None:
        if not self.closed:
            os.close(self.fd)
        super().close()


def open_tar_member(path: str | Path) -> MemberFile | None:
    """The bytes of the member a `SHARD.tar#MEMBER` path names, or None for a path that names no member."""
    found = tar_member(path)
    if found is None:
        return None
    shard, name = found
    try:
        index = member_index(shard)
    except OSError as error:
        raise BadVideoError(f"cannot read the tar: {error.strerror or error}", path) from None
    if name in index.cut:
        raise BadVideoError("cut short: the tar ends inside this member", path)
    if name not in index.members:
        raise BadVideoError(f"no member {name} in the tar" + (f" ({index.problem})" if index.problem else ""), path)
    return MemberFile(shard, *index.members[name])


@dataclass(frozen=True)
class _Listed:
    """A video member as listed: its path, its label as written and where from, or why it fails."""
    path: str
    label: str
    source: str  # the member the label comes from
    error: str = ""


def _video_key(name: str) -> str | None:
    """A member's key if it is a video (`dir/0000042.mp4` -> `dir/0000042`), else None."""
    folder, _, base = name.rpartition("/")
    if base.startswith(".") or Path(base).suffix.lower() not in VIDEO_SUFFIXES:
        return None
    return (folder + "/" if folder else "") + base.split(".", 1)[0]


def _raw_label(fd: int, index: TarIndex, key: str, label_field: str | None) -> tuple[str, str]:
    """(label as written, error) of a key: its `.cls` text, or the `label_field` of its `.json`."""
    member = f"{key}.json" if label_field else f"{key}.cls"
    if member not in index.members:
        hint = "" if label_field else " (or give --label-field to read the label from its .json)"
        return "", f"no {member} member" + (" whole" if member in index.cut else "") + hint
    offset, size = index.members[member]
    try:
        text = os.pread(fd, size, offset).decode("utf-8").strip()
        if not label_field:
            return text, ""
        value = json.loads(text).get(label_field) if text.startswith("{") else None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return "", f"{member} cannot be read: {error}"
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return "", f"{member} has no {label_field!r} field holding a class index or name"
    return str(value), ""


def _list_shard(shard: Path, path_prefix: str, label_field: str | None) -> tuple[list[_Listed], str]:
    """The video members of one shard in tar order, and what was wrong with the shard ("" if nothing)."""
    try:
        index = member_index(shard)
        fd = os.open(shard, os.O_RDONLY)
    except OSError as error:
        return [], f"cannot read: {error.strerror or error}"
    listed = []
    try:
        for name in list(index.members) + sorted(index.cut):
            key = _video_key(name)
            if key is None:
                continue
            source = f"{key}.json" if label_field else f"{key}.cls"
            label, error = ("", "cut short: the tar ends inside this member") if name in index.cut else \
                _raw_label(fd, index, key, label_field)
            listed.append(_Listed(path_prefix + name, label, source, error))
    finally:
        os.close(fd)
    return listed, index.problem


def _list_shards(shards: list[Path], label_field: str | None) -> tuple[Path, list[_Listed], list[str]]:
    """(the shards' common folder, every video member in shard and tar order, `shard: problem` for each
    shard not listed whole)."""
    root = Path(os.path.commonpath([shard.parent.absolute() for shard in shards]))
    videos, unreadable = [], []
    for shard in shards:
        prefix = shard.absolute().relative_to(root).as_posix() + MEMBER_SEPARATOR
        listed, problem = _list_shard(shard, prefix, label_field)
        videos += listed
        if problem:
            unreadable.append(f"{shard}: {problem}")
            log.warning("%s: %s", shard, problem)
    return root, videos, unreadable


def read_shards(videos: str | Path, label_field: str | None = None, classes: ClassNames | None = None) -> VideoList:
    """The videos of WebDataset tar shards (split `none`), labelled from `.cls` members or the
    `label_field` of `.json` members; class names from `classes`, else the names the labels spell
    (sorted), else the indices."""
    shards = shard_paths(videos)
    if not shards:
        raise DatasetError("no .tar shards found", videos)
    root, listed, unreadable = _list_shards(shards, label_field)
    if not listed:
        raise DatasetError(f"no video members in {len(shards)} shard(s) (expected KEY.mp4 beside KEY.cls or "
                           f"KEY.json){'; first problem: ' + unreadable[0] if unreadable else ''}", videos)
    if all(video.error for video in listed):
        raise DatasetError(f"no video has a label: {listed[0].path}: {listed[0].error}", videos)
    if classes is None:
        names = sorted({video.label for video in listed if not video.error and not video.label.lstrip("-").isdigit()})
        warn_near_duplicates(names, videos)
        classes = ClassNames.of(names) if names else None
    entries = []
    for video in listed:
        label, error = (-1, video.error) if video.error else label_index(video.label, classes, video.source)
        entries.append(VideoEntry(video.path, label, "none", error))
    names = classes.names if classes is not None else [str(i) for i in range(max(e.label for e in entries) + 1)]
    return VideoList(root, entries, list(names), unreadable)
