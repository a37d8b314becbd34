"""Find a dataset's videos, labels, splits and class names.

Three input forms:
- a folder per class, `root/<class>/*`, optionally with a split level above it
  (`root/train/<class>/*`, `root/val/<class>/*`; `validate`/`validation` count as `val`, `test` as `test`);
- the authors' list format, one `path label` per line (label an integer), paths under `--data-root`;
- a CSV with a header that has `path` and `label` columns (label a name or an integer) and an optional
  `split` column.

Problems with single entries (a list line without a label, a label out of range, a path an earlier
line already lists) do not stop anything: the entry keeps its `error` and extraction records it as
failed. Problems with the whole input (a missing folder, an empty dataset) raise `DatasetError`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset(
    ".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .flv .wmv .3gp .ogv .ts .gif".split()
)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validate": "val",
               "validation": "val", "valid": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test", "none")


@dataclass(frozen=True)
class VideoEntry:
    """One video of the dataset: its path (relative to the dataset root), label index and split."""
    path: str
    label: int
    split: str
    error: str = ""


@dataclass
class VideoList:
    """All videos of a dataset in a stable order, with the class names their labels index."""
    root: Path
    entries: list[VideoEntry]
    class_names: list[str] = field(default_factory=list)

    def count_by_split(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry.split] = counts.get(entry.split, 0) + 1
        return counts


def _video_files(folder: Path) -> list[Path]:
    """Video files under `folder`, recursively, sorted; symlinked folders are not followed (no loops)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_SUFFIXES:
                found.append(Path(dirpath) / name)
    return found


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan_folder(root: str | Path) -> VideoList:
    """Videos laid out as `root/[<split>/]<class>/*`; class names sorted, shared across splits."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("videos folder not found" if not root.exists() else "not a folder", root)
    top = _subfolders(root)
    split_level = bool(top) and all(p.name.lower() in SPLIT_NAMES for p in top)
    groups = [(SPLIT_NAMES[p.name.lower()], p) for p in top] if split_level else [("none", root)]
    class_dirs: list[tuple[str, Path]] = []
    for split, folder in groups:
        class_dirs += [(split, d) for d in _subfolders(folder)]
    class_names = sorted({d.name for _, d in class_dirs})
    index = {name: i for i, name in enumerate(class_names)}
    entries = []
    for split, class_dir in class_dirs:
        files = _video_files(class_dir)
        if not files:
            log.warning("%s: class folder holds no videos", class_dir)
        entries += [VideoEntry(f.relative_to(root).as_posix(), index[class_dir.name], split) for f in files]
    if not entries:
        raise DatasetError("no videos found (expected <class>/<video> or <split>/<class>/<video>)", root)
    return VideoList(root, entries, class_names)


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a plain list (one per line), the EVL authors' JSON mapping (name -> index), or a
    CSV with an `id,name` header (ViFi-CLIP's and X-CLIP's label files)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"cannot read class names: {error.strerror}", path) from None
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        if not rows or not {"id", "name"} <= set(rows[0]):
            raise DatasetError("a class-name CSV needs an id,name header and a row per class", path)
        try:
            by_index = sorted((int(row["id"]), row["name"].strip()) for row in rows)
        except (TypeError, ValueError):
            raise DatasetError("class ids in the CSV are not all integers", path) from None
        if [i for i, _ in by_index] != list(range(len(by_index))):
            raise DatasetError("class ids in the CSV are not 0..K-1", path)
        return [name for _, name in by_index]
    if path.suffix.lower() == ".json":
        mapping = json.loads(text)
        if isinstance(mapping, list):
            return [str(name) for name in mapping]
        by_index = sorted((int(i), str(name)) for name, i in mapping.items())
        if [i for i, _ in by_index] != list(range(len(by_index))):
            raise DatasetError("class mapping indices are not 0..K-1", path)
        return [name for _, name in by_index]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _label_index(raw: str, class_names: list[str] | None, where: str) -> tuple[int, str]:
    """Parse a label (integer or class name); returns (label, error)."""
    raw = raw.strip()
    if class_names is not None and raw in class_names:
        return class_names.index(raw), ""
    try:
        label = int(raw)
    except ValueError:
        return -1, f"{where}: label {raw!r} is neither an integer nor a known class name"
    if label < 0 or (class_names is not None and label >= len(class_names)):
        return -1, f"{where}: label {label} is out of range"
    return label, ""


def read_list(path: str | Path, data_root: str | Path | None, split: str,
              class_names: list[str] | None = None) -> VideoList:
    """The authors' `path label` list or a CSV with a header (`path,label[,split]`)."""
    path = Path(path)
    root = Path(data_root) if data_root is not None else path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"cannot read list: {error.strerror}", path) from None
    entries: list[VideoEntry] = []
    line_numbers: list[int] = []  # each entry's line in the file
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "path" not in reader.fieldnames or "label" not in reader.fieldnames:
            raise DatasetError("CSV needs a header with 'path' and 'label' columns", path)
        if class_names is None:
            names = sorted({row["label"].strip() for row in csv.DictReader(text.splitlines())
                            if row.get("label") and not row["label"].strip().lstrip("-").isdigit()})
            class_names = names or None
        for line_no, row in enumerate(reader, start=2):
            label, error = _label_index(row.get("label") or "", class_names, f"{path.name} line {line_no}")
            row_split = SPLIT_NAMES.get((row.get("split") or "").strip().lower(), split)
            entries.append(VideoEntry((row.get("path") or "").strip(), label, row_split, error))
            line_numbers.append(line_no)
    else:
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            video_path, _, raw_label = line.strip().rpartition(" ")
            line_numbers.append(line_no)
            if not video_path:
                entries.append(VideoEntry(raw_label, -1, split, f"{path.name} line {line_no}: no label"))
                continue
            label, error = _label_index(raw_label, class_names, f"{path.name} line {line_no}")
            entries.append(VideoEntry(video_path.strip(), label, split, error))
    if not entries:
        raise DatasetError("list holds no videos", path)
    entries = _mark_duplicates(entries, line_numbers, path.name)
    if class_names is None:
        top = max((e.label for e in entries), default=-1)
        class_names = [str(i) for i in range(top + 1)]
    return VideoList(root, entries, list(class_names))


def _mark_duplicates(entries: list[VideoEntry], line_numbers: list[int], list_name: str) -> list[VideoEntry]:
    """Entries whose path an earlier line already lists fail with "duplicate of line N" (each video is
    cached once per list; "a/./b.mp4" and "a/b.mp4" are the same path)."""
    seen: dict[str, int] = {}
    marked = []
    for entry, line_no in zip(entries, line_numbers):
        key = os.path.normpath(entry.path)
        if key in seen and not entry.error:
            entry = VideoEntry(entry.path, entry.label, entry.split,
                               f"{list_name} line {line_no}: duplicate of line {seen[key]}")
        seen.setdefault(key, line_no)
        marked.append(entry)
    return marked


def expand_video_inputs(inputs: list[str | Path]) -> list[Path]:
    """Video paths from files, folders (searched recursively) and list files (.txt: a path first on each
    line; .csv: a `path` column; relative to the list's folder). Missing paths are kept, to fail later
    with their own message."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += _video_files(item)
        elif item.suffix.lower() == ".csv" and item.is_file():
            rows = csv.DictReader(item.read_text(encoding="utf-8").splitlines())
            paths += [item.parent / row["path"] for row in rows if row.get("path")]
        elif item.suffix.lower() == ".txt" and item.is_file():
            for line in item.read_text(encoding="utf-8").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    path, _, last = line.strip().rpartition(" ")
                    paths.append(item.parent / (path if path and last.lstrip("-").isdigit() else line.strip()))
        else:
            paths.append(item)
    if not paths:
        raise DatasetError("no videos given")
    return paths


def find_videos(videos: str | Path | None = None, train_list: str | Path | None = None,
                val_list: str | Path | None = None, data_root: str | Path | None = None,
                classes: str | Path | None = None) -> VideoList:
    """The dataset a command names: a folder, or train/val list files (optionally with class names)."""
    class_names = read_class_names(classes) if classes else None
    if videos is not None:
        if train_list or val_list:
            raise DatasetError("give either --videos or --train-list/--val-list, not both")
        found = scan_folder(videos)
        if class_names is not None:
            if sorted(class_names) != found.class_names:
                raise DatasetError("--classes does not name the same classes as the class folders", classes)
            remap = [class_names.index(name) for name in found.class_names]
            found.entries = [VideoEntry(e.path, remap[e.label], e.split, e.error) for e in found.entries]
            found.class_names = class_names
        return found
    lists = [(p, s) for p, s in ((train_list, "train"), (val_list, "val")) if p]
    if not lists:
        raise DatasetError("no input: pass --videos FOLDER or --train-list/--val-list FILE")
    parts = [read_list(p, data_root, s, class_names) for p, s in lists]
    names = class_names or max((part.class_names for part in parts), key=len)
    root = parts[0].root
    entries = [e for part in parts for e in part.entries]
    for part in parts[1:]:
        if part.root != root:
            raise DatasetError("list files resolve to different data roots; pass --data-root")
    for i, entry in enumerate(entries):
        if entry.label >= len(names):
            entries[i] = VideoEntry(entry.path, -1, entry.split, f"label {entry.label} is out of range")
    return VideoList(root, entries, list(names))
