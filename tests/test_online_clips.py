"""Clips decoded online for fine-tuning: ViFi-CLIP's segment draw per (seed, epoch, video), the same with any
number of workers; failures give blank clips weighted 0; evaluation views are extraction's."""
import numpy as np
import torch

from evl_cache.cache.dataset import EpochBatches
from evl_cache.tuning.online_clips import (
    Augmentation,
    TrainingClips,
    clip_seed,
    collate_clips,
    evaluation_loader,
    evaluation_spec,
    training_loader,
)
from evl_cache.video.clips import read_video_clips
from evl_cache.video.find import VideoEntry, VideoList, find_videos
from evl_cache.video.sampling import vifi_random_indices
from evl_cache.video.synthetic import write_video

PLAIN = Augmentation(flip=False, color_jitter=0.0, gray_scale=0.0)


def shaded_video(folder, frames=24):
    """Frame i is grey level 10 i all over: any crop of it still says which frame it is."""
    shades = np.repeat(np.arange(frames, dtype=np.uint8)[:, None, None, None] * 10, 3, axis=3)
    write_video(folder / "train" / "a" / "shaded.mp4", np.broadcast_to(shades, (frames, 40, 52, 3)).copy())
    return VideoList(folder, [VideoEntry("train/a/shaded.mp4", 0, "train")], ["a"])


def test_a_training_clip_is_vifi_clips_segment_draw_seeded_by_seed_epoch_and_video(tmp_path):
    videos = shaded_video(tmp_path)
    clips = TrainingClips(videos, np.array([0]), np.array([0]), 4, 32, seed=7, augmentation=PLAIN)
    drawn = set()
    for epoch in range(4):
        item = clips[(0, epoch)]
        assert item["error"] == "" and item["clip"].shape == (4, 3, 32, 32) and item["video"] == 0
        frames = [round(float(frame.float().mean()) / 10) for frame in item["clip"]]
        rng = np.random.default_rng(clip_seed(7, epoch, 0))
        rng.integers(2**63)  # the augmentation's seed is drawn first
        assert frames == vifi_random_indices(24, 4, rng)  # one uniform frame in each of 4 segments of 6
        assert torch.equal(item["clip"], clips[(0, epoch)]["clip"])
        drawn.add(tuple(frames))
    assert len(drawn) > 1  # each epoch draws again


def test_training_batches_are_the_same_with_any_number_of_workers(sample_videos):
    videos = find_videos(sample_videos)
    train = np.array([i for i, e in enumerate(videos.entries) if e.split == "train"])
    clips = TrainingClips(videos, train, np.array([videos.entries[i].label for i in train]), 3, 32, seed=0,
                          augmentation=Augmentation())
    batches = {}
    for workers in (0, 2):
        sampler = EpochBatches(len(train), 5, seed=0)
        loader = training_loader(clips, sampler, workers)
        sampler.set_epoch(1)
        batches[workers] = list(loader)
    assert [len(b["clips"]) for b in batches[0]] == [5, 5, 2]
    for plain, parallel in zip(batches[0], batches[2]):
        assert torch.equal(plain["clips"], parallel["clips"]) and torch.equal(plain["labels"], parallel["labels"])
        assert plain["decoded"].tolist() == [1.0] * len(plain["clips"])


def test_a_video_that_fails_gives_a_blank_clip_weighted_zero(tmp_path):
    videos = shaded_video(tmp_path)
    (tmp_path / "train" / "a" / "broken.mp4").write_bytes(b"not a video")
    videos.entries += [VideoEntry("train/a/broken.mp4", 0, "train"), VideoEntry("gone.mp4", 0, "train", "not on disk")]
    clips = TrainingClips(videos, np.array([0, 1, 2]), np.array([0, 0, 0]), 4, 32, seed=0, augmentation=PLAIN)
    broken, gone = clips[(1, 0)], clips[(2, 0)]
    assert broken["error"] and gone["error"] == "not on disk"
    assert not broken["clip"].any() and broken["clip"].shape == (4, 3, 32, 32)
    mixed = collate_clips([clips[(0, 0)], broken, gone])
    assert len(mixed["clips"]) == 1 and mixed["decoded"].tolist() == [1.0] and mixed["videos"].tolist() == [0]
    assert [video for video, _ in mixed["failed"]] == [1, 2]
    failed = collate_clips([broken, gone])
    assert len(failed["clips"]) == 1 and failed["decoded"].tolist() == [0.0]


def test_evaluation_views_are_extractions_vifi_views_for_held_out_training_videos(sample_videos):
    videos = find_videos(sample_videos)
    index = next(i for i, e in enumerate(videos.entries) if e.split == "train")
    spec = evaluation_spec(4, 32, 2, seed=0)
    (item,) = list(evaluation_loader(videos, np.array([index]), spec, 0, None))
    expected = read_video_clips(sample_videos / videos.entries[index].path, "val", index, spec)
    assert item.index == index and item.clips.shape == (2, 4, 3, 32, 32) and torch.equal(item.clips, expected.clips)
    assert spec.resize == 36 and spec.mode == "vifi"
