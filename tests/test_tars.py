"""WebDataset tar shards as video2dataset writes them: brace patterns, labels from .cls or a JSON field,
members decoded in place, truncated shards and undecodable members failing alone, and an extraction that
resumes by key."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from evl_cache import ExtractConfig, extract
from evl_cache.cache.options import dataset_of
from evl_cache.cache.store import DONE, FAILED, FeatureStore
from evl_cache.errors import BadVideoError, DatasetError, EvlCacheError
from evl_cache.video.decode import decode_frames, probe_video
from evl_cache.video.find import read_classes
from evl_cache.video.synthetic import numbered_frames, read_frame_number, write_video
from evl_cache.video.tars import expand_braces, is_tar_input, read_shards, tar_member

TINY = dict(model="EVL-Tiny", pretrained="none", frames=4, stride=2, blocks=1, shard_size=2)


def _write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar with `members` in this order, as video2dataset writes them (plain ustar, no compression)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, video: bytes, label: int, name: str) -> list[tuple[str, bytes]]:
    """One video2dataset sample: the video, its metadata JSON, its caption and its class."""
    meta = {"key": key, "url": f"https://example.com/{key}.mp4", "caption": f"someone doing {name}", "action": name}
    return [(f"{key}.mp4", video), (f"{key}.json", json.dumps(meta).encode()), (f"{key}.txt", meta["caption"].encode()),
            (f"{key}.cls", f"{label}\n".encode())]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict:
    """shards/00000{0,1,2}.tar: shard 0 holds two good videos, shard 1 a good one and a member that is
    not a video, shard 2 is cut inside its second video; shard 3 of the brace range does not exist."""
    folder = tmp_path_factory.mktemp("webdataset")
    videos = [write_video(folder / f"v{i}.mp4", numbered_frames(12, 32, 32, seed=i)).read_bytes() for i in range(4)]
    names = ["run", "walk", "run", "walk"]
    root = folder / "shards"
    _write_shard(root / "000000.tar", _sample("0000000", videos[0], 0, names[0]) + _sample("0000001", videos[1], 1,
                                                                                           names[1]))
    _write_shard(root / "000001.tar", _sample("0000002", videos[2], 0, names[2])
                 + _sample("0000003", b"not a video at all", 1, names[3]))
    cut = _write_shard(root / "000002.tar", _sample("0000004", videos[3], 1, "walk") + _sample("0000005", videos[3], 1,
                                                                                                 "walk"))
    data = cut.read_bytes()
    second = data.index(b"0000005.mp4")  # its header; cut inside the member's data that follows
    cut.write_bytes(data[:second + 512 + 1000])
    return {"root": root, "pattern": str(root / "{000000..000003}.tar"), "videos": videos}


def test_brace_patterns_spell_ranges_and_lists():
    assert expand_braces("s/{000..002}.tar") == ["s/000.tar", "s/001.tar", "s/002.tar"]
    assert expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar", "b/8.tar", "b/9.tar", "b/10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]
    with pytest.raises(DatasetError, match="runs backwards"):
        expand_braces("{5..3}.tar")
    with pytest.raises(DatasetError, match="neither a range"):
        expand_braces("{x}.tar")


def test_shards_are_listed_by_key_with_cut_members_and_missing_shards_noted(shards):
    found = read_shards(shards["pattern"])
    assert found.root == shards["root"] and found.class_names == ["0", "1"]
    assert [(e.path, e.label, e.split, e.error) for e in found.entries] == [
        ("000000.tar#0000000.mp4", 0, "none", ""), ("000000.tar#0000001.mp4", 1, "none", ""),
        ("000001.tar#0000002.mp4", 0, "none", ""), ("000001.tar#0000003.mp4", 1, "none", ""),
        ("000002.tar#0000004.mp4", 1, "none", ""),
        ("000002.tar#0000005.mp4", -1, "none", "cut short: the tar ends inside this member")]
    root = shards["root"]
    assert found.unreadable == [
        f"{root / '000002.tar'}: truncated after 4 whole members; any members after the cut cannot be listed",
        f"{root / '000003.tar'}: cannot read: No such file or directory"]
    assert [e.path for e in read_shards(root).entries] == [e.path for e in found.entries]  # a folder of shards


def test_labels_from_a_json_field_name_the_classes(shards, tmp_path):
    found = read_shards(shards["pattern"], label_field="action")
    assert found.class_names == ["run", "walk"] and [e.label for e in found.entries[:4]] == [0, 1, 0, 1]
    (tmp_path / "classes.txt").write_text("walk\nrun\n")
    reordered = read_shards(shards["pattern"], "action", read_classes(tmp_path / "classes.txt"))
    assert reordered.class_names == ["walk", "run"] and [e.label for e in reordered.entries[:4]] == [1, 0, 1, 0]
    with pytest.raises(DatasetError, match="no video has a label: 000000.tar#0000000.mp4: 0000000.json has no 'nope' "
                                           "field holding a class index or name"):
        read_shards(shards["pattern"], label_field="nope")


def test_members_decode_in_place_as_the_file_would(shards, tmp_path):
    member = shards["root"] / "000000.tar#0000001.mp4"
    source = tmp_path / "v1.mp4"
    source.write_bytes(shards["videos"][1])
    assert probe_video(member).num_frames == probe_video(source).num_frames == 12
    decoded = decode_frames(member, [0, 7, 3, 11], 32)
    assert [read_frame_number(frame) for frame in decoded.frames] == [0, 7, 3, 11]
    assert np.array_equal(decoded.frames, decode_frames(source, [0, 7, 3, 11], 32).frames)
    with pytest.raises(BadVideoError, match="no member 0000009.mp4 in the tar"):
        probe_video(shards["root"] / "000000.tar#0000009.mp4")
    with pytest.raises(BadVideoError, match="cut short: the tar ends inside this member"):
        probe_video(shards["root"] / "000002.tar#0000005.mp4")
    with pytest.raises(BadVideoError, match="cannot open as a video"):
        probe_video(shards["root"] / "000001.tar#0000003.mp4")
    (tmp_path / "odd.tar#name.mp4").write_bytes(shards["videos"][0])  # a file whose name looks like a member
    assert tar_member(tmp_path / "odd.tar#name.mp4") is None and probe_video(tmp_path / "odd.tar#name.mp4").num_frames


def test_what_is_and_is_not_tar_input(shards, tmp_path):
    assert is_tar_input(shards["pattern"]) and is_tar_input(shards["root"]) and is_tar_input("a/b.tar")
    assert not is_tar_input(tmp_path) and not is_tar_input(tmp_path / "videos {2024}")
    (tmp_path / "weird{1}.tar").write_bytes((shards["root"] / "000000.tar").read_bytes())
    assert len(read_shards(tmp_path / "weird{1}.tar").entries) == 2  # a file is a file, braces or not
    (tmp_path / "mixed" / "run").mkdir(parents=True)
    _write_shard(tmp_path / "mixed" / "000000.tar", [("0.mp4", shards["videos"][0]), ("0.cls", b"0")])
    with pytest.raises(DatasetError, match="holds both .tar shards and folders"):
        read_shards(tmp_path / "mixed")
    _write_shard(tmp_path / "unlabelled.tar", [("0.mp4", shards["videos"][0]), ("0.txt", b"a caption")])
    with pytest.raises(DatasetError, match=r"no video has a label: unlabelled.tar#0.mp4: no 0.cls member \(or give "
                                           r"--label-field"):
        read_shards(tmp_path / "unlabelled.tar")
    with pytest.raises(DatasetError, match="no .tar shards found"):
        read_shards(tmp_path / "mixed" / "run")
    with pytest.raises(EvlCacheError, match="--label-field is for tar shards"):
        dataset_of(ExtractConfig(out=tmp_path / "c.zarr", videos=tmp_path / "mixed" / "run", label_field="x"))


def test_extraction_from_shards_resumes_by_key(shards, tmp_path):
    """Two worker processes decode members in place; the undecodable and the cut member fail alone, the
    missing shard is counted in the summary; a re-run finds every shard done."""
    out = tmp_path / "shards.zarr"
    config = ExtractConfig(out=out, videos=Path(shards["pattern"]), label_field="action", workers=2, **TINY)
    summary = extract(config)
    assert (summary.done, summary.failed) == (4, 2) and "2 shard(s) could not be read" in summary.line()
    with FeatureStore(out) as store:
        assert list(store.column("path")) == [e.path for e in read_shards(shards["pattern"]).entries]
        assert list(store.column("status")) == [DONE, DONE, DONE, FAILED, DONE, FAILED]
        assert list(store.column("frames"))[:3] == [12, 12, 12] and store.attrs["class_names"] == ["run", "walk"]
        assert store.column("error")[3].startswith("cannot open as a video")
    again = extract(config)
    assert (again.done, again.failed, again.skipped) == (0, 0, 6)


@pytest.mark.slow  # starts a torchrun job
def test_two_processes_under_torchrun_split_the_shards_videos(shards, tmp_path):
    """Each process extracts the cache shards it owns (s % 2), reading their members from whichever tars
    hold them; the cache equals one process's."""
    args = ["extract", "--videos", shards["pattern"], "--label-field", "action", "--model", "EVL-Tiny",
            "--pretrained", "none", "--frames", "4", "--stride", "2", "--blocks", "1", "--shard-size", "2",
            "--workers", "1"]
    one = tmp_path / "one.zarr"
    extract(ExtractConfig(out=one, videos=Path(shards["pattern"]), label_field="action", workers=0, **TINY))
    two = tmp_path / "two.zarr"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
               str(29500 + os.getpid() % 1000), "-m", "evl_cache.cli", *args, "--out", str(two)]
    result = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = {json.loads(line)["rank"] for line in Path(f"{two}.extract.jsonl").read_text().splitlines()
             if '"shard"' in line}
    assert ranks == {0, 1} and "4 done, 2 failed" in result.stdout
    with FeatureStore(one) as a, FeatureStore(two) as b:
        for column in ("path", "label", "status", "frames", "error"):
            assert list(a.column(column)) == list(b.column(column)), column
        np.testing.assert_array_equal(np.asarray(a.array("embed")[...]), np.asarray(b.array("embed")[...]))
