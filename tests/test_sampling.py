"""Frame-index plans follow the authors' protocol (evl-model.md section 5)."""
import numpy as np
import pytest

from evl_cache.video.sampling import (
    dense_eval_indices,
    dense_train_indices,
    plan_views,
    segment_indices,
    view_seed,
    vifi_middle_indices,
    vifi_random_indices,
)


def test_dense_train_random_start_within_bounds():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(500):
        clip = dense_train_indices(300, 8, 16, rng)
        assert np.all(np.diff(clip) == 16)
        assert 0 <= clip[0] < 300 - 7 * 16
        starts.add(clip[0])
    assert min(starts) == 0 and max(starts) == 300 - 7 * 16 - 1  # the whole range [0, n - (T-1)s)


def test_dense_train_short_video_repeats_last_valid_index():
    # span (T-1)*s + 1 = 113 >= n = 50: indices i*s while < n, then the last valid one repeated
    assert dense_train_indices(50, 8, 16, np.random.default_rng(0)) == [0, 16, 32, 48, 48, 48, 48, 48]
    # n equal to the span is the same rule: start 0
    assert dense_train_indices(113, 8, 16, np.random.default_rng(0)) == list(range(0, 113, 16))


def test_dense_eval_views_spread_by_rounding():
    n, T, s = 250, 8, 16
    span = (T - 1) * s + 1
    views = dense_eval_indices(n, T, s, 3)
    assert [v[0] for v in views] == [0, round((n - span) / 2), n - span]
    assert views[2][-1] == n - 1
    assert dense_eval_indices(n, T, s, 1) == [[(n - span) // 2 + i * s for i in range(T)]]


def test_dense_eval_pads_short_video_with_last_frame():
    views = dense_eval_indices(40, 8, 16, 3)
    assert views == [[0, 16, 32, 39, 39, 39, 39, 39]] * 3


def test_segment_sampling_one_frame_per_segment():
    assert segment_indices(80, 8, 0.5) == [5, 15, 25, 35, 45, 55, 65, 75]
    rng = np.random.default_rng(1)
    for _ in range(100):
        clip = segment_indices(80, 8, None, rng)
        assert all(10 * i <= f < 10 * (i + 1) for i, f in enumerate(clip))
    assert segment_indices(3, 8, 0.5) == [int((i + 0.5) * 3 / 8) for i in range(8)]  # fewer frames than segments


def test_plan_views_by_split_and_seeded():
    val = plan_views(200, "val", "dense", 8, 16, 3, 4, seed=0, video_index=5)
    assert len(val) == 3 and not any(p.augment for p in val)
    train = plan_views(200, "train", "dense", 8, 16, 3, 4, seed=0, video_index=5)
    assert len(train) == 4
    assert train[0].frame_indices == tuple(dense_eval_indices(200, 8, 16, 1)[0]) and not train[0].augment
    assert all(p.augment for p in train[1:])
    again = plan_views(200, "train", "dense", 8, 16, 3, 4, seed=0, video_index=5)
    assert again == train  # the same plan however the work is split or resumed
    other = plan_views(200, "train", "dense", 8, 16, 3, 4, seed=0, video_index=6)
    assert [p.seed for p in other] != [p.seed for p in train]
    with pytest.raises(ValueError):
        plan_views(0, "val", "dense", 8, 16, 3, 1, seed=0, video_index=0)


def test_vifi_one_view_takes_the_middle_frame_of_each_segment():
    # ViFi-CLIP's test clip: segments of a = n / T frames, frame int(i a + a / 2) of each
    assert vifi_middle_indices(300, 16)[:4] == [9, 28, 46, 65]  # a = 18.75: 9.375, 28.125, 46.875, 65.625
    assert vifi_middle_indices(300, 16)[-1] == 290  # 15 * 18.75 + 9.375 = 290.625
    assert vifi_middle_indices(5, 8) == [0, 0, 1, 2, 2, 3, 4, 4]  # fewer frames than segments: repeats
    assert vifi_middle_indices(100, 3) == [16, 50, 83]
    assert vifi_middle_indices(8, 8) == list(range(8))


def test_vifi_several_views_draw_one_frame_in_each_whole_segment():
    rng = np.random.default_rng(0)
    seen = [set() for _ in range(8)]
    for _ in range(300):  # 100 frames, 8 segments of 100 // 8 = 12 frames; frames 96..99 are never drawn
        clip = vifi_random_indices(100, 8, rng)
        for i, frame in enumerate(clip):
            seen[i].add(frame)
    assert all(s == set(range(12 * i, 12 * i + 12)) for i, s in enumerate(seen))
    # fewer frames than segments: round(i * n / T), halves to even (5 / 8: 0, .625, 1.25, 1.875, 2.5, ...)
    assert vifi_random_indices(5, 8, rng) == [0, 1, 1, 2, 2, 3, 4, 4]
    assert vifi_random_indices(8, 8, rng) == list(range(8))


def test_vifi_plans_views_by_split_seeded_per_video_and_view():
    one = plan_views(200, "val", "vifi", 8, 16, 1, 1, seed=0, video_index=3)
    assert [p.frame_indices for p in one] == [tuple(vifi_middle_indices(200, 8))]
    four = plan_views(200, "val", "vifi", 8, 16, 4, 1, seed=0, video_index=3)
    assert len(four) == 4 and not any(p.augment for p in four)
    for v, plan in enumerate(four):  # each view its own seeded draw of the training rule
        assert plan.frame_indices == tuple(vifi_random_indices(200, 8, np.random.default_rng(view_seed(0, 3, v))))
    assert len({p.frame_indices for p in four}) == 4
    assert plan_views(200, "val", "vifi", 8, 16, 4, 1, seed=0, video_index=3) == four
    assert plan_views(200, "val", "vifi", 8, 16, 4, 1, seed=0, video_index=4) != four
    train = plan_views(200, "train", "vifi", 8, 16, 4, 3, seed=0, video_index=3)
    assert train[0].frame_indices == tuple(vifi_middle_indices(200, 8)) and not train[0].augment
    assert all(p.augment for p in train[1:]) and len(train) == 3
