"""The official annotations read as distributed: small fake trees of Kinetics (CVDF), UCF101, HMDB51 and
Something-Something v2, in their exact file formats, with missing videos and malformed lines."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from click.testing import CliRunner

from evl_cache import ExtractConfig, InfoConfig, extract, info
from evl_cache.cache.info import format_info
from evl_cache.cache.store import FeatureStore
from evl_cache.cli import main
from evl_cache.errors import DatasetError
from evl_cache.video.datasets import NOT_ON_DISK, read_dataset
from evl_cache.video.find import read_classes
from evl_cache.video.synthetic import numbered_frames, write_video

# Kinetics-400 class names in the order of the EVL authors' data/k400_class_mappings.json (a few of its
# 400 where the order is least obvious: parentheses, capitals, shared prefixes).
EVL_K400_EXCERPT = ["hurdling", "hurling (sport)", "passing American football (in game)",
                    "passing American football (not in game)", "skiing (not slalom or crosscountry)",
                    "skiing crosscountry", "skiing slalom", "tying bow tie", "tying knot (not on a tie)", "tying tie"]


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, bytes]:
    """A tiny video in each container the official datasets use: 36 frames at 12 fps (3 s)."""
    folder = tmp_path_factory.mktemp("clips")
    frames = numbered_frames(36, 32, 32)
    return {suffix: write_video(folder / f"clip{suffix}", frames, fps=12, codec=codec).read_bytes()
            for suffix, codec in ((".mp4", "libx264"), (".avi", "mpeg4"), (".webm", "libvpx"))}


def _put(root: Path, files: dict[str, str | bytes]) -> Path:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return root


def _rows(found) -> list[tuple]:
    return [(e.path, found.class_names[e.label] if e.label >= 0 else None, e.split, e.error, e.segment)
            for e in found.entries]


def kinetics_tree(root: Path, clips: dict[str, bytes]) -> Path:
    """The CVDF layout: train/ flat and in class folders, a raw download, a video the disk lacks, a
    malformed line; val/; a test.csv without labels (as Kinetics-600 and -700 ship it)."""
    return _put(root, {
        "annotations/train.csv": "label,youtube_id,time_start,time_end,split,is_cc\n"
                                 '"air drumming",---QUuC4vJs,3,13,train,0\n'
                                 "abseiling,--07WQ2iBlw,1,11,train,0\n"
                                 '"passing American football (in game)",-8YAEz1PENs,15,25,train,0\n'
                                 '"skiing (not slalom or crosscountry)",raw_dl_0001,1,2,train,0\n'
                                 "abseiling,,x,11,train,0\n",
        "annotations/val.csv": "label,youtube_id,time_start,time_end,split,is_cc\n"
                               '"skiing crosscountry",0wR5jVB-WPk,417,427,val,0\n',
        "annotations/test.csv": "youtube_id,time_start,time_end,split\n"
                                "-3B32lodo2M,59,69,test\n",
        "train/---QUuC4vJs_000003_000013.mp4": clips[".mp4"],
        "train/abseiling/--07WQ2iBlw_000001_000011.mp4": clips[".mp4"],
        "train/raw_dl_0001.mp4": clips[".mp4"],  # the whole YouTube video
        "val/0wR5jVB-WPk_000417_000427.mp4": clips[".mp4"],
        "test/-3B32lodo2M_000059_000069.mp4": clips[".mp4"],
    })


def test_kinetics_as_the_cvdf_release_lays_it_out(tmp_path, clips, caplog):
    with caplog.at_level(logging.INFO):
        found = read_dataset("kinetics400", kinetics_tree(tmp_path / "k400", clips))
    assert found.class_names == ["abseiling", "air drumming", "passing American football (in game)",
                                 "skiing (not slalom or crosscountry)", "skiing crosscountry"]
    assert found.raw_class_names == []  # the annotation names are already readable
    assert _rows(found) == [
        ("train/---QUuC4vJs_000003_000013.mp4", "air drumming", "train", "", None),
        ("train/abseiling/--07WQ2iBlw_000001_000011.mp4", "abseiling", "train", "", None),
        ("train/-8YAEz1PENs_000015_000025.mp4", "passing American football (in game)", "train", NOT_ON_DISK, None),
        ("train/raw_dl_0001.mp4", "skiing (not slalom or crosscountry)", "train", "", (1.0, 2.0)),
        ("annotations/train.csv line 6", None, "train", "annotations/train.csv line 6: expected a label, a "
                                                         "youtube_id and whole seconds time_start < time_end", None),
        ("val/0wR5jVB-WPk_000417_000427.mp4", "skiing crosscountry", "val", "", None)]
    assert NOT_ON_DISK == "listed in the annotations, not on disk"
    assert "test.csv: no label column" in caplog.text and "not 400" in caplog.text


def test_kinetics_400_classes_follow_the_evl_authors_order(tmp_path, clips):
    """The annotation names sorted as Python sorts them: the EVL authors' class-index order (their list is
    the 400 names sorted), so their checkpoints' labels match; a --classes file overrides it."""
    shuffled = EVL_K400_EXCERPT[::-1][1::2] + EVL_K400_EXCERPT[::-1][::2]
    lines = "".join(f'"{name}",vid{i:08d},0,10,train,0\n' for i, name in enumerate(shuffled))
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    root = _put(tmp_path / "k400", {"annotations/train.csv": header + lines,
                                    "train/vid00000000_000000_000010.mp4": clips[".mp4"]})
    found = read_dataset("kinetics400", root)
    assert found.class_names == EVL_K400_EXCERPT
    assert [found.class_names[e.label] for e in found.entries] == shuffled
    (tmp_path / "mine.json").write_text(json.dumps(EVL_K400_EXCERPT[::-1] + ["zumba"]))
    mine = read_dataset("kinetics400", root, classes=read_classes(tmp_path / "mine.json"))
    assert mine.class_names == EVL_K400_EXCERPT[::-1] + ["zumba"]
    assert [mine.class_names[e.label] for e in mine.entries] == shuffled
    (tmp_path / "short.txt").write_text("tying tie\n")
    with pytest.raises(DatasetError, match=r"--classes does not name 9 class\(es\) of the dataset: hurdling, "):
        read_dataset("kinetics400", root, classes=read_classes(tmp_path / "short.txt"))


def ucf101_tree(root: Path, clips: dict[str, bytes]) -> Path:
    """UCF-101/ and ucfTrainTestlist/ as the two official archives unpack (CRLF line endings)."""
    avi = clips[".avi"]
    return _put(root, {
        "ucfTrainTestlist/classInd.txt": "1 ApplyEyeMakeup\r\n2 YoYo\r\n",
        "ucfTrainTestlist/trainlist01.txt": "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\r\n"
                                            "YoYo/v_YoYo_g08_c01.avi 2\r\nYoYo/v_YoYo_g09_c01.avi 3\r\n",
        "ucfTrainTestlist/testlist01.txt": "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\r\n"
                                           "YoYo/v_YoYo_g01_c01.avi\r\nHulaHoop/v_HulaHoop_g01_c01.avi\r\n",
        "ucfTrainTestlist/trainlist02.txt": "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi 1\r\n",
        "ucfTrainTestlist/testlist02.txt": "YoYo/v_YoYo_g08_c01.avi\r\n",
        "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi": avi,
        "UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": avi,
        "UCF-101/YoYo/v_YoYo_g08_c01.avi": avi,
        "UCF-101/YoYo/v_YoYo_g09_c01.avi": avi,
    })


def test_ucf101_split_lists_with_readable_class_names(tmp_path, clips):
    root = ucf101_tree(tmp_path / "ucf", clips)
    found = read_dataset("ucf101", root)
    assert found.class_names == ["Apply Eye Makeup", "Yo Yo"] and found.raw_class_names == ["ApplyEyeMakeup", "YoYo"]
    assert _rows(found) == [
        ("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi", "Apply Eye Makeup", "train", "", None),
        ("UCF-101/YoYo/v_YoYo_g08_c01.avi", "Yo Yo", "train", "", None),
        ("UCF-101/YoYo/v_YoYo_g09_c01.avi", None, "train",
         "trainlist01.txt line 3: expected 'Class/v_name.avi N', N in 1-2", None),
        ("UCF-101/ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi", "Apply Eye Makeup", "val", "", None),
        ("UCF-101/YoYo/v_YoYo_g01_c01.avi", "Yo Yo", "val", NOT_ON_DISK, None),
        ("UCF-101/HulaHoop/v_HulaHoop_g01_c01.avi", None, "val",
         "testlist01.txt line 3: expected 'Class/v_name.avi', its Class in classInd.txt", None)]
    assert [(e.path.split("/")[-1], e.split) for e in read_dataset("ucf101", root, fold=2).entries] == [
        ("v_ApplyEyeMakeup_g01_c01.avi", "train"), ("v_YoYo_g08_c01.avi", "val")]
    with pytest.raises(DatasetError, match="trainlist03.txt: annotation file not found"):
        read_dataset("ucf101", root, fold=3)
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 ApplyEyeMakeup\n3 YoYo\n")
    with pytest.raises(DatasetError, match="classInd.txt: line 2: expected '2 ClassName'"):
        read_dataset("ucf101", root)


def test_hmdb51_split_files_mark_train_test_and_unused(tmp_path, clips):
    avi = clips[".avi"]
    root = _put(tmp_path / "hmdb51", {
        "testTrainMulti_7030_splits/brush_hair_test_split1.txt":
            "April_09_brush_hair_u_nm_np1_ba_goo_0.avi 1 \nApril_09_brush_hair_u_nm_np1_ba_goo_1.avi 2 \n"
            "April_09_brush_hair_u_nm_np1_ba_goo_2.avi 0 \n",
        "testTrainMulti_7030_splits/cartwheel_test_split1.txt":
            "(Rolling)_Cartwheel_cartwheel_f_cm_np1_le_med_0.avi 2 \nno_mark_here.avi\n"
            "Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8.avi 1 \n",
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi": avi,
        "brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi": avi,
        "cartwheel/(Rolling)_Cartwheel_cartwheel_f_cm_np1_le_med_0.avi": avi,
    })
    found = read_dataset("hmdb51", root)
    assert found.class_names == ["brush hair", "cartwheel"] and found.raw_class_names == ["brush_hair", "cartwheel"]
    assert _rows(found) == [
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_0.avi", "brush hair", "train", "", None),
        ("brush_hair/April_09_brush_hair_u_nm_np1_ba_goo_1.avi", "brush hair", "val", "", None),
        ("cartwheel/(Rolling)_Cartwheel_cartwheel_f_cm_np1_le_med_0.avi", "cartwheel", "val", "", None),
        ("cartwheel/no_mark_here.avi", None, "val", "cartwheel_test_split1.txt line 2: expected 'name.avi 0|1|2'",
         None),
        ("cartwheel/Acrobacias_de_un_fenomeno_cartwheel_f_cm_np1_ba_bad_8.avi", "cartwheel", "train", NOT_ON_DISK,
         None)]
    with pytest.raises(DatasetError, match="no <class>_test_split2.txt files"):
        read_dataset("hmdb51", root, fold=2)


def test_ssv2_templates_without_brackets_are_the_classes(tmp_path, clips):
    def item(video_id: str, template: str) -> dict:
        return {"id": video_id, "label": template.replace("[something]", "a cup").lower(), "template": template,
                "placeholders": ["a cup"]}

    webm = clips[".webm"]
    train = [item("78687", "Holding [something] next to [something]"), item("42326", "Pushing [something] from left "
                                                                                   "to right"),
             item("3", "Juggling [something]"), {"template": "Holding [something] next to [something]"}]
    root = _put(tmp_path / "ssv2", {
        "labels/labels.json": json.dumps({"Holding something next to something": "0",
                                          "Pushing something from left to right": "1"}, indent=4),
        "labels/train.json": json.dumps(train, indent=4),
        "labels/validation.json": json.dumps([item("24", "Pushing [something] from left to right")]),
        "labels/test.json": json.dumps([{"id": "1420"}]),
        "20bn-something-something-v2/78687.webm": webm, "20bn-something-something-v2/42326.webm": webm,
    })
    found = read_dataset("ssv2", root)
    assert found.class_names == ["Holding something next to something", "Pushing something from left to right"]
    assert _rows(found) == [
        ("20bn-something-something-v2/78687.webm", "Holding something next to something", "train", "", None),
        ("20bn-something-something-v2/42326.webm", "Pushing something from left to right", "train", "", None),
        ("20bn-something-something-v2/3.webm", None, "train",
         "train.json line 18 (item 3): template 'Juggling something' is not a class of labels.json", None),
        ("labels/train.json item 4", None, "train", "train.json line 26 (item 4): expected an id and a template",
         None),
        ("20bn-something-something-v2/24.webm", "Pushing something from left to right", "val", NOT_ON_DISK, None)]
    (root / "labels" / "validation.json").write_text('[{"id": "24",\n "template": "x"} {"id": "25"}]')
    with pytest.raises(DatasetError, match="validation.json: not valid JSON: expected ',' or ']' at line 2 column 19"):
        read_dataset("ssv2", root)


@pytest.mark.parametrize("name, fold, message", [
    ("kinetics400", 2, "kinetics400 has one official split; --fold is for ucf101 and hmdb51"),
    ("ucf101", 4, "--fold 4: ucf101 has the official splits 1, 2 and 3"),
    ("imagenet", None, "unknown dataset 'imagenet'"),
])
def test_options_a_dataset_cannot_take(tmp_path, name, fold, message):
    with pytest.raises(DatasetError, match=message):
        read_dataset(name, tmp_path, fold)


def test_missing_annotations_are_one_line(tmp_path):
    with pytest.raises(DatasetError, match="dataset folder not found"):
        read_dataset("ucf101", tmp_path / "nope")
    with pytest.raises(DatasetError, match="no annotations/train.csv, val.csv or test.csv"):
        read_dataset("kinetics700", tmp_path)
    with pytest.raises(DatasetError, match="labels.json: annotation file not found"):
        read_dataset("ssv2", tmp_path)
    _put(tmp_path, {"annotations/train.csv": "youtube_id,time_start\nabc,1\n"})
    with pytest.raises(DatasetError, match="train.csv: no label, time_end column"):
        read_dataset("kinetics600", tmp_path)


def test_a_kinetics_split_without_its_folder_is_left_out_but_keeps_its_classes(tmp_path, clips):
    """Class indices never depend on what was downloaded: only the train videos are here."""
    header = "label,youtube_id,time_start,time_end,split,is_cc\n"
    root = _put(tmp_path / "k700", {"annotations/train.csv": header + "zumba,aaaaaaaaaaa,0,10,train,0\n",
                                    "annotations/val.csv": header + "abseiling,bbbbbbbbbbb,0,10,val,0\n",
                                    "train/aaaaaaaaaaa_000000_000010.mp4": clips[".mp4"]})
    found = read_dataset("kinetics700", root)
    assert found.class_names == ["abseiling", "zumba"] and [(e.path, e.label) for e in found.entries] == [
        ("train/aaaaaaaaaaa_000000_000010.mp4", 1)]
    assert found.unreadable == [f"{root / 'val'}: no such folder; the 1 videos of val.csv are left out"]


TINY = ["--model", "EVL-Tiny", "--pretrained", "none", "--frames", "4", "--stride", "2", "--blocks", "1",
        "--workers", "0", "--shard-size", "2"]


def test_extracting_ucf101_counts_the_videos_not_on_disk_apart(tmp_path, clips):
    root = ucf101_tree(tmp_path / "ucf", clips)
    out = tmp_path / "ucf101_s1.zarr"
    result = CliRunner().invoke(main, ["extract", "--dataset", "ucf101", "--root", str(root), "--fold", "1",
                                       "--out", str(out), *TINY])
    assert result.exit_code == 0, result.output
    assert "3 done, 3 failed (1 listed in the annotations, not on disk), 0 skipped" in result.output
    described = info(InfoConfig(out))
    assert described["not_on_disk"] == 1 and described["status"]["failed"] == 3
    assert described["classes"] == ["Apply Eye Makeup", "Yo Yo"]
    assert "missing:    1 failed videos are listed in the annotations, not on disk" in format_info(described)
    with FeatureStore(out) as store:
        assert store.attrs["raw_class_names"] == ["ApplyEyeMakeup", "YoYo"]
        assert list(store.column("label")) == [0, 1, -1, 0, 1, -1] and list(store.column("split"))[3:] == ["val"] * 3
    again = CliRunner().invoke(main, ["extract", "--dataset", "ucf101", "--root", str(root), "--out", str(out), *TINY])
    assert again.exit_code == 0 and "0 done, 0 failed, 6 skipped" in again.output, again.output


def test_a_raw_kinetics_download_is_sampled_in_its_segment(tmp_path, clips):
    out = tmp_path / "k400.zarr"
    summary = extract(ExtractConfig(out=out, dataset="kinetics400", root=kinetics_tree(tmp_path / "k400", clips),
                                    model="EVL-Tiny", pretrained="none", frames=4, stride=2, blocks=1, workers=0))
    assert (summary.done, summary.failed, summary.not_on_disk) == (4, 2, 1)
    with FeatureStore(out) as store:
        frames = dict(zip(store.column("path"), store.column("frames")))
    assert frames["train/raw_dl_0001.mp4"] == 12  # 1-2 s at 12 fps, of 36 frames
    assert frames["train/---QUuC4vJs_000003_000013.mp4"] == 36
