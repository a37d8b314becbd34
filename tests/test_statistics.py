"""The outlier tower: `--pretrained none+outliers` gives features with a trained CLIP's published
statistics (outlier channels in every token, high-norm sink tokens that draw the later blocks'
attention), deterministically; `tower_statistics` finds them, and finds none in random weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from evl_cache.errors import BackboneError
from evl_cache.towers.backbone import FrozenBackbone, load_clip
from evl_cache.towers.statistics import HIGH_NORM_RATIO, add_clip_statistics, split_pretrained, tower_statistics
from evl_cache.video.synthetic import moving_shape_frames


def _clips(size: int, count: int = 3) -> torch.Tensor:
    """uint8 clips [count, 6, 3, size, size] of a moving square (not what the edit measured on)."""
    rng = np.random.default_rng(0)
    return torch.stack([torch.from_numpy(moving_shape_frames(6, size, size, "square", (230, 200, 30), direction, rng))
                        .permute(0, 3, 1, 2) for direction in ("right", "up", "left")[:count]])


@pytest.fixture(scope="module")
def towers():
    """(plain features, outlier features, the edit, the outlier tower's sha256, the plain one's) of EVL-Tiny."""
    plain, spec = load_clip("EVL-Tiny", "none", seed=0)
    edited, edited_spec = load_clip("EVL-Tiny", "none+outliers", seed=0)
    reference, _ = load_clip("EVL-Tiny", "none", seed=0)
    edit = add_clip_statistics(reference.visual, seed=0)  # what load_clip did, to learn the channels and sinks
    clips = _clips(spec.image_size)
    outputs = [FrozenBackbone(clip.visual, 4, spec.mean, spec.std)(clips) for clip in (plain, edited)]
    return outputs[0], outputs[1], edit, edited_spec, spec


def test_outlier_channels_are_50_to_500x_the_median_in_every_ordinary_token(towers):
    plain, edited, edit, _, _ = towers
    assert edit.outlier_block == 0 and len(edit.channels) == 3  # EVL-Tiny's 4 blocks: from the first on
    for tokens in edited.block_outputs:
        stats = tower_statistics(tokens)
        assert stats["outlier_channels"] == sorted(edit.channels) and 50 <= stats["channel_spread"] <= 500
        flat = tokens.reshape(-1, tokens.shape[-1])
        ordinary = torch.ones(flat.shape[-1], dtype=torch.bool)
        ordinary[list(edit.channels)] = False
        norms = flat[:, ordinary].norm(dim=-1)
        usual = norms < HIGH_NORM_RATIO * norms.median()  # the sink tokens aside (10x the norm)
        ratio = flat[usual][:, list(edit.channels)].abs() / flat[usual][:, ordinary].abs().median(-1).values[:, None]
        assert ratio.min() >= 50 and ratio.max() <= 500
    for tokens in plain.block_outputs:
        stats = tower_statistics(tokens)
        assert stats["outlier_channels"] == [] and stats["channel_spread"] < 5 and stats["high_norm_share"] == 0


def test_sink_tokens_have_about_10x_the_norm_and_draw_the_later_blocks_attention(towers):
    plain, edited, edit, _, _ = towers
    sinks = [1 + s for s in edit.sinks]  # token positions (CLS first)
    assert len(edit.sinks) == 1 and edit.sink_block == 1  # 2 % of EVL-Tiny's 16 patches: at least one
    for block, (tokens, maps) in enumerate(zip(edited.block_outputs, edited.maps_prev)):
        stats = tower_statistics(tokens)
        ordinary = torch.ones(tokens.shape[-1], dtype=torch.bool)
        ordinary[list(edit.channels)] = False
        norms = tokens[..., ordinary].norm(dim=-1)  # [clips, frames, tokens]
        share = maps[..., list(edit.sinks)].sum(-1).mean()  # of each row's attention, on the sinks
        if block < edit.sink_block:
            assert stats["high_norm_share"] == 0 and share < 0.15
            continue
        assert stats["high_norm_share"] == pytest.approx(1 / 17)  # the sink among 17 tokens, in every frame
        assert 5 <= float(norms[..., sinks].min() / norms.median())
        assert float(norms[..., sinks].max() / norms.median()) <= 20
        if block > edit.sink_block:
            assert share > 0.4 and maps.amax(-1).mean() > 0.4
    assert max(m[..., list(edit.sinks)].sum(-1).mean() for m in plain.maps_prev) < 0.15


def test_the_edit_is_deterministic_and_recorded(towers):
    _, _, _, edited_spec, spec = towers
    again, again_spec = load_clip("EVL-Tiny", "none+outliers", seed=0)
    assert again_spec.weights_sha256 == edited_spec.weights_sha256 != spec.weights_sha256
    assert edited_spec.pretrained == "none+outliers"
    other, _ = load_clip("EVL-Tiny", "none+outliers", seed=1)
    assert not torch.equal(other.visual.transformer.resblocks[0].mlp.c_proj.bias,
                           again.visual.transformer.resblocks[0].mlp.c_proj.bias)


def test_split_pretrained(tmp_path):
    assert split_pretrained("none+outliers") == ("none", True)
    assert split_pretrained("openai+outliers") == ("openai", True)
    assert split_pretrained("none") == ("none", False)
    named = tmp_path / "weights+outliers"
    named.write_bytes(b"")
    assert split_pretrained(str(named)) == (str(named), False)  # a file of that name is a file


def test_the_statistics_are_refused_on_a_timm_tower():
    with pytest.raises(BackboneError, match="EVL-Tiny-SL2 is a timm-vit tower"):
        load_clip("EVL-Tiny-SL2", "none+outliers")
