"""verify and --repair: damage found per video and redone alone; random SIGKILLs resume to the same cache."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sigkill import kill_at_random_points, time_work

import evl_cache.cache.extract as extract_module
from evl_cache.cache.extract import ExtractConfig, extract
from evl_cache.cache.store import FAILED, PENDING, VIDEO_COLUMNS, FeatureStore
from evl_cache.cache.verify import VerifyConfig, verify
from evl_cache.cli import main
from evl_cache.errors import CacheError

OPTIONS = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=3, blocks=2, workers=0, shard_size=2,
               train_views=2, eval_views=2)


def _arrays(path):
    """Every array and every per-video column of a cache, as numpy."""
    with FeatureStore(path) as store:
        blocks = store.attrs["blocks"]
        names = ["embed"] + [f"tokens/block_{b}" for b in blocks] + [
            f"maps/block_{b}/{d}" for b in blocks for d in ("prev", "next")]
        arrays = {name: np.asarray(store.array(name)[...]) for name in names}
        arrays.update({f"videos/{c}": store.column(c) for c in VIDEO_COLUMNS})
    return arrays


def _assert_same(actual, expected, skip_video=None):
    assert actual.keys() == expected.keys()
    for name in expected:
        a, b = actual[name], expected[name]
        if skip_video is not None:
            a, b = np.delete(a, skip_video, axis=0), np.delete(b, skip_video, axis=0)
        np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.fixture(scope="module")
def dataset(sample_videos, tmp_path_factory) -> dict:
    """8 of the sample videos (one per class and split; 4 shards of 2): a CSV list and its data root."""
    listing = tmp_path_factory.mktemp("dataset") / "list.csv"
    rows = [f"{split}/{name}/{name}_000.mp4,{name},{split}"
            for split in ("train", "val") for name in sorted(p.name for p in (sample_videos / "train").iterdir())]
    listing.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return {"train_list": listing, "data_root": sample_videos}


def _start_extract(dataset: dict, out: Path) -> subprocess.Popen:
    """`python -m evl_cache.cli extract` into `out`, on one thread (so that two at once on two cores run
    as fast as one alone)."""
    flags = ["--out", str(out)]
    for key, value in {**dataset, **OPTIONS}.items():
        flags += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen([sys.executable, "-m", "evl_cache.cli", "extract"] + flags,
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted extraction in its own process, and the seconds its work took: from the moment
    anything appears in its folder (the cache being created, after imports and the model) to its
    summary (before the interpreter's exit)."""
    out = tmp_path_factory.mktemp("reference") / "ref.zarr"
    metrics = Path(f"{out}.extract.jsonl")
    seconds = time_work(_start_extract(dataset, out), lambda: any(out.parent.iterdir()),
                        lambda: metrics.exists() and '"summary"' in metrics.read_text())
    return out, seconds


def _damage_chunk_on_disk(cache: Path, name: str, video: int, view: int) -> None:
    """Overwrite 8 values inside one (video, view) chunk of a zarr shard file, behind zarr's back:
    the shard index at the file's end (offset, length per chunk, then a crc32c) says where it lies."""
    with FeatureStore(cache) as store:
        shard_size, views, ndim = store.attrs["shard_size"], store.attrs["sampling"]["views"], store.array(name).ndim
    shard, row = divmod(video, shard_size)
    file = cache.joinpath(name, "c", str(shard), *["0"] * (ndim - 1))
    raw = bytearray(file.read_bytes())
    chunks = shard_size * views
    index = np.frombuffer(bytes(raw[-(16 * chunks + 4):-4]), "<u8").reshape(chunks, 2)
    offset, length = (int(x) for x in index[row * views + view])
    at = offset + length // 2
    garbage = np.full(8, 3.0, "<f2").tobytes()  # finite, plausible values: only the checksum can tell
    assert raw[at:at + len(garbage)] != garbage
    raw[at:at + len(garbage)] = garbage
    file.write_bytes(bytes(raw))


def test_verify_accepts_a_fresh_cache(reference):
    ref, _ = reference
    report = verify(VerifyConfig(ref))
    assert report.ok and report.checksums and report.checked == report.videos == 8
    result = CliRunner().invoke(main, ["verify", str(ref)])
    assert result.exit_code == 0 and "; ok" in result.output, result.output


def test_damaged_video_is_found_repaired_and_redone_alone(reference, dataset, tmp_path, monkeypatch):
    ref, _ = reference
    out = tmp_path / "work.zarr"
    shutil.copytree(ref, out)
    damaged = 3
    _damage_chunk_on_disk(out, "tokens/block_3", damaged, view=1)
    path = str(_arrays(out)["videos/path"][damaged])

    report = verify(VerifyConfig(out))
    assert report.broken_videos == [damaged]
    assert [p.reason.split(" ")[0] for p in report.problems] == ["checksum"]
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1
    assert f"problem: video {damaged} ({path}): checksum" in result.output, result.output

    result = CliRunner().invoke(main, ["verify", str(out), "--repair", "--json"])
    assert result.exit_code == 1
    assert json.loads(result.stdout)["repaired"] == [damaged]
    with FeatureStore(out) as store:
        assert store.column("status")[damaged] == PENDING and store.column("error")[damaged] == ""
    assert verify(VerifyConfig(out)).ok  # a pending video is work to do, not a problem
    before = _arrays(out)

    decoded = []
    read = extract_module.read_video_clips
    monkeypatch.setattr(extract_module, "read_video_clips", lambda p, *args: decoded.append(p) or read(p, *args))
    summary = extract(ExtractConfig(out=out, **dataset, **OPTIONS))
    assert (summary.done, summary.failed, summary.skipped) == (1, 0, 7)
    assert decoded == [dataset["data_root"] / path]
    after = _arrays(out)
    _assert_same(after, before, skip_video=damaged)  # the others' data and rows were kept as they were
    _assert_same(after, _arrays(ref))  # and the cache is the uninterrupted run's
    assert verify(VerifyConfig(out)).ok


def test_hdf5_nan_written_behind_the_checksum(reference, dataset, tmp_path):
    ref, _ = reference
    out = tmp_path / "work.h5"
    extract(ExtractConfig(out=out, **dataset, **OPTIONS))
    assert verify(VerifyConfig(out)).ok
    with FeatureStore(out, mode="r+") as store:
        store.array("embed")[6, 1, 2, :3] = np.nan
    report = verify(VerifyConfig(out, repair=True))
    assert report.broken_videos == [6] and report.repaired == [6]
    reasons = [p.reason for p in report.problems]
    assert len(reasons) == 2 and reasons[0] == "embed holds NaN or infinite values"
    assert reasons[1].startswith("checksum ") and "recorded when it was written" in reasons[1]
    summary = extract(ExtractConfig(out=out, **dataset, **OPTIONS))
    assert (summary.done, summary.skipped) == (1, 7)
    _assert_same(_arrays(out), _arrays(ref))
    assert verify(VerifyConfig(out)).ok


def test_statuses_that_disagree_with_the_rows(reference, dataset, tmp_path):
    ref, _ = reference
    out = tmp_path / "work.zarr"
    shutil.copytree(ref, out)
    with FeatureStore(out, mode="r+") as store:
        assert list(store.column("split")[:2]) == ["train", "train"]  # 2 views planned
        store.write_rows("views", 1, np.array([1], np.int16))
        store.write_rows("status", 2, np.array([FAILED], np.uint8))  # failed without a reason
        store.write_rows("error", 3, np.array(["stale"], dtype=object))  # pending with a reason
        store.write_rows("status", 3, np.array([PENDING], np.uint8))
        store.write_rows("status", 4, np.array([7], np.uint8))
        store.write_rows("error", 5, np.array(["oops"], dtype=object))  # done with an error
        store.array("embed")[6, 0] = 0  # a done video with an empty view
    report = verify(VerifyConfig(out))
    by_video = {}
    for problem in report.problems:
        by_video.setdefault(problem.index, []).append(problem.reason)
    assert sorted(by_video) == [1, 2, 3, 4, 5, 6]
    assert "done with 1 views, its split plans 2" in by_video[1]
    assert any("beyond the video's 1 view(s)" in r for r in by_video[1])
    assert by_video[2] == ["failed, but has no reason"] and by_video[3] == ["pending, but has an error: stale"]
    assert "none of 0 (pending), 1 (done), 2 (failed)" in by_video[4][0]
    assert by_video[5] == ["done, but has an error: oops"]
    assert by_video[6][0] == "embed holds no data in view 0 of 2" and "checksum" in by_video[6][1]
    assert verify(VerifyConfig(out, repair=True)).repaired == [1, 2, 3, 4, 5, 6]
    summary = extract(ExtractConfig(out=out, **dataset, **OPTIONS))
    assert (summary.done, summary.skipped) == (6, 2)
    _assert_same(_arrays(out), _arrays(ref))


def test_missing_array_is_a_problem_of_the_cache(reference, tmp_path):
    ref, _ = reference
    out = tmp_path / "work.zarr"
    shutil.copytree(ref, out)
    shutil.rmtree(out / "maps" / "block_2" / "prev")
    report = verify(VerifyConfig(out, repair=True))
    assert [(p.index, p.reason) for p in report.problems] == [(-1, "array maps/block_2/prev is missing")]
    assert report.repaired == [] and report.checked == 8
    result = CliRunner().invoke(main, ["verify", str(out)])
    assert result.exit_code == 1 and "problem: cache: array maps/block_2/prev is missing" in result.output


# -- crash safety: SIGKILL at random points ----------------------------------------------------------

@pytest.mark.slow
def test_random_kills_resume_to_the_same_cache(reference, dataset, tmp_path):
    ref, seconds = reference
    expected = _arrays(ref)
    outs = {seed: tmp_path / f"seed{seed}" / "cache.zarr" for seed in range(10)}
    for out in outs.values():
        out.parent.mkdir()
    killed = {}

    def landed(seed):  # the cache missing, or with pending videos
        return not outs[seed].exists() or bool((_arrays(outs[seed])["videos/status"] == PENDING).any())

    for pair in ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9)):  # two at a time: one per core
        starts = {s: functools.partial(_start_extract, dataset, outs[s]) for s in pair}
        # the kill clock starts when anything appears in the run's own folder
        killed.update(kill_at_random_points(starts, lambda s: any(outs[s].parent.iterdir()), landed, seconds))
    assert sum(killed.values()) >= 5, f"too few kills landed before the work was done: {killed}"
    for seed, out in outs.items():
        summary = extract(ExtractConfig(out=out, **dataset, **OPTIONS))
        assert summary.done + summary.skipped == 8, (seed, summary.line())
        _assert_same(_arrays(out), expected)
        report = verify(VerifyConfig(out))
        assert report.ok, (seed, [p.line() for p in report.problems])
        assert not list(out.rglob("*.partial")), seed
        assert sorted(p.name for p in out.parent.iterdir()) == ["cache.zarr", "cache.zarr.extract.jsonl"]


@pytest.mark.parametrize("stopped_in", ["set_attrs", "_create_arrays"])
def test_a_run_stopped_while_creating_the_cache_leaves_no_half_made_cache(reference, dataset, tmp_path,
                                                                          monkeypatch, stopped_in):
    ref, _ = reference
    out = tmp_path / "new.zarr"

    def stop(*args):  # as a SIGKILL would, before the description (or the arrays) are written
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(FeatureStore, stopped_in, stop)
        with pytest.raises(KeyboardInterrupt):
            extract(ExtractConfig(out=out, **dataset, **OPTIONS))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == [".new.zarr.creating.zarr"]
    summary = extract(ExtractConfig(out=out, **dataset, **OPTIONS))
    assert summary.done == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["new.zarr", "new.zarr.extract.jsonl"]
    _assert_same(_arrays(out), _arrays(ref))


def test_a_foreign_store_in_the_way_of_creating_is_left_alone(dataset, tmp_path):
    import zarr
    zarr.open_group(str(tmp_path / ".new.zarr.creating.zarr"), mode="w").attrs["owner"] = "someone else"
    with pytest.raises(CacheError, match="in the way of creating new.zarr"):
        extract(ExtractConfig(out=tmp_path / "new.zarr", **dataset, **OPTIONS))
    assert (tmp_path / ".new.zarr.creating.zarr" / "zarr.json").exists()
