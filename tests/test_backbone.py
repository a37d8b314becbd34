"""The frozen backbone captures exactly what evl-model.md sections 1-2 say, on tiny random models."""
import os
import subprocess
import sys

import pytest
import torch

import evl_cache.towers.backbone as backbone_module
from evl_cache.errors import BackboneError
from evl_cache.towers.backbone import FrozenBackbone, adjacent_maps, load_clip


@pytest.fixture(scope="module")
def tiny():
    clip, spec = load_clip("EVL-Tiny", "none")
    return clip, spec


def _pixels(batch=2, frames=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, frames, 3, size, size), generator=g, dtype=torch.uint8)


def _normalise(pixels, spec):
    x = pixels.flatten(0, 1).float() / 255
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return (x - mean) / std


def test_spec_describes_the_model(tiny):
    clip, spec = tiny
    assert spec.patch_grid == (4, 4) and spec.width == 64 and spec.layers == 4 and spec.heads == 2
    assert spec.quick_gelu and spec.image_size == 32 and spec.embed_dim == 32
    again, spec2 = load_clip("EVL-Tiny", "none")
    assert spec2.weights_sha256 == spec.weights_sha256  # random weights are seeded


def test_block_outputs_and_embeddings_equal_a_plain_forward(tiny):
    clip, spec = tiny
    backbone = FrozenBackbone(clip.visual, 2, spec.mean, spec.std)
    pixels = _pixels()
    out = backbone(pixels)
    x = _normalise(pixels, spec)
    visual = clip.visual
    with torch.no_grad():
        h = visual._embeds(x)
        blocks = []
        for block in visual.transformer.resblocks:
            h = block(h)
            blocks.append(h)
        embedding = clip.encode_image(x, normalize=False)
    for captured, expected in zip(out.block_outputs, blocks[-2:]):
        torch.testing.assert_close(captured.flatten(0, 1), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.embeddings.flatten(0, 1), embedding, rtol=0, atol=1e-6)
    assert out.block_outputs[0].shape == (2, 3, 17, 64)


def test_maps_follow_the_formula(tiny):
    clip, spec = tiny
    backbone = FrozenBackbone(clip.visual, 1, spec.mean, spec.std)
    pixels = _pixels(batch=1, frames=4)
    out = backbone(pixels)
    visual = clip.visual
    with torch.no_grad():
        h = visual._embeds(_normalise(pixels, spec))
        for block in visual.transformer.resblocks[:-1]:
            h = block(h)
        last = visual.transformer.resblocks[-1]
        y = last.ln_1(h)  # [T, L, C]
        C, H = spec.width, spec.heads
        D = C // H
        q = (y @ last.attn.in_proj_weight[:C].T + last.attn.in_proj_bias[:C]).view(4, 17, H, D)[:, 1:]
        k = (y @ last.attn.in_proj_weight[C:2 * C].T + last.attn.in_proj_bias[C:2 * C]).view(4, 17, H, D)[:, 1:]
    P = 16
    for t in range(1, 4):  # backward maps, t = 1..T-1, stored at t-1
        expected = torch.zeros(P, P)
        for head in range(H):
            expected += torch.softmax(q[t, :, head] @ k[t - 1, :, head].T / D ** 0.5, dim=-1) / H
        torch.testing.assert_close(out.maps_prev[0][0, t - 1], expected, rtol=0, atol=1e-6)
    for t in range(0, 3):  # forward maps, t = 0..T-2
        expected = sum(torch.softmax(q[t, :, hd] @ k[t + 1, :, hd].T / D ** 0.5, dim=-1) for hd in range(H)) / H
        torch.testing.assert_close(out.maps_next[0][0, t], expected, rtol=0, atol=1e-6)
    assert torch.allclose(out.maps_prev[0].sum(-1), torch.ones(1, 3, P))


def test_sequence_first_transformers_are_read_right(tiny):
    clip, spec = tiny
    pixels = _pixels()
    reference = FrozenBackbone(clip.visual, 2, spec.mean, spec.std)(pixels)
    seq_first, _ = load_clip("EVL-Tiny", "none")
    transformer = seq_first.visual.transformer
    transformer.batch_first = False
    for block in transformer.resblocks:
        block.attn.batch_first = False
    out = FrozenBackbone(seq_first.visual, 2, spec.mean, spec.std)(pixels)
    for a, b in zip(out.block_outputs + out.maps_prev, reference.block_outputs + reference.maps_prev):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_local_weights_file_and_hash(tiny, tmp_path):
    clip, spec = tiny
    path = tmp_path / "weights.pt"
    torch.save(clip.state_dict(), path)
    loaded, file_spec = load_clip("EVL-Tiny", str(path), seed=123)
    assert file_spec.weights_sha256 != spec.weights_sha256  # the file's own hash
    for a, b in zip(loaded.state_dict().values(), clip.state_dict().values()):
        assert torch.equal(a, b)
    legacy = tmp_path / "legacy.pt"  # torch's pre-1.6 format, which open_clip reads and mmap cannot
    torch.save({"state_dict": clip.state_dict()}, legacy, _use_new_zipfile_serialization=False)
    loaded, _ = load_clip("EVL-Tiny", str(legacy), seed=123)
    for a, b in zip(loaded.state_dict().values(), clip.state_dict().values()):
        assert torch.equal(a, b)


def test_model_config_json_path(tmp_path):
    import json

    from evl_cache.towers.backbone import MODEL_CONFIG_DIR
    config = json.loads((MODEL_CONFIG_DIR / "EVL-Tiny.json").read_text())
    config["vision_cfg"]["layers"] = 2
    path = tmp_path / "MyTiny.json"
    path.write_text(json.dumps(config))
    _, spec = load_clip(str(path), "none")
    assert spec.layers == 2


def test_bad_names_and_tags_are_one_line_errors():
    with pytest.raises(BackboneError, match="unknown open_clip model"):
        load_clip("No-Such-Model", "none")
    with pytest.raises(BackboneError, match="neither a file nor an open_clip tag"):
        load_clip("EVL-Tiny", "no-such-tag")
    with pytest.raises(BackboneError, match="not in 0..4"):
        clip, spec = load_clip("EVL-Tiny", "none")
        FrozenBackbone(clip.visual, 5, spec.mean, spec.std)


def test_missing_download_says_what_to_pass():
    code = ("from evl_cache.towers.backbone import load_clip\n"
            "from evl_cache.errors import BackboneError\n"
            "try:\n    load_clip('ViT-B-16', 'openai')\n"
            "except BackboneError as e:\n    print('ERROR', e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert "ERROR could not download open_clip weights 'openai'" in result.stdout
    assert "--pretrained /path/to/weights" in result.stdout and "--pretrained none" in result.stdout


def test_maps_are_float32_under_autocast_and_do_not_overflow():
    """Under float16 autocast (as extraction runs on CUDA) q . k stays in float32: the maps equal those
    computed without autocast, and logits beyond float16's range give finite rows, not NaN."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 16, 2, 8, generator=g), torch.randn(2, 3, 16, 2, 8, generator=g)
    reference = adjacent_maps(q, k)
    with torch.autocast("cpu", dtype=torch.float16):
        maps = adjacent_maps(q.half(), k.half())
        large = adjacent_maps(300 * q.half(), 300 * k.half())  # |q . k| up to about 1e6: inf in float16
    for got, want in zip(maps, reference):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)  # q and k rounded to float16, nothing else
    for got in large:
        assert torch.isfinite(got).all() and torch.allclose(got.sum(-1), torch.ones(()))


def test_the_captured_queries_and_keys_are_float32_under_autocast(tiny, monkeypatch):
    clip, spec = tiny
    backbone = FrozenBackbone(clip.visual, 1, spec.mean, spec.std)
    captured = []
    monkeypatch.setattr(backbone_module, "adjacent_maps",
                        lambda q, k, scale: captured.append((q.dtype, k.dtype)) or adjacent_maps(q, k, scale))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = backbone(_pixels())
    assert captured == [(torch.float32, torch.float32)] and out.maps_prev[0].dtype == torch.float32


def test_building_a_model_leaves_the_cuda_generators_alone(monkeypatch):
    """Random weights come from the CPU generator, seeded and then restored; re-seeding CUDA's (as
    torch.manual_seed does) would take dropout on a GPU out of --seed's hands (the text heads build a
    CLIP model after train seeds)."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: seeded.append(seed))
    before = torch.get_rng_state()
    load_clip("EVL-Tiny", "none", seed=5)
    assert seeded == [] and torch.get_rng_state().equal(before)
