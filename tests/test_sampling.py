"""Frame-index plans follow the authors' protocol (evl-model.md section 5)."""
import numpy as np
import pytest

from evl_cache.sampling import dense_eval_indices, dense_train_indices, plan_views, segment_indices


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
