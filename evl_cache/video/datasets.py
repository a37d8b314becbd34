"""The official annotations of Kinetics, UCF101, HMDB51 and Something-Something v2, read as distributed.

`read_dataset(name, root)` reads, under `root`:

- `kinetics400`, `kinetics600`, `kinetics700` (the CVDF release): `annotations/{train,val,test}.csv`
  (`label,youtube_id,time_start,time_end,split[,is_cc]`), videos in `train/`, `val/`, `test/`, flat or in
  class folders, named `<youtube_id>_<start:06d>_<end:06d>.<ext>`. A raw download, `<youtube_id>.<ext>`
  (the whole YouTube video), is used with the annotated segment. A test CSV without labels is left out.
  Classes are the annotation names sorted: for Kinetics-400 that is the EVL authors' class order (their
  `data/k400_class_mappings.json` is the 400 names sorted), so their checkpoints' labels match.
- `ucf101`: `UCF-101/<Class>/v_*.avi` and `ucfTrainTestlist/` with `classInd.txt` (`1 ApplyEyeMakeup`),
  `trainlistNN.txt` (`path label`, labels 1-based) and `testlistNN.txt` (paths only: the class is the
  folder). Classes in `classInd.txt` order, CamelCase split into words (`Apply Eye Makeup`).
- `hmdb51`: `<class>/*.avi` and `testTrainMulti_7030_splits/<class>_test_splitN.txt` (`name.avi 1`:
  1 train, 2 test, 0 unused). Classes sorted, underscores as spaces (`brush hair`).
- `ssv2`: `labels/labels.json` (name -> index), `labels/train.json` and `labels/validation.json` (items
  with `id` and `template`; the template without its brackets is the class name), videos `<id>.webm` in
  `20bn-something-something-v2/` (as unpacked) or in `root` itself.

Train lists give split `train`; validation and test lists split `val` (what training validates on and
`eval` reads), Kinetics' `test.csv` split `test`. `fold` picks UCF101's and HMDB51's official split (1-3).
The readable names are the cache's class names; the names as written are kept in `raw_class_names`
when they differ. A `--classes` file replaces the class order: it must name every annotated class (as
written or readable).

A video the annotations list but the disk lacks fails with `NOT_ON_DISK`; a malformed annotation line
fails its entry with the file and line; a missing annotation file or class list is a `DatasetError`.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DatasetError
from .find import (
    VIDEO_SUFFIXES,
    ClassNames,
    VideoEntry,
    VideoList,
    mark_duplicates,
    read_classes,
    read_table,
    read_text,
)

log = logging.getLogger(__name__)

NOT_ON_DISK = "listed in the annotations, not on disk"
KINETICS_CLASSES = {"kinetics400": 400, "kinetics600": 600, "kinetics700": 700}
DATASETS = (*KINETICS_CLASSES, "ucf101", "hmdb51", "ssv2")
FOLDS = (1, 2, 3)


@dataclass(frozen=True)
class _Row:
    """One annotated video: its path under the root, class as written (None: unlabelled), split, the
    problem with it, the segment to sample, and its annotation line."""
    path: str
    raw_class: str | None
    split: str
    error: str = ""
    segment: tuple[float, float] | None = None
    line: int = 0


@dataclass
class _Annotations:
    """What a reader found: rows, the classes as written in the dataset's own order, their readable
    names, and the parts it could not use."""
    rows: list[_Row]
    classes: list[str]
    readable: list[str]
    unreadable: list[str] = field(default_factory=list)


def read_dataset(name: str, root: str | Path, fold: int | None = None, classes: ClassNames | None = None) -> VideoList:
    """The videos of an official dataset laid out as distributed under `root` (see the module's text)."""
    root = Path(root)
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    if fold is not None and name not in ("ucf101", "hmdb51"):
        raise DatasetError(f"{name} has one official split; --fold is for ucf101 and hmdb51")
    if fold is not None and fold not in FOLDS:
        raise DatasetError(f"--fold {fold}: {name} has the official splits 1, 2 and 3")
    if not root.is_dir():
        raise DatasetError("dataset folder not found" if not root.exists() else "not a folder", root)
    if name in KINETICS_CLASSES:
        found = _kinetics(root, KINETICS_CLASSES[name])
    else:
        found = {"ucf101": _ucf101, "hmdb51": _hmdb51, "ssv2": _ssv2}[name](root, fold or 1)
    if not found.rows:
        raise DatasetError(f"the {name} annotations list no videos", root)
    return _video_list(root, found, classes)


def _video_list(root: Path, found: _Annotations, classes: ClassNames | None) -> VideoList:
    """Rows labelled by the dataset's own class order, or by a `--classes` file's."""
    if classes is None:
        index = {name: i for i, name in enumerate(found.classes)}
        names, raw = found.readable, found.classes if found.readable != found.classes else []
    else:
        index = _override(found, classes)
        names, raw = list(classes.names), []
    entries = [VideoEntry(row.path, -1 if row.raw_class is None else index[row.raw_class], row.split, row.error,
                          row.segment) for row in found.rows]  # a failing video keeps its class
    return VideoList(root, entries, list(names), found.unreadable, raw)


def _override(found: _Annotations, classes: ClassNames) -> dict[str, int]:
    """Each class as written -> its index in `classes`, which may name it as written or readable."""
    index = {}
    for raw, readable in zip(found.classes, found.readable):
        if raw in classes.index or readable in classes.index:
            index[raw] = classes.index.get(raw, classes.index.get(readable))
    unknown = [raw for raw in found.classes if raw not in index]
    if unknown:
        raise DatasetError(f"--classes does not name {len(unknown)} class(es) of the dataset: "
                           f"{', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''}")
    return index  # type: ignore[return-value]


def _files_by_stem(folder: Path) -> dict[str, str]:
    """Video files under `folder` (recursively, hidden ones skipped) by file name without its suffix ->
    path relative to the folder's parent; the first in sorted order when a name repeats."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            stem, suffix = os.path.splitext(name)
            if suffix.lower() in VIDEO_SUFFIXES and not name.startswith("."):
                found.setdefault(stem, Path(dirpath, name).relative_to(folder.parent).as_posix())
    return found


def _seconds(text: str | None) -> int:
    """A Kinetics time (`59`, `59.0`) as whole seconds, as the file names write it; ValueError if not one."""
    value = float((text or "").strip())
    if not value.is_integer() or value < 0:
        raise ValueError(text)
    return int(value)


def _kinetics_row(row: dict[str, str], line: int, where: str, split: str, on_disk: dict[str, str]) -> _Row:
    """An annotation row as a video: its trimmed clip if on disk, else its raw download with the segment;
    a malformed row keeps no class, so that it never adds one."""
    youtube_id, label = (row.get("youtube_id") or "").strip(), (row.get("label") or "").strip()
    try:
        start, end = _seconds(row.get("time_start")), _seconds(row.get("time_end"))
    except ValueError:
        start = end = -1
    if not youtube_id or not label or end <= start:
        return _Row(f"{where} line {line}", None, split, f"{where} line {line}: expected a label, a youtube_id and "
                    f"whole seconds time_start < time_end", line=line)
    clip = f"{youtube_id}_{start:06d}_{end:06d}"
    if clip in on_disk:
        return _Row(on_disk[clip], label, split, line=line)
    if youtube_id in on_disk:
        return _Row(on_disk[youtube_id], label, split, segment=(float(start), float(end)), line=line)
    return _Row(f"{split}/{clip}.mp4", label, split, NOT_ON_DISK, line=line)


def _kinetics(root: Path, expected: int) -> _Annotations:
    """The CVDF layout: `annotations/<split>.csv` with videos in `<split>/`."""
    annotations = [(split, root / "annotations" / f"{split}.csv") for split in ("train", "val", "test")]
    annotations = [(split, path) for split, path in annotations if path.is_file()]
    if not annotations:
        raise DatasetError("no annotations/train.csv, val.csv or test.csv", root)
    rows: list[_Row] = []
    unreadable, names = [], set()
    for split, path in annotations:
        header, table = read_table(path, "annotations")
        if "label" not in header and split == "test":
            log.info("%s: no label column (the test set's labels are not public); its videos are left out", path)
            continue
        missing = {"label", "youtube_id", "time_start", "time_end"} - set(header)
        if missing:
            raise DatasetError(f"no {', '.join(sorted(missing))} column (expected label,youtube_id,time_start,"
                               "time_end,split)", path)
        on_disk = _files_by_stem(root / split) if (root / split).is_dir() else None
        part = [_kinetics_row(row, line, f"annotations/{path.name}", split, on_disk or {}) for line, row in table]
        names.update(row.raw_class for row in part if row.raw_class)  # classes never depend on the disk
        if on_disk is None:
            unreadable.append(f"{root / split}: no such folder; the {len(part)} videos of {path.name} are left out")
            log.warning(unreadable[-1])
            continue
        rows += _marked(part, f"annotations/{path.name}")
    classes = sorted(names)
    if len(classes) != expected:
        log.warning("%s: the annotations name %d classes, not %d: class indices follow these names sorted, and "
                    "will not match a checkpoint trained on all %d unless --classes gives its class list", root,
                    len(classes), expected, expected)
    return _Annotations(rows, classes, classes, unreadable)


def _marked(rows: list[_Row], where: str) -> list[_Row]:
    """Rows whose video an earlier row of the same file lists fail as duplicates."""
    entries = mark_duplicates([VideoEntry(r.path, 0, r.split, r.error, r.segment) for r in rows],
                              [r.line for r in rows], where)
    return [_Row(r.path, r.raw_class, r.split, e.error, r.segment, r.line) for r, e in zip(rows, entries)]


def _words(name: str) -> str:
    """UCF101's CamelCase as words: `ApplyEyeMakeup` -> `Apply Eye Makeup`, `YoYo` -> `Yo Yo`."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)


def _on_disk(root: Path, path: str, raw_class: str | None, split: str, line: int, error: str = "") -> _Row:
    """A listed video, failing as not on disk if the file is not there."""
    if not error and not (root / path).is_file():
        error = NOT_ON_DISK
    return _Row(path, raw_class, split, error, line=line)


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """The non-blank lines of a text annotation file, split at white space, with their numbers."""
    if not path.is_file():
        raise DatasetError("annotation file not found", path)
    return [(n, line.split()) for n, line in enumerate(read_text(path, "annotations").splitlines(), 1)
            if line.strip()]


def _ucf101(root: Path, fold: int) -> _Annotations:
    """`UCF-101/` and `ucfTrainTestlist/` side by side under `root`."""
    lists = root / "ucfTrainTestlist"
    classes: list[str] = []
    for line, fields in _lines(lists / "classInd.txt"):
        if len(fields) != 2 or fields[0] != str(len(classes) + 1):
            raise DatasetError(f"line {line}: expected '{len(classes) + 1} ClassName'", lists / "classInd.txt")
        classes.append(fields[1])
    train, test = [], []
    for line, fields in _lines(lists / f"trainlist0{fold}.txt"):
        number = fields[1] if len(fields) == 2 else ""
        known = number.isdigit() and 1 <= int(number) <= len(classes)
        error = "" if known else \
            f"trainlist0{fold}.txt line {line}: expected 'Class/v_name.avi N', N in 1-{len(classes)}"
        train.append(_on_disk(root, f"UCF-101/{fields[0]}", classes[int(number) - 1] if known else None, "train",
                              line, error))
    for line, fields in _lines(lists / f"testlist0{fold}.txt"):
        folder = fields[0].split("/")[0]
        error = "" if len(fields) == 1 and folder in classes else \
            f"testlist0{fold}.txt line {line}: expected 'Class/v_name.avi', its Class in classInd.txt"
        test.append(_on_disk(root, f"UCF-101/{fields[0]}", None if error else folder, "val", line, error))
    rows = _marked(train, f"trainlist0{fold}.txt") + _marked(test, f"testlist0{fold}.txt")
    return _Annotations(rows, classes, [_words(name) for name in classes])


def _hmdb51(root: Path, fold: int) -> _Annotations:
    """`<class>/` folders and `testTrainMulti_7030_splits/` side by side under `root`."""
    splits = root / "testTrainMulti_7030_splits"
    suffix = f"_test_split{fold}.txt"
    files = sorted(splits.glob(f"*{suffix}")) if splits.is_dir() else []
    if not files:
        raise DatasetError(f"no <class>{suffix} files", splits)
    classes = [path.name[:-len(suffix)] for path in files]
    rows = []
    for name, path in zip(classes, files):
        part = []
        for line, fields in _lines(path):
            if fields[1:] == ["0"]:
                continue
            error = "" if fields[1:] in (["1"], ["2"]) else f"{path.name} line {line}: expected 'name.avi 0|1|2'"
            split = "train" if fields[1:] == ["1"] else "val"
            part.append(_on_disk(root, f"{name}/{fields[0]}", None if error else name, split, line, error))
        rows += _marked(part, path.name)
    return _Annotations(rows, classes, [name.replace("_", " ") for name in classes])


_SPACE = re.compile(r"\s*")


def _json_items(path: Path) -> list[tuple[int, object]]:
    """The items of a JSON list, each with the line it starts on (for messages about one item)."""
    if not path.is_file():
        raise DatasetError("annotation file not found", path)
    text = read_text(path, "annotations")
    decoder, items, line, counted = json.JSONDecoder(), [], 1, 0
    try:
        position = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
        if text[position:position + 1] != "[":
            raise json.JSONDecodeError("expected a list", text, position)
        position = _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
        while text[position:position + 1] != "]":
            item, end = decoder.raw_decode(text, position)
            line, counted = line + text.count("\n", counted, position), position
            items.append((line, item))
            position = _SPACE.match(text, end).end()  # type: ignore[union-attr]
            if text[position:position + 1] == ",":
                position = _SPACE.match(text, position + 1).end()  # type: ignore[union-attr]
            elif text[position:position + 1] != "]":
                raise json.JSONDecodeError("expected ',' or ']'", text, position)
    except json.JSONDecodeError as error:
        raise DatasetError(f"not valid JSON: {error.msg} at line {error.lineno} column {error.colno}", path) from None
    return items


def _ssv2(root: Path, fold: int) -> _Annotations:
    """`labels/` beside the videos, which are in `20bn-something-something-v2/` or in `root` itself."""
    labels = root / "labels"
    if not (labels / "labels.json").is_file():
        raise DatasetError("annotation file not found", labels / "labels.json")
    classes = read_classes(labels / "labels.json").names
    known = set(classes)
    prefix = "20bn-something-something-v2/" if (root / "20bn-something-something-v2").is_dir() else ""
    rows = []
    for split, name in (("train", "train.json"), ("val", "validation.json")):
        part = []
        for number, (line, item) in enumerate(_json_items(labels / name), 1):
            where = f"{name} line {line} (item {number})"
            if not (isinstance(item, dict) and isinstance(item.get("id"), (str, int))
                    and isinstance(item.get("template"), str)):
                part.append(_Row(f"labels/{name} item {number}", None, split, f"{where}: expected an id and a "
                                 "template", line=line))
                continue
            template = item["template"].replace("[", "").replace("]", "")
            error = "" if template in known else f"{where}: template {template!r} is not a class of labels.json"
            part.append(_on_disk(root, f"{prefix}{item['id']}.webm", None if error else template, split, line, error))
        rows += _marked(part, name)
    if (labels / "test.json").is_file():
        log.info("%s: no labels (the test set's labels are not public); its videos are left out", labels / "test.json")
    return _Annotations(rows, classes, classes)
