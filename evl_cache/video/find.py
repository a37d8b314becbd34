"""Find a dataset's videos, labels, splits and class names.

Three input forms:
- a folder per class, `root/<class>/*`, optionally with a split level above it (`root/train/<class>/*`,
  `root/val/<class>/*`; `training` counts as `train`, `valid`/`validate`/`validation`/`dev` as `val`,
  `testing` as `test`, in any case). Hidden folders, `__MACOSX`, Zarr stores and the caller's `exclude`
  (the cache being written) are never classes or videos. The top level is a split level when more than
  half of its folders are split names (the others are left out with a warning); a mix with fewer split
  names is refused, as guessing would train on a split or a split folder become a class;
- the authors' list format, one `path label` per line (label an integer; `path<TAB>label` splits at
  the tab), paths under `--data-root`;
- a CSV (comma- or tab-separated) with a header that has `path` and `label` columns (label a name or an
  integer), an optional `split` column (a split name as above, or empty for the list's own split; any
  other value fails the entry), and optional `start` and `end` columns: the segment of the video, in
  seconds, that is sampled (a raw Kinetics download holds the whole YouTube video).

Class names that differ only by case, spaces, underscores or hyphens (`Alpha`, `alpha`) are warned about:
they train as separate classes unless a `--classes` mapping gives them one index.

Every list, CSV and class-name file is read as people save them: UTF-8, or UTF-16/32 with a byte-order
mark, any line endings; bytes in another encoding are a one-line error naming the line.

Problems with single entries (a list line without a label, a label out of range, a path an earlier
line already lists) do not stop anything: the entry keeps its `error` and extraction records it as
failed. Problems with the whole input (a missing folder, an empty dataset) raise `DatasetError`. Folders
that cannot be read are listed in `VideoList.unreadable`, each with a warning.
"""
from __future__ import annotations

import codecs
import csv
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import DatasetError

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = frozenset(
    ".mp4 .m4v .mkv .webm .avi .mov .mpg .mpeg .flv .wmv .3gp .ogv .ts .gif".split()
)
SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "validate": "val", "validation": "val",
               "valid": "val", "dev": "val", "test": "test", "testing": "test"}
SPLITS = ("train", "val", "test", "none")
TABLE_SUFFIXES = (".csv", ".tsv")  # lists with a header row; the others hold one entry per line
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32", "UTF-32"), (codecs.BOM_UTF32_BE, "utf-32", "UTF-32"),
                    (codecs.BOM_UTF8, "utf-8-sig", "UTF-8"), (codecs.BOM_UTF16_LE, "utf-16", "UTF-16"),
                    (codecs.BOM_UTF16_BE, "utf-16", "UTF-16"))  # UTF-32 LE first: its mark begins with UTF-16 LE's


@dataclass(frozen=True)
class VideoEntry:
    """One video of the dataset: its path (relative to the dataset root), label index (-1: unlabelled) and
    split; `segment` (start, end) in seconds when only that part of the file is sampled."""
    path: str
    label: int
    split: str
    error: str = ""
    segment: tuple[float, float] | None = None


@dataclass
class VideoList:
    """All videos of a dataset in a stable order, with the class names their labels index."""
    root: Path
    entries: list[VideoEntry]
    class_names: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # `folder: reason` for each folder that could not be read
    raw_class_names: list[str] = field(default_factory=list)  # as the annotations write them, if made readable

    def count_by_split(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for entry in self.entries:
            counts[entry.split] = counts.get(entry.split, 0) + 1
        return counts


@dataclass(frozen=True)
class ClassNames:
    """Class names by index, and the index of every name a label or class folder may use: a `--classes`
    mapping may give several names (`Alpha`, `alpha`) one index, making them one class."""
    names: list[str]
    index: dict[str, int]

    @classmethod
    def of(cls, names: list[str]) -> ClassNames:
        """One name per class, in index order (a name listed twice keeps its first index)."""
        index: dict[str, int] = {}
        for i, name in enumerate(names):
            index.setdefault(name, i)
        return cls(list(names), index)


def read_text(path: Path, what: str) -> str:
    """The text of a list, CSV or class-name file: in the encoding its byte-order mark names (UTF-8, UTF-16,
    UTF-32, as spreadsheets save), else UTF-8; any other bytes are a one-line error, never a guess."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {what}: {error.strerror or error}", path) from None
    codec, label = next(((codec, label) for mark, codec, label in BYTE_ORDER_MARKS if raw.startswith(mark)),
                        ("utf-8", "UTF-8"))
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as error:
        line = raw[:error.start].decode(codec, errors="replace").count("\n") + 1
        raise DatasetError(f"line {line} is not {label} text; save the file as UTF-8", path) from None
    if "\0" in text:  # UTF-16 saved without its mark decodes as UTF-8 with a NUL in every other place
        line = text[:text.index("\0")].count("\n") + 1
        raise DatasetError(f"line {line} holds NUL characters (UTF-16 without a byte-order mark?); "
                           "save the file as UTF-8", path)
    return text


def read_table(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """A CSV's header and its rows with their line numbers; tab-separated when its header is (a .tsv, or a
    spreadsheet's "text" export)."""
    lines = read_text(path, what).splitlines()
    header = lines[0] if lines else ""
    reader = csv.DictReader(lines, delimiter="\t" if header.count("\t") > header.count(",") else ",")
    try:
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as error:
        raise DatasetError(f"line {reader.line_num}: {error}", path) from None
    return list(reader.fieldnames or []), rows


def _split_list_line(line: str) -> tuple[str, str]:
    """A `path label` line's path and label: split at its last tab if it has one (paths may hold spaces),
    else at its last space; ("the line", "") when it has neither."""
    line = line.strip()
    path, _, label = line.rpartition("\t" if "\t" in line else " ")
    return (path.strip(), label.strip()) if path.strip() else (line, "")


def _is_table(path: Path) -> bool:
    return path.suffix.lower() in TABLE_SUFFIXES


def _is_zarr_store(folder: str) -> bool:
    return folder.lower().endswith(".zarr") or os.path.isfile(os.path.join(folder, "zarr.json"))


class _Scan:
    """Lists the folders and videos of a dataset, never entering hidden folders, `__MACOSX`, Zarr stores or
    the `exclude`d paths (a cache written inside the videos folder is never a class or a video), and noting
    each folder it cannot read."""

    def __init__(self, exclude: Iterable[str | Path] = ()):
        self.excluded = frozenset(os.path.realpath(path) for path in exclude)
        self.unreadable: list[str] = []

    def _cannot_read(self, error: OSError) -> None:
        self.unreadable.append(f"{error.filename}: {error.strerror or error}")
        log.warning("%s: cannot read this folder (%s); its videos are left out", error.filename,
                    error.strerror or error)

    def _enters(self, parent: str, real_parent: str, name: str) -> bool:
        return not (name.startswith(".") or name == "__MACOSX" or os.path.join(real_parent, name) in self.excluded
                    or _is_zarr_store(os.path.join(parent, name)))

    def subfolders(self, folder: Path) -> list[Path]:
        try:
            with os.scandir(folder) as listing:
                names = [entry.name for entry in listing if entry.is_dir()]
        except OSError as error:
            self._cannot_read(error)
            return []
        real = os.path.realpath(folder)
        return sorted(folder / name for name in names if self._enters(str(folder), real, name))

    def video_files(self, folder: Path) -> list[Path]:
        """Video files under `folder`, recursively, sorted; symlinked folders are not followed (no loops)."""
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, onerror=self._cannot_read, followlinks=False):
            real = os.path.realpath(dirpath)
            dirnames[:] = sorted(d for d in dirnames if self._enters(dirpath, real, d))
            found += [Path(dirpath, name) for name in sorted(filenames)
                      if not name.startswith(".") and Path(name).suffix.lower() in VIDEO_SUFFIXES
                      and os.path.join(real, name) not in self.excluded]
        return found


def _class_folders(root: Path, scan: _Scan) -> list[tuple[str, Path]]:
    """(split, class folder) pairs. The top level of `root` is a split level (train, val, test) when more
    than half of its folders are named for a split, the others being left out with a warning each; with no
    split names, its folders are the classes (split `none`); fewer split names than others is too
    ambiguous to guess and raises."""
    top = scan.subfolders(root)
    splits = [folder for folder in top if folder.name.lower() in SPLIT_NAMES]
    others = [folder for folder in top if folder.name.lower() not in SPLIT_NAMES]
    if not splits:
        return [("none", folder) for folder in top]
    if len(others) >= len(splits):
        raise DatasetError(f"top-level folders mix split names ({_some(splits)}) and other names ({_some(others)}): "
                           "put every class folder under a split folder, or none", root)
    for folder in others:
        log.warning("%s: not a split folder (%s are); left out with the %d videos it holds", folder, _some(splits),
                    len(scan.video_files(folder)))
    return [(SPLIT_NAMES[split.name.lower()], folder) for split in splits for folder in scan.subfolders(split)]


def _some(folders: list[Path], shown: int = 5) -> str:
    """`a, b, c`, or past `shown` names `a, b, c, d, e and 7 more`."""
    more = f" and {len(folders) - shown} more" if len(folders) > shown else ""
    return ", ".join(folder.name for folder in folders[:shown]) + more


def scan_folder(root: str | Path, exclude: Iterable[str | Path] = ()) -> VideoList:
    """Videos laid out as `root/[<split>/]<class>/*`; class names sorted, shared across splits. Paths in
    `exclude` are never listed."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError("videos folder not found" if not root.exists() else "not a folder", root)
    scan = _Scan(exclude)
    class_dirs = _class_folders(root, scan)
    class_names = sorted({d.name for _, d in class_dirs})
    index = {name: i for i, name in enumerate(class_names)}
    entries = []
    for split, class_dir in class_dirs:
        files = scan.video_files(class_dir)
        if not files:
            log.warning("%s: class folder holds no videos", class_dir)
        entries += [VideoEntry(f.relative_to(root).as_posix(), index[class_dir.name], split) for f in files]
    if not entries:
        raise DatasetError("no videos found (expected <class>/<video> or <split>/<class>/<video>)", root)
    return VideoList(root, entries, class_names, scan.unreadable)


def read_classes(path: str | Path) -> ClassNames:
    """Classes from a plain list (one name per line), a JSON list, the EVL authors' JSON mapping (name ->
    index; several names may share an index, the first names the class) or a CSV with an `id,name` header
    (ViFi-CLIP's and X-CLIP's label files; ids may repeat likewise)."""
    path = Path(path)
    if _is_table(path):
        header, rows = read_table(path, "class names")
        if not rows or not {"id", "name"} <= set(header):
            raise DatasetError("a class-name CSV needs an id,name header and a row per class", path)
        try:
            pairs = [((row["name"] or "").strip(), int(row["id"])) for _, row in rows]
        except (TypeError, ValueError):
            raise DatasetError("class ids in the CSV are not all integers", path) from None
        return _indexed(pairs, "class ids in the CSV are not 0..K-1", path)
    text = read_text(path, "class names")
    if path.suffix.lower() != ".json":
        return ClassNames.of([line.strip() for line in text.splitlines() if line.strip()])
    mapping = _parse_json(text, path)
    if isinstance(mapping, list):
        return ClassNames.of([str(name) for name in mapping])
    if not isinstance(mapping, dict):
        raise DatasetError("a class-name JSON is a list of names or a mapping name -> index", path)
    try:
        pairs = [(str(name), int(i)) for name, i in mapping.items()]
    except (TypeError, ValueError):
        raise DatasetError("class indices in the mapping are not all integers", path) from None
    return _indexed(pairs, "class mapping indices are not 0..K-1", path)


def read_class_names(path: str | Path) -> list[str]:
    """The class names of a `--classes` file (see `read_classes`), one per index."""
    return read_classes(path).names


def _parse_json(text: str, path: Path) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}",
                           path) from None


def _indexed(pairs: list[tuple[str, int]], reason: str, path: Path) -> ClassNames:
    """Classes from (name, index) pairs in file order; the first name of an index names its class."""
    index: dict[str, int] = {}
    for name, i in pairs:
        index.setdefault(name, i)
    first: dict[int, str] = {}
    for name, i in index.items():
        first.setdefault(i, name)
    if sorted(first) != list(range(len(first))):
        raise DatasetError(reason, path)
    return ClassNames([first[i] for i in range(len(first))], index)


def warn_near_duplicates(names: list[str], where: str | Path) -> None:
    """Warn about class names that differ only by case, spaces, underscores or hyphens: most likely one
    class spelled two ways, which would train as two."""
    groups: dict[str, list[str]] = {}
    for name in sorted(set(names)):
        groups.setdefault(re.sub(r"[\s_-]+", "", name.casefold()), []).append(name)
    similar = [group for group in groups.values() if len(group) > 1]
    if similar:
        log.warning("%s: class names that differ only by case, spaces, underscores or hyphens: %s; they are "
                    "separate classes unless a --classes mapping (name -> index) gives them one index", where,
                    ", ".join(map(str, similar)))


def _use_classes(found: VideoList, classes: ClassNames, path: str | Path) -> None:
    """Relabel a folder scan's videos by `classes`, which must name every class folder (up to aliases)
    and have a folder for each of its classes."""
    unknown = [name for name in found.class_names if name not in classes.index]
    covered = {classes.index[name] for name in found.class_names if name in classes.index}
    missing = [name for i, name in enumerate(classes.names) if i not in covered]
    if unknown or missing:
        problems = [f"{what}: {', '.join(names)}" for what, names in
                    (("folders it does not name", unknown), ("classes without a folder", missing)) if names]
        raise DatasetError(f"--classes does not name the same classes as the class folders "
                           f"({'; '.join(problems)})", path)
    relabel = [classes.index[name] for name in found.class_names]
    found.entries = [replace(entry, label=relabel[entry.label]) for entry in found.entries]
    found.class_names = list(classes.names)


@dataclass(frozen=True)
class _ListRow:
    """One entry of a list file as written, before its label is resolved."""
    line: int
    path: str
    label: str
    split: str
    error: str = ""
    segment: tuple[float, float] | None = None


def _csv_row(path: Path, line: int, row: dict[str, str], split: str) -> _ListRow:
    """A CSV row as a list entry: its split and segment checked, the first problem as its error."""
    where = f"{path.name} line {line}"
    split, split_error = _row_split(row.get("split"), split, where)
    segment, segment_error = parse_segment(row.get("start"), row.get("end"), where)
    return _ListRow(line, (row.get("path") or "").strip(), (row.get("label") or "").strip(), split,
                    split_error or segment_error, segment)


def parse_segment(start: str | None, end: str | None, where: str) -> tuple[tuple[float, float] | None, str]:
    """(segment, error) of a row's `start` and `end` seconds: both empty is the whole video; one alone, a
    value that is not a number, a negative start or an end not after the start is an error."""
    start, end = (start or "").strip(), (end or "").strip()
    if not start and not end:
        return None, ""
    try:
        segment = (float(start), float(end))
    except ValueError:
        return None, f"{where}: start {start!r} and end {end!r} are not both numbers of seconds"
    if not 0 <= segment[0] < segment[1] < float("inf"):  # NaN fails too
        return None, f"{where}: segment {start}-{end} s: start must be 0 or more, and end after it"
    return segment, ""


def _read_rows(path: Path, split: str) -> list[_ListRow]:
    """The entries of a CSV (`path,label[,split][,start,end]` header) or of a `path label` list, in file
    order."""
    if _is_table(path):
        header, rows = read_table(path, "list")
        if "path" not in header or "label" not in header:
            raise DatasetError("CSV needs a header with 'path' and 'label' columns", path)
        if ("start" in header) != ("end" in header):
            raise DatasetError("a CSV with a start column needs an end column, and the other way round", path)
        found = [_csv_row(path, line, row, split) for line, row in rows]
    else:
        lines = enumerate(read_text(path, "list").splitlines(), start=1)
        found = [_ListRow(line_no, *_split_list_line(line), split) for line_no, line in lines
                 if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise DatasetError("list holds no videos", path)
    return found


def _row_split(value: str | None, default: str, where: str) -> tuple[str, str]:
    """A CSV row's split and error: a split name, or empty for the list's `default` split; any other value
    is an error, never a guess (a `holdout` row taken as train would leak into training)."""
    name = (value or "").strip()
    if not name:
        return default, ""
    if name.lower() in SPLIT_NAMES:
        return SPLIT_NAMES[name.lower()], ""
    return default, f"{where}: split {name!r} is not train, val or test"


def _is_integer(text: str) -> bool:
    return text.lstrip("-").isdigit()


def _classes_from_labels(lists: list[tuple[Path, list[_ListRow]]]) -> ClassNames | None:
    """Classes (sorted) that the labels of CSV lists spell out, pooled over all lists so that a name has one
    index everywhere; None when every label is an integer."""
    names = sorted({row.label for path, rows in lists if _is_table(path) for row in rows
                    if row.label and not _is_integer(row.label)})
    if not names:
        return None
    warn_near_duplicates(names, ", ".join(str(path) for path, _ in lists))
    return ClassNames.of(names)


def label_index(raw: str, classes: ClassNames | None, where: str) -> tuple[int, str]:
    """Parse a label (integer or class name); returns (label, error)."""
    if not raw:
        return -1, f"{where}: no label"
    if classes is not None and raw in classes.index:
        return classes.index[raw], ""
    try:
        label = int(raw)
    except ValueError:
        return -1, f"{where}: label {raw!r} is neither an integer nor a known class name"
    if label < 0 or (classes is not None and label >= len(classes.names)):
        return -1, f"{where}: label {label} is out of range"
    return label, ""


def _entries(path: Path, rows: list[_ListRow], classes: ClassNames | None) -> list[VideoEntry]:
    entries = []
    for row in rows:
        label, error = label_index(row.label, classes, f"{path.name} line {row.line}")
        entries.append(VideoEntry(row.path, label, row.split, error or row.error, row.segment))
    return mark_duplicates(entries, [row.line for row in rows], path.name)


def read_list(path: str | Path, data_root: str | Path | None, split: str,
              classes: ClassNames | None = None) -> VideoList:
    """The authors' `path label` list or a CSV with a header (`path,label[,split]`). Labels are indices or
    names of `classes` (see `read_classes`); without it, a CSV's labels name the classes."""
    return _read_lists([(Path(path), split)], data_root, classes)


def _read_lists(lists: list[tuple[Path, str]], data_root: str | Path | None,
                classes: ClassNames | None) -> VideoList:
    """The videos of list files, each with its default split; paths are under `data_root`, by default the
    lists' folder. Without `classes`, CSV labels name the classes, else they are indices."""
    roots = {Path(data_root) if data_root is not None else path.parent for path, _ in lists}
    if len(roots) > 1:
        raise DatasetError("list files resolve to different data roots; pass --data-root")
    rows = [(path, _read_rows(path, split)) for path, split in lists]
    if classes is None:
        classes = _classes_from_labels(rows)
    entries = [entry for path, part in rows for entry in _entries(path, part, classes)]
    names = classes.names if classes is not None else [str(i) for i in range(max(e.label for e in entries) + 1)]
    return VideoList(roots.pop(), entries, list(names))


def mark_duplicates(entries: list[VideoEntry], line_numbers: list[int], list_name: str) -> list[VideoEntry]:
    """Entries whose path (and segment) an earlier line already lists fail with "duplicate of line N" (each
    video is cached once per list; "a/./b.mp4" and "a/b.mp4" are the same path; two segments of one file
    are two videos)."""
    seen: dict[tuple[str, tuple[float, float] | None], int] = {}
    marked = []
    for entry, line_no in zip(entries, line_numbers):
        key = (os.path.normpath(entry.path), entry.segment)
        if key in seen and not entry.error:
            entry = replace(entry, error=f"{list_name} line {line_no}: duplicate of line {seen[key]}")
        seen.setdefault(key, line_no)
        marked.append(entry)
    return marked


def expand_video_inputs(inputs: list[str | Path]) -> list[Path | str]:
    """Video paths from files, folders (searched recursively) and list files (.txt: a path first on each
    line; .csv/.tsv: a `path` column; relative to the list's folder). A URL (anything with `://`) stays the
    string it was, for the caller to refuse; missing paths are kept, to fail later with their own message."""
    paths: list[Path | str] = []
    for given in inputs:
        item = Path(given)
        if "://" in str(given):
            paths.append(str(given))
        elif item.is_dir():
            paths += _Scan().video_files(item)
        elif _is_table(item) and item.is_file():
            _, rows = read_table(item, "video list")
            paths += [_listed_input(item, row["path"]) for _, row in rows if (row.get("path") or "").strip()]
        elif item.suffix.lower() == ".txt" and item.is_file():
            for line in read_text(item, "video list").splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    path, label = _split_list_line(line)
                    is_label = label and ("\t" in line.strip() or _is_integer(label))
                    paths.append(_listed_input(item, path if is_label else line))
        else:
            paths.append(item)
    if not paths:
        raise DatasetError("no videos given")
    return paths


def _listed_input(listing: Path, written: str) -> Path | str:
    """A list file's entry: a URL as written, else a path relative to the list's folder."""
    written = written.strip()
    return written if "://" in written else listing.parent / written


def find_videos(videos: str | Path | None = None, train_list: str | Path | None = None,
                val_list: str | Path | None = None, data_root: str | Path | None = None,
                classes: str | Path | None = None, exclude: Iterable[str | Path] = ()) -> VideoList:
    """The dataset a command names: a folder, or train/val list files (optionally with class names).
    `exclude`: paths in the folder never taken as a video or a class (the cache being written, its part
    files)."""
    known = read_classes(classes) if classes else None
    if videos is not None:
        if train_list or val_list:
            raise DatasetError("give either --videos or --train-list/--val-list, not both")
        found = scan_folder(videos, exclude)
        if known is None:
            warn_near_duplicates(found.class_names, videos)
        else:
            _use_classes(found, known, classes)
        return found
    lists = [(p, s) for p, s in ((train_list, "train"), (val_list, "val")) if p]
    if not lists:
        raise DatasetError("no input: pass --videos FOLDER or --train-list/--val-list FILE")
    return _read_lists([(Path(p), s) for p, s in lists], data_root, known)
