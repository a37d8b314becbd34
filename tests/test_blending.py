"""ViFi-CLIP's mixup and cutmix: one mix for every frame of a clip, targets mixed by the same share."""
import numpy as np
import pytest
import torch

from evl_cache.tuning.blending import Blending, cut_box, cut_mixed


def batch(size=4, frames=3):
    pixels = torch.randn(size, frames, 3, 8, 10, generator=torch.Generator().manual_seed(0))
    return pixels, torch.tensor([0, 1, 2, 1][:size])


def test_targets_are_smoothed_one_hot_vectors():
    targets = Blending(classes=4, label_smoothing=0.1).targets(torch.tensor([2, 0]))
    assert targets.tolist()[0] == pytest.approx([0.025, 0.025, 0.925, 0.025])
    torch.testing.assert_close(targets.sum(1), torch.ones(2))
    assert Blending(classes=3, label_smoothing=0.0).targets(torch.tensor([1])).tolist() == [[0.0, 1.0, 0.0]]


def test_mixup_blends_every_frame_of_a_clip_with_one_share():
    pixels, labels = batch()
    blending = Blending(classes=3, mixup=0.8, cutmix=0.0)
    mixed, targets = blending(pixels, labels, np.random.default_rng(3))
    replay = np.random.default_rng(3)
    order = torch.from_numpy(replay.permutation(4))
    lam = float(replay.beta(0.8, 0.8))
    torch.testing.assert_close(mixed, lam * pixels + (1 - lam) * pixels[order])
    torch.testing.assert_close(targets, lam * blending.targets(labels) + (1 - lam) * blending.targets(labels)[order])
    assert 0 < lam < 1 and not torch.equal(order, torch.arange(4))


def test_cutmix_pastes_the_same_box_in_every_frame_and_mixes_targets_by_its_area():
    pixels, labels = batch()
    blending = Blending(classes=3, label_smoothing=0.0, mixup=0.0, cutmix=1.0)
    seed = next(seed for seed in range(50) if (blending(pixels, labels, np.random.default_rng(seed))[0] != pixels).any())
    mixed, targets = blending(pixels, labels, np.random.default_rng(seed))  # a draw whose box is not empty
    changed = (mixed != pixels).any(0).any(0).any(0)  # [H, W]: pixels changed in any clip, frame or channel
    rows, cols = torch.nonzero(changed, as_tuple=True)
    y1, y2, x1, x2 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    assert changed[y1:y2, x1:x2].all() and changed.sum() == (y2 - y1) * (x2 - x1)  # one box
    for clip in range(4):  # every frame of a clip shows the same other clip inside the box
        inside = mixed[clip, :, :, y1:y2, x1:x2]
        sources = [other for other in range(4) if torch.equal(inside, pixels[other, :, :, y1:y2, x1:x2])]
        assert len(sources) == 1
    share = 1 - (y2 - y1) * (x2 - x1) / 80
    own = targets[torch.arange(4), labels]
    assert (own >= share - 1e-6).all() and torch.allclose(targets.sum(1), torch.ones(4))


def test_the_switch_and_the_alphas_choose_the_kind_and_zero_switches_off():
    pixels, labels = batch()
    unmixed, targets = Blending(classes=3, mixup=0.0, cutmix=0.0)(pixels, labels, np.random.default_rng(0))
    assert unmixed is pixels and torch.equal(targets, Blending(classes=3).targets(labels))
    for switch, kind in ((1.0, "cutmix"), (0.0, "mixup")):
        mixed, _ = Blending(classes=3, switch_prob=switch)(pixels, labels, np.random.default_rng(1))
        replay = np.random.default_rng(1)
        order = torch.from_numpy(replay.permutation(4))
        replay.random()  # the switch's draw
        if kind == "cutmix":
            expected, _ = cut_mixed(pixels, order, float(replay.beta(1.0, 1.0)), replay)
        else:
            lam = float(replay.beta(0.8, 0.8))
            expected = lam * pixels + (1 - lam) * pixels[order]
        torch.testing.assert_close(mixed, expected, rtol=0, atol=0)
        again, _ = Blending(classes=3, switch_prob=switch)(pixels, labels, np.random.default_rng(1))
        assert torch.equal(mixed, again)


def test_cut_box_stays_in_the_frame_and_shrinks_with_lam():
    rng = np.random.default_rng(0)
    for lam in (0.0, 0.3, 0.9, 1.0):
        y1, y2, x1, x2 = cut_box(8, 10, lam, rng)
        assert 0 <= y1 <= y2 <= 8 and 0 <= x1 <= x2 <= 10
        assert (y2 - y1) <= int(8 * np.sqrt(1 - lam)) and (x2 - x1) <= int(10 * np.sqrt(1 - lam))
