"""Check a cache against itself, and mark what is broken so that the next extraction redoes it.

`verify` checks, for the cache at a path:
- the cache as a whole: every array exists with the shape and dtype its description gives;
- each video's row: its status agrees with its other columns (a done video has no error, the views
  its split plans and at least one frame; a failed video has a reason; a pending one has none);
- each done video's data: every feature array is readable, finite, holds data in each of the video's
  views and nothing beyond them, and its bytes give the checksum recorded when they were written.

Each problem names the video it belongs to (row index and path). `repair=True` marks every video with
a problem pending (status 0, error cleared), so that re-running the same `extract` command recomputes
those videos and keeps the others. Pending videos are not problems: they are work not yet done.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import option
from ..errors import CacheError, EvlCacheError
from ..towers.backbone import prefix_tokens
from ..video.clips import ClipSpec
from .encodings import stored_encoding
from .store import DONE, FAILED, PENDING, STATUS_NAMES, CacheLayout, FeatureStore, cache_storage, video_checksum


@dataclass(frozen=True)
class Problem:
    """One thing wrong, with the video it belongs to (index -1 and no path: the cache as a whole)."""
    index: int
    path: str
    reason: str

    def line(self) -> str:
        where = f"video {self.index} ({self.path})" if self.index >= 0 else "cache"
        return f"{where}: {self.reason}"


@dataclass
class VerifyReport:
    """What `verify` found."""
    cache: str
    videos: int
    status: dict[str, int]
    checked: int  # done videos whose data was read
    checksums: bool  # whether the cache records checksums (format-1 caches may not)
    problems: list[Problem] = field(default_factory=list)
    repaired: list[int] = field(default_factory=list)  # videos `repair` marked pending

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def broken_videos(self) -> list[int]:
        return sorted({p.index for p in self.problems if p.index >= 0})

    def line(self) -> str:
        counts = ", ".join(f"{count} {name}" for name, count in self.status.items())
        verdict = "ok" if self.ok else f"{len(self.problems)} problem(s) in {len(self.broken_videos)} video(s)"
        text = (f"verify: {self.cache}: {self.videos} videos ({counts}); {self.checked} done videos read"
                f"{'' if self.checksums else ' (no checksums recorded)'}; {verdict}")
        if any(p.index < 0 for p in self.problems):
            text += f", {sum(p.index < 0 for p in self.problems)} in the cache itself"
        if self.repaired:
            text += (f"; marked {len(self.repaired)} video(s) pending: re-run the same extract command to "
                     f"redo them")
        return text

    def to_dict(self) -> dict:
        return {"cache": self.cache, "ok": self.ok, "videos": self.videos, "status": self.status,
                "checked": self.checked, "checksums": self.checksums,
                "problems": [{"index": p.index, "path": p.path, "reason": p.reason} for p in self.problems],
                "repaired": self.repaired}


def cache_layout_of(store: FeatureStore, attrs: dict) -> CacheLayout:
    """The shapes a cache's description says its arrays have."""
    try:
        backbone, sampling = attrs["backbone"], attrs["sampling"]
        grid = tuple(backbone["patch_grid"])
        return CacheLayout(num_videos=store.num_videos, views=sampling["views"], frames=sampling["frames"],
                           tokens=prefix_tokens(backbone) + grid[0] * grid[1], width=backbone["width"], grid=grid,
                           embed_dim=backbone["embed_dim"], blocks=tuple(attrs["blocks"]),
                           shard_size=attrs["shard_size"], encoding=stored_encoding(cache_storage(attrs)).key,
                           compress=cache_storage(attrs)["compress"])
    except (KeyError, TypeError, IndexError) as error:
        raise CacheError(f"the cache's description is incomplete (no {error})", store.path) from None


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _check_arrays(store: FeatureStore, layout: CacheLayout) -> tuple[list[Problem], set[str]]:
    """Cache-level problems, and the feature arrays too broken to read per video."""
    problems, broken = [], set()
    for name, (shape, _, dtype) in layout.feature_arrays().items():
        if not store.has(name):
            problems.append(Problem(-1, "", f"array {name} is missing"))
            broken.add(name)
            continue
        array = store.array(name)
        if tuple(array.shape) != shape or np.dtype(array.dtype) != dtype:
            problems.append(Problem(-1, "", f"array {name} is {np.dtype(array.dtype)} {list(array.shape)}, "
                                            f"the cache's description says {dtype} {list(shape)}"))
            broken.add(name)
    return problems, broken


def _check_rows(columns: dict[str, np.ndarray], views_planned: np.ndarray, max_views: int) -> list[Problem]:
    """Problems of each video's row: does its status agree with its other columns?"""
    problems = []
    for i, (path, status, views, frames, error) in enumerate(zip(
            columns["path"], columns["status"], columns["views"], columns["frames"], columns["error"])):
        reasons = []
        if status == DONE:
            if error:
                reasons.append(f"done, but has an error: {error}")
            if views != views_planned[i] or not 1 <= views <= max_views:
                reasons.append(f"done with {views} views, its split plans {views_planned[i]}")
            if frames < 1:
                reasons.append(f"done with {frames} decoded frames")
        elif status == FAILED:
            if not error:
                reasons.append("failed, but has no reason")
        elif status == PENDING:
            if error:
                reasons.append(f"pending, but has an error: {error}")
        else:
            reasons.append(f"status {status} is none of 0 (pending), 1 (done), 2 (failed)")
        problems += [Problem(i, str(path), reason) for reason in reasons]
    return problems


def _read_shard(store: FeatureStore, name: str, start: int, stop: int, rows: list[int],
                paths: np.ndarray, problems: list[Problem]) -> dict[int, np.ndarray]:
    """Row i -> array `name`'s row for the videos `rows` of one shard; a row that cannot be read is a
    problem of its video (the whole shard is read at once, then video by video if that fails)."""
    array = store.array(name)
    try:
        block = np.asarray(array[start:stop])
        return {i: block[i - start] for i in rows}
    except Exception:  # a damaged file: find out which videos it takes with it
        pass
    found = {}
    for i in rows:
        try:
            found[i] = np.asarray(array[i])
        except Exception as error:
            problems.append(Problem(i, str(paths[i]), f"{name} cannot be read ({_first_line(error)})"))
    return found


def _finite(values: np.ndarray, fp8_codes: bool) -> bool:
    """No NaN or infinity among stored values: floats, or float8 e4m3 codes (whose NaNs are the bytes
    0x7f and 0xff; e4m3fn has no infinity). Integer codes are always finite."""
    if fp8_codes:
        return not ((values & 0x7F) == 0x7F).any()
    return values.dtype.kind != "f" or bool(np.isfinite(values).all())


def _check_data(store: FeatureStore, layout: CacheLayout, columns: dict[str, np.ndarray],
                checksums: np.ndarray | None, broken_arrays: set[str]) -> tuple[list[Problem], int]:
    """Problems in the done videos' data, read a shard at a time; and how many videos were read."""
    problems: list[Problem] = []
    status, views, paths = columns["status"], columns["views"], columns["path"]
    checked = 0
    for start in range(0, layout.num_videos, layout.shard_size):
        stop = min(start + layout.shard_size, layout.num_videos)
        rows = [i for i in range(start, stop) if status[i] == DONE and 1 <= views[i] <= layout.views]
        if not rows:
            continue
        checked += len(rows)
        running = {i: 0 for i in rows}
        complete = set(rows)  # videos whose every array was read, so their checksum can be compared
        for name in layout.feature_arrays():  # the checksum's order
            fp8_codes = layout.encoding == "fp8" and not name.startswith("scales/") and name != "embed"
            if name in broken_arrays:
                complete.clear()
                continue
            found = _read_shard(store, name, start, stop, rows, paths, problems)
            complete &= set(found)
            for i, row in found.items():
                own = row[: views[i]]
                if not _finite(own, fp8_codes):
                    problems.append(Problem(i, str(paths[i]), f"{name} holds NaN or infinite values"))
                empty = [v for v in range(views[i]) if not own[v].any()]
                if empty:
                    problems.append(Problem(i, str(paths[i]), f"{name} holds no data in view {empty[0]} "
                                                              f"of {views[i]}"))
                if row[views[i]:].any():
                    problems.append(Problem(i, str(paths[i]), f"{name} holds data beyond the video's "
                                                              f"{views[i]} view(s)"))
                running[i] = video_checksum([own], running[i])
        if checksums is not None:
            for i in sorted(complete):
                if running[i] != checksums[i]:
                    problems.append(Problem(i, str(paths[i]), f"checksum {running[i]:08x} of the data is not "
                                                              f"the {int(checksums[i]):08x} recorded when it "
                                                              f"was written"))
    return problems, checked


@dataclass
class VerifyConfig:
    """Options of `evl-cache verify`."""
    cache: Path = option(None, "the cache: a *.zarr or *.h5 path, or an fsspec URL", argument=True)
    repair: bool = option(False, "mark the videos with problems pending, so that re-running the same extract "
                                 "command redoes them (and only them)")


def verify(config: VerifyConfig) -> VerifyReport:
    """Check the cache against itself; with `repair`, mark the videos with problems pending."""
    path, repair = config.cache, config.repair
    if path is None:
        raise EvlCacheError("a cache path is required")
    with FeatureStore(path) as store:
        attrs = store.check_version()
        layout = cache_layout_of(store, attrs)
        report = VerifyReport(str(path), layout.num_videos, {}, 0, store.has("videos/checksum"))
        problems, broken_arrays = _check_arrays(store, layout)
        columns, table_problems = {}, []
        for name in ("path", "split", "status", "views", "frames", "error"):
            try:
                columns[name] = store.column(name)
            except Exception as error:
                table_problems.append(Problem(-1, "", f"column videos/{name} cannot be read "
                                                      f"({_first_line(error)})"))
                continue
            if len(columns[name]) != layout.num_videos:
                table_problems.append(Problem(-1, "", f"column videos/{name} has {len(columns[name])} rows, "
                                                      f"not {layout.num_videos}"))
        if table_problems:  # without the video table nothing can be checked per video
            report.problems = problems + table_problems
            return report
        counts = Counter(int(s) for s in columns["status"])
        report.status = {name: counts.get(value, 0) for value, name in STATUS_NAMES.items()}
        clip_spec = ClipSpec.from_cache(attrs)
        views_planned = np.array([clip_spec.views(str(split)) for split in columns["split"]])
        problems += _check_rows(columns, views_planned, layout.views)
        checksums = None
        if report.checksums:
            try:
                checksums = store.column("checksum")
            except Exception as error:
                problems.append(Problem(-1, "", f"column videos/checksum cannot be read ({_first_line(error)})"))
        data_problems, report.checked = _check_data(store, layout, columns, checksums, broken_arrays)
        report.problems = problems + sorted(data_problems, key=lambda p: p.index)
    if repair:  # reopened to write, in the part files of a joined HDF5 cache
        report.repaired = _mark_pending(path, layout.shard_size, report.broken_videos)
    return report


def _mark_pending(path: str | Path, shard_size: int, videos: list[int]) -> list[int]:
    """Mark `videos` pending with no error (status last, as extraction writes it; closing flushes)."""
    with FeatureStore(path, mode="r+") as store:
        for i in videos:
            rows = store.for_shard(i // shard_size)
            rows.write_rows("error", i, np.array([""], dtype=object))
            rows.write_rows("status", i, np.array([PENDING], dtype=np.uint8))
    return list(videos)
