"""Dataset discovery: class folders with or without a split level, list files, CSV, bad entries."""
import errno
import json
import os
from pathlib import Path

import pytest

from evl_cache.errors import DatasetError
from evl_cache.video.find import VIDEO_SUFFIXES, expand_video_inputs, find_videos, read_class_names


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_split_level_and_sorted_classes(tmp_path):
    for rel in ["train/b/1.mp4", "train/a/2.mp4", "validate/a/3.webm", "test/c/4.avi", "train/a/notes.txt"]:
        _touch(tmp_path / rel)
    found = find_videos(tmp_path)
    assert found.class_names == ["a", "b", "c"]
    assert [(e.path, e.label, e.split) for e in found.entries] == [
        ("test/c/4.avi", 2, "test"), ("train/a/2.mp4", 0, "train"), ("train/b/1.mp4", 1, "train"),
        ("validate/a/3.webm", 0, "val")]


def test_no_split_level_and_symlink_loop(tmp_path):
    _touch(tmp_path / "walk" / "x.mp4")
    _touch(tmp_path / "run" / "sub" / "y.mkv")
    (tmp_path / "run" / "loop").symlink_to(tmp_path, target_is_directory=True)
    found = find_videos(tmp_path)
    assert found.class_names == ["run", "walk"]
    assert {e.split for e in found.entries} == {"none"}
    assert [e.path for e in found.entries] == ["run/sub/y.mkv", "walk/x.mp4"]


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="videos folder not found"):
        find_videos(tmp_path / "nope")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DatasetError, match="no videos found"):
        find_videos(tmp_path)


def test_authors_list_format_with_bad_lines(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("a/1.mp4 0\nb/with space.mp4 2\nc/3.mp4 x\nlonely\n\nd/4.mp4 -1\n")
    val = tmp_path / "val.txt"
    val.write_text("v/1.mp4 1\n")
    found = find_videos(train_list=listing, val_list=val, data_root=tmp_path / "root")
    assert found.root == tmp_path / "root"
    assert found.class_names == ["0", "1", "2"]
    rows = [(e.path, e.label, e.split, bool(e.error)) for e in found.entries]
    assert rows == [("a/1.mp4", 0, "train", False), ("b/with space.mp4", 2, "train", False),
                    ("c/3.mp4", -1, "train", True), ("lonely", -1, "train", True),
                    ("d/4.mp4", -1, "train", True), ("v/1.mp4", 1, "val", False)]
    assert "train.txt line 3" in found.entries[2].error


def test_list_labels_out_of_range_of_class_file(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"walk": 1, "run": 0}))
    assert read_class_names(classes) == ["run", "walk"]
    listing = tmp_path / "l.txt"
    listing.write_text("a.mp4 1\nb.mp4 2\n")
    found = find_videos(train_list=listing, classes=classes)
    assert found.class_names == ["run", "walk"]
    assert found.entries[0].label == 1 and found.entries[1].label == -1
    assert "out of range" in found.entries[1].error


def test_csv_with_names_and_split(tmp_path):
    table = tmp_path / "d.csv"
    table.write_text("path,label,split\nx/1.mp4,walk,train\nx/2.mp4,run,validation\nx/3.mp4,,train\n")
    found = find_videos(train_list=table)
    assert found.class_names == ["run", "walk"]
    assert [(e.label, e.split) for e in found.entries[:2]] == [(1, "train"), (0, "val")]
    assert found.entries[2].error
    bad = tmp_path / "bad.csv"
    bad.write_text("file,class\na,b\n")
    with pytest.raises(DatasetError, match="header with 'path' and 'label'"):
        find_videos(train_list=bad)


def test_duplicate_paths_in_a_list_fail_after_the_first(tmp_path):
    listing = tmp_path / "train.txt"
    listing.write_text("a/1.mp4 0\n# a comment\na/2.mp4 1\na/1.mp4 1\n./a/2.mp4 1\na/1.mp4 0\n")
    found = find_videos(train_list=listing)
    assert [(e.path, e.error) for e in found.entries] == [
        ("a/1.mp4", ""), ("a/2.mp4", ""), ("a/1.mp4", "train.txt line 4: duplicate of line 1"),
        ("./a/2.mp4", "train.txt line 5: duplicate of line 3"), ("a/1.mp4", "train.txt line 6: duplicate of line 1")]
    table = tmp_path / "d.csv"
    table.write_text("path,label\nx/1.mp4,walk\nx/1.mp4,run\n")
    assert [e.error for e in find_videos(train_list=table).entries] == ["", "d.csv line 3: duplicate of line 2"]


def test_class_names_from_a_label_csv(tmp_path):
    """ViFi-CLIP's (X-CLIP's) label files: an id,name header, one row per class, names with spaces."""
    labels = tmp_path / "hmdb_51_labels.csv"
    labels.write_text("id,name\n1,ride bike\n0,brush hair\n2,\"pour, then drink\"\n")
    assert read_class_names(labels) == ["brush hair", "ride bike", "pour, then drink"]
    labels.write_text("id,name\n0,a\n2,b\n")
    with pytest.raises(DatasetError, match="hmdb_51_labels.csv: class ids in the CSV are not 0..K-1"):
        read_class_names(labels)
    labels.write_text("a\nb\n")
    with pytest.raises(DatasetError, match="needs an id,name header"):
        read_class_names(labels)


@pytest.mark.parametrize("encoding", ["utf-8-sig", "utf-16", "utf-16-be", "utf-32"])
def test_lists_saved_with_a_byte_order_mark_and_windows_line_endings(tmp_path, encoding):
    """Spreadsheets save UTF-8 with a BOM, or UTF-16/32 (python's utf-16/utf-32 write the mark; -be needs
    it by hand), and end lines with CRLF."""
    def save(path, text):
        mark = "\ufeff" if encoding == "utf-16-be" else ""
        path.write_bytes((mark + text).replace("\n", "\r\n").encode(encoding))
    save(tmp_path / "d.csv", "path,label,split\nx/1.mp4,walk,train\nx/2.mp4,run,val\n")
    found = find_videos(train_list=tmp_path / "d.csv")
    assert found.class_names == ["run", "walk"]
    assert [(e.path, e.label, e.split, e.error) for e in found.entries] == [
        ("x/1.mp4", 1, "train", ""), ("x/2.mp4", 0, "val", "")]
    save(tmp_path / "l.txt", "a/1.mp4 0\n")
    assert [(e.path, e.label) for e in find_videos(train_list=tmp_path / "l.txt").entries] == [("a/1.mp4", 0)]
    save(tmp_path / "classes.txt", "walk\nrun\n")
    _touch(tmp_path / "videos" / "run" / "1.mp4")
    _touch(tmp_path / "videos" / "walk" / "2.mp4")
    found = find_videos(tmp_path / "videos", classes=tmp_path / "classes.txt")
    assert found.class_names == ["walk", "run"] and [e.label for e in found.entries] == [1, 0]
    save(tmp_path / "classes.json", '{"walk": 0, "run": 1}')
    assert read_class_names(tmp_path / "classes.json") == ["walk", "run"]
    assert expand_video_inputs([tmp_path / "l.txt", tmp_path / "d.csv"]) == [
        tmp_path / "a/1.mp4", tmp_path / "x/1.mp4", tmp_path / "x/2.mp4"]


def test_bytes_that_are_not_text_are_one_line_naming_file_and_line(tmp_path):
    latin1 = tmp_path / "l.txt"
    latin1.write_bytes("a/1.mp4 0\nb/2.mp4 1\nc/caf\u00e9.mp4 0\n".encode("latin-1"))
    message = "l.txt: line 3 is not UTF-8 text; save the file as UTF-8"
    with pytest.raises(DatasetError, match=message):
        find_videos(train_list=latin1)
    with pytest.raises(DatasetError, match=message):
        expand_video_inputs([latin1])
    classes = tmp_path / "c.csv"
    classes.write_bytes("id,name\n0,caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="c.csv: line 2 is not UTF-8 text"):
        read_class_names(classes)
    no_mark = tmp_path / "d.csv"
    no_mark.write_bytes("path,label\nx/1.mp4,0\n".encode("utf-16-le"))
    with pytest.raises(DatasetError, match="d.csv: line 1 holds NUL characters"):
        find_videos(train_list=no_mark)
    odd = tmp_path / "odd.txt"
    odd.write_bytes("a/1.mp4 0\n".encode("utf-16") + b"\x00")
    with pytest.raises(DatasetError, match="odd.txt: line 2 is not UTF-16 text"):
        find_videos(train_list=odd)


def test_malformed_class_json_is_one_line(tmp_path):
    classes = tmp_path / "classes.json"
    classes.write_text('{"walk": 0,\n "run": 1,\n}')
    with pytest.raises(DatasetError, match=r"classes.json: not valid JSON: .* at line 3 column 1$"):
        read_class_names(classes)
    classes.write_text('{"walk": "first"}')
    with pytest.raises(DatasetError, match="classes.json: class indices in the mapping are not all integers"):
        read_class_names(classes)
    classes.write_text('"walk"')
    with pytest.raises(DatasetError, match="classes.json: a class-name JSON is a list of names or a mapping"):
        read_class_names(classes)


def test_tab_separated_lists(tmp_path):
    listing = tmp_path / "l.txt"
    listing.write_text("a b/1.mp4\t0\nc\td/2.mp4\t1\nlonely\t\n")
    found = find_videos(train_list=listing)
    assert [(e.path, e.label, bool(e.error)) for e in found.entries] == [
        ("a b/1.mp4", 0, False), ("c\td/2.mp4", 1, False), ("lonely", -1, True)]
    for name in ("d.tsv", "d.csv"):
        (tmp_path / name).write_text("path\tlabel\tsplit\nx, 1.mp4\twalk\tval\n")
        assert [(e.path, e.label, e.split, e.error) for e in find_videos(train_list=tmp_path / name).entries] == [
            ("x, 1.mp4", 0, "val", "")]
    labels = tmp_path / "labels.tsv"
    labels.write_text("id\tname\n1\tride bike\n0\tbrush hair\n")
    assert read_class_names(labels) == ["brush hair", "ride bike"]
    predict_list = tmp_path / "p.txt"
    predict_list.write_text("v 1.mp4\twalk\nv 2.mp4 3\n")
    assert expand_video_inputs([predict_list]) == [tmp_path / "v 1.mp4", tmp_path / "v 2.mp4"]


def test_csv_split_values_other_than_a_split_name_are_entry_errors(tmp_path):
    """`holdout` or a typo must not become the list's default split (train): that row would be trained on."""
    table = tmp_path / "d.csv"
    table.write_text("path,label,split\n1.mp4,0,Dev\n2.mp4,0,valid\n3.mp4,0,testing\n4.mp4,0,\n"
                     "5.mp4,0,holdout\n6.mp4,0,trian\n")
    found = find_videos(train_list=table)
    assert [(e.path, e.split, e.error) for e in found.entries] == [
        ("1.mp4", "val", ""), ("2.mp4", "val", ""), ("3.mp4", "test", ""), ("4.mp4", "train", ""),
        ("5.mp4", "train", "d.csv line 6: split 'holdout' is not train, val or test"),
        ("6.mp4", "train", "d.csv line 7: split 'trian' is not train, val or test")]


def test_csv_class_names_are_shared_by_train_and_val_lists(tmp_path):
    """Each list named its own classes: `walk` was 1 in train (run, walk) but 0 in val (walk only)."""
    (tmp_path / "train.csv").write_text("path,label\na.mp4,run\nb.mp4,walk\n")
    (tmp_path / "val.csv").write_text("path,label\nc.mp4,walk\nd.mp4,jump\n")
    found = find_videos(train_list=tmp_path / "train.csv", val_list=tmp_path / "val.csv")
    assert found.class_names == ["jump", "run", "walk"]
    assert [(e.path, found.class_names[e.label], e.split) for e in found.entries] == [
        ("a.mp4", "run", "train"), ("b.mp4", "walk", "train"), ("c.mp4", "walk", "val"), ("d.mp4", "jump", "val")]


def test_split_folders_beside_hidden_macosx_and_dev_folders(tmp_path):
    """An unzipped archive's `__MACOSX` (and `.git`) beside train/val made train, val and __MACOSX classes."""
    for rel in ["train/a/1.mp4", "val/a/2.mp4", "__MACOSX/train/a/._1.mp4", "__MACOSX/x.mp4", ".git/y.mp4"]:
        _touch(tmp_path / "ds" / rel)
    found = find_videos(tmp_path / "ds")
    assert found.class_names == ["a"]
    assert [(e.path, e.split) for e in found.entries] == [("train/a/1.mp4", "train"), ("val/a/2.mp4", "val")]
    for rel in ["Train/a/1.mp4", "Dev/b/2.mp4"]:
        _touch(tmp_path / "dev" / rel)
    found = find_videos(tmp_path / "dev")
    assert [(e.path, e.split) for e in found.entries] == [("Dev/b/2.mp4", "val"), ("Train/a/1.mp4", "train")]


def test_a_folder_beside_mostly_split_folders_is_left_out_with_a_warning(tmp_path, caplog):
    for rel in ["train/a/1.mp4", "val/a/2.mp4", "test/b/3.mp4", "extras/a/4.mp4", "extras/5.mp4"]:
        _touch(tmp_path / rel)
    found = find_videos(tmp_path)
    assert found.class_names == ["a", "b"]
    assert [e.split for e in found.entries] == ["test", "train", "val"]
    warnings = [r.getMessage() for r in caplog.records if "extras" in r.getMessage()]
    assert warnings == [f"{tmp_path / 'extras'}: not a split folder (test, train, val are); "
                        "left out with the 2 videos it holds"]


@pytest.mark.parametrize("folders", [["train", "dance", "jump"], ["val", "dance"]])
def test_split_and_class_folders_mixed_at_the_top_are_refused(tmp_path, folders):
    """`train/` beside class folders gave classes train, dance, jump, all in split none."""
    for name in folders:
        _touch(tmp_path / name / "x" / "1.mp4")
    splits, others = folders[0], ", ".join(sorted(folders[1:]))
    with pytest.raises(DatasetError, match=f"top-level folders mix split names \\({splits}\\) and other names "
                                           f"\\({others}\\): put every class folder under a split folder, or none"):
        find_videos(tmp_path)


def test_a_cache_inside_the_videos_folder_is_never_a_class_or_a_video(tmp_path):
    """`extract --videos ds --out ds/feats.zarr` run again took feats.zarr for a class."""
    ds = tmp_path / "ds"
    for rel in ["run/1.mp4", "walk/2.mp4", "walk/keep.h5", "feats.zarr/zarr.json", "feats.zarr/c/0/0.mp4",
                "store/zarr.json", "store/run/x.mp4", ".feats.creating.zarr/run/y.mp4", "out/run/z.mp4",
                "walk/written.mp4", "feats.part-0-of-2.h5"]:
        _touch(ds / rel)
    exclude = [ds / "run" / ".." / "out", ds / "walk" / "written.mp4", ds / "feats.part-0-of-2.h5"]
    found = find_videos(ds, exclude=exclude)
    assert found.class_names == ["run", "walk"]
    assert [e.path for e in found.entries] == ["run/1.mp4", "walk/2.mp4"]
    assert ".h5" not in VIDEO_SUFFIXES
    for split in ("train", "val"):
        _touch(tmp_path / "splits" / split / "a" / "1.mp4")
    _touch(tmp_path / "splits" / "feats.zarr" / "zarr.json")
    assert {e.split for e in find_videos(tmp_path / "splits").entries} == {"train", "val"}


def test_unreadable_folders_are_listed_and_warned_about(tmp_path, monkeypatch, caplog):
    """Tests run as root, where chmod 000 does not stop reads: listing a folder named in `refused` fails as
    it would for a user without the permission."""
    for rel in ["run/1.mp4", "run/private/2.mp4", "jump/3.mp4", "walk/4.mp4"]:
        _touch(tmp_path / "ds" / rel)
    scandir, refused = os.scandir, {"private", "jump"}

    def refusing_scandir(path="."):
        if Path(path).name in refused:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return scandir(path)
    monkeypatch.setattr(os, "scandir", refusing_scandir)
    found = find_videos(tmp_path / "ds")
    assert [e.path for e in found.entries] == ["run/1.mp4", "walk/4.mp4"]
    unreadable = [f"{tmp_path / 'ds' / 'jump'}: Permission denied", f"{tmp_path / 'ds' / 'run' / 'private'}: "
                  "Permission denied"]
    assert found.unreadable == unreadable
    warnings = [r.getMessage() for r in caplog.records if "cannot read" in r.getMessage()]
    assert warnings == [f"{line.split(':')[0]}: cannot read this folder (Permission denied); its videos are left out"
                        for line in unreadable]
    for rel in ["train/a/1.mp4", "val/a/2.mp4"]:
        _touch(tmp_path / "split" / rel)
    refused = {"val"}
    found = find_videos(tmp_path / "split")
    assert [e.path for e in found.entries] == ["train/a/1.mp4"]
    assert found.unreadable == [f"{tmp_path / 'split' / 'val'}: Permission denied"]


def test_class_names_that_differ_only_by_case_or_separators_are_warned_about(tmp_path, caplog):
    for name in ["alpha", "Alpha", "beta", "beta_", "brush hair", "brush-hair", "gamma"]:
        _touch(tmp_path / "ds" / name / "1.mp4")
    found = find_videos(tmp_path / "ds")
    assert len(found.class_names) == 7
    warnings = [r.getMessage() for r in caplog.records if "differ only" in r.getMessage()]
    assert warnings == [f"{tmp_path / 'ds'}: class names that differ only by case, spaces, underscores or hyphens: "
                        "['Alpha', 'alpha'], ['beta', 'beta_'], ['brush hair', 'brush-hair']; they are separate "
                        "classes unless a --classes mapping (name -> index) gives them one index"]
    caplog.clear()
    (tmp_path / "train.csv").write_text("path,label\na.mp4,Walk\nb.mp4,run\n")
    (tmp_path / "val.csv").write_text("path,label\nc.mp4,walk\n")
    find_videos(train_list=tmp_path / "train.csv", val_list=tmp_path / "val.csv")
    assert [r.getMessage() for r in caplog.records if "differ only" in r.getMessage()] == [
        f"{tmp_path / 'train.csv'}, {tmp_path / 'val.csv'}: class names that differ only by case, spaces, "
        "underscores or hyphens: ['Walk', 'walk']; they are separate classes unless a --classes mapping "
        "(name -> index) gives them one index"]


def test_a_classes_mapping_may_give_several_names_one_index(tmp_path, caplog):
    classes = tmp_path / "classes.json"
    classes.write_text(json.dumps({"beta": 1, "alpha": 0, "Alpha": 0, "beta_": 1}))
    assert read_class_names(classes) == ["alpha", "beta"]
    labels = tmp_path / "labels.csv"
    labels.write_text("id,name\n1,beta\n0,alpha\n0,Alpha\n")
    assert read_class_names(labels) == ["alpha", "beta"]
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps(["beta", "alpha"]))
    assert read_class_names(listed) == ["beta", "alpha"]
    for name in ["alpha", "Alpha", "beta_"]:
        _touch(tmp_path / "ds" / name / "1.mp4")
    found = find_videos(tmp_path / "ds", classes=classes)
    assert found.class_names == ["alpha", "beta"]
    assert [(e.path, e.label) for e in found.entries] == [("Alpha/1.mp4", 0), ("alpha/1.mp4", 0), ("beta_/1.mp4", 1)]
    assert not [r for r in caplog.records if "differ only" in r.getMessage()]
    table = tmp_path / "d.csv"
    table.write_text("path,label\na.mp4,Alpha\nb.mp4,beta_\nc.mp4,beta\nd.mp4,1\ne.mp4,BETA\n")
    found = find_videos(train_list=table, classes=classes)
    assert [e.label for e in found.entries] == [0, 1, 1, 1, -1] and "'BETA'" in found.entries[4].error
    _touch(tmp_path / "ds" / "delta" / "1.mp4")
    classes.write_text(json.dumps({"alpha": 0, "Alpha": 0, "beta": 1, "gamma": 2}))
    with pytest.raises(DatasetError, match="classes.json: --classes does not name the same classes as the class "
                                           r"folders \(folders it does not name: beta_, delta; classes without a "
                                           r"folder: beta, gamma\)"):
        find_videos(tmp_path / "ds", classes=classes)


def test_urls_among_predict_inputs_are_kept_as_written(tmp_path):
    """Path("https://x/y.mp4") is https:/x/y.mp4: a local path that names nothing, not a URL to refuse."""
    (tmp_path / "p.txt").write_text("s3://bucket/a.mp4 0\nlocal.mp4\n")
    (tmp_path / "p.csv").write_text("path\nhttp://host/b.mp4\n")
    assert expand_video_inputs(["https://x/y.mp4", tmp_path / "p.txt", tmp_path / "p.csv", "v.mp4"]) == [
        "https://x/y.mp4", "s3://bucket/a.mp4", tmp_path / "local.mp4", "http://host/b.mp4", Path("v.mp4")]


def test_csv_segments_in_seconds(tmp_path):
    """Raw downloads hold the whole video: a CSV's start and end columns give the part to sample; two
    segments of one file are two videos, the same segment twice is a duplicate."""
    listing = tmp_path / "raw.csv"
    listing.write_text("path,label,start,end\n"
                       "yt/abc.mp4,run,10,20\nyt/abc.mp4,walk,30.5,40\nyt/abc.mp4,run,10,20.0\nyt/def.mp4,run,,\n"
                       "yt/g.mp4,run,5,\nyt/h.mp4,run,x,3\nyt/i.mp4,run,-1,3\nyt/j.mp4,run,4,4\nyt/k.mp4,run,0,nan\n")
    found = find_videos(train_list=listing)
    rows = [(e.path, e.label, e.segment, e.error) for e in found.entries]
    assert rows[:4] == [("yt/abc.mp4", 0, (10.0, 20.0), ""), ("yt/abc.mp4", 1, (30.5, 40.0), ""),
                        ("yt/abc.mp4", 0, (10.0, 20.0), "raw.csv line 4: duplicate of line 2"),
                        ("yt/def.mp4", 0, None, "")]
    assert [(e.segment, e.error) for e in found.entries[4:]] == [
        (None, "raw.csv line 6: start '5' and end '' are not both numbers of seconds"),
        (None, "raw.csv line 7: start 'x' and end '3' are not both numbers of seconds"),
        (None, "raw.csv line 8: segment -1-3 s: start must be 0 or more, and end after it"),
        (None, "raw.csv line 9: segment 4-4 s: start must be 0 or more, and end after it"),
        (None, "raw.csv line 10: segment 0-nan s: start must be 0 or more, and end after it")]
    (tmp_path / "half.csv").write_text("path,label,start\na.mp4,run,3\n")
    with pytest.raises(DatasetError, match="a CSV with a start column needs an end column"):
        find_videos(train_list=tmp_path / "half.csv")
