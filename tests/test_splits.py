"""Which videos a fine-tuning run trains and validates on: splits, a hold-out, base-to-novel, few-shot."""
from pathlib import Path

import numpy as np
import pytest

from evl_cache.errors import DatasetError, EvlCacheError
from evl_cache.tuning.splits import few_shots, splits_fingerprint, video_splits
from evl_cache.video.find import VideoEntry, VideoList

CLASSES = ["a", "b", "c", "d"]


def videos(train_per_class=4, val_per_class=2, bad=()):
    entries = [VideoEntry(f"{split}/{name}/{i}.mp4", label, split, "not on disk" if (split, name, i) in bad else "")
               for split, count in (("train", train_per_class), ("val", val_per_class))
               for label, name in enumerate(CLASSES) for i in range(count)]
    return VideoList(Path("/data"), entries, CLASSES)


def test_train_and_val_splits_and_labels_in_class_order():
    found = video_splits(videos(bad={("train", "b", 0)}), None, None, 0.1, seed=0)
    entries = videos().entries
    assert found.class_names == CLASSES and found.novel_classes == [] and len(found.novel) == 0
    assert len(found.train) == 15 and len(found.val) == 8  # the video with an error is left out
    assert all(entries[i].split == "train" for i in found.train) and all(entries[i].split == "val" for i in found.val)
    assert [entries[i].label for i in found.train] == found.train_labels.tolist()
    assert found.counts() == {"train": 15, "val": 8}


def test_a_list_without_validation_videos_holds_out_a_seeded_share_per_class():
    only_train = videos(train_per_class=5, val_per_class=0)
    first = video_splits(only_train, None, None, 0.2, seed=0)
    assert len(first.val) == 4 and len(first.train) == 16 and not set(first.val) & set(first.train)
    assert sorted(first.val_labels.tolist()) == [0, 1, 2, 3]  # one of each class
    again, other = (video_splits(only_train, None, None, 0.2, seed=s) for s in (0, 1))
    assert again.val.tolist() == first.val.tolist() and other.val.tolist() != first.val.tolist()


def test_base_to_novel_scores_each_part_against_its_own_classes():
    found = video_splits(videos(), ["d", "b"], None, 0.1, seed=0)
    assert found.class_names == ["b", "d"] and found.novel_classes == ["a", "c"]  # in the list's order
    entries = videos().entries
    assert {CLASSES[entries[i].label] for i in found.train} == {"b", "d"}
    assert {CLASSES[entries[i].label] for i in found.novel} == {"a", "c"}
    assert found.train_labels.tolist() == [["b", "d"].index(CLASSES[entries[i].label]) for i in found.train]
    assert found.novel_labels.tolist() == [["a", "c"].index(CLASSES[entries[i].label]) for i in found.novel]
    assert found.counts() == {"train": 8, "val": 4, "val_novel": 4}
    with pytest.raises(EvlCacheError, match="1 base classes are not classes of the videos"):
        video_splits(videos(), ["b", "zebra"], None, 0.1, seed=0)
    with pytest.raises(EvlCacheError, match="none is left as novel"):
        video_splits(videos(), CLASSES, None, 0.1, seed=0)


def test_few_shot_draws_k_videos_per_class_with_the_seed():
    found = video_splits(videos(), None, 2, 0.1, seed=0)
    assert len(found.train) == 8 and np.bincount(found.train_labels).tolist() == [2, 2, 2, 2]
    assert video_splits(videos(), None, 2, 0.1, seed=0).train.tolist() == found.train.tolist()
    assert any(video_splits(videos(), None, 2, 0.1, seed=s).train.tolist() != found.train.tolist() for s in (1, 2, 3))
    assert len(found.val) == 8  # validation keeps every video
    with pytest.raises(DatasetError, match="--shots 5: class 0 has only 4 training videos"):
        few_shots(np.arange(16), np.repeat(np.arange(4), 4), 5, 0)


def test_the_fingerprint_follows_the_videos_in_their_roles():
    listed = videos()
    plain = splits_fingerprint(listed, video_splits(listed, None, None, 0.1, 0))
    assert plain == splits_fingerprint(listed, video_splits(listed, None, None, 0.1, 0))
    assert plain != splits_fingerprint(listed, video_splits(listed, None, 3, 0.1, 0))
    assert plain != splits_fingerprint(listed, video_splits(listed, ["a", "b"], None, 0.1, 0))
