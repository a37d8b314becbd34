"""Every family of image tower, on the shipped tiny configs (random weights): what the cache takes from
the tower equals what the tower itself computes.

- block outputs: the cached tokens equal forward hooks on the tower's blocks (prefix tokens and patches);
- maps: softmax(q k^T * scale) of the block's attention module, q and k recomputed here from the module's
  own weights (and the block's RoPE, by timm's function), patch tokens only, heads averaged;
- the q and k the cache takes are the attention's own: within a frame they give the very probabilities
  the module computes;
- embeddings: `encode_image`.
"""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from evl_cache.errors import BackboneError
from evl_cache.towers.backbone import FrozenBackbone, load_clip, model_geometry
from evl_cache.towers.families import QueryKeyTap, tower_layout

# tiny config -> (family, prefix tokens); the grid is 4 x 4 in each
TOWERS = {"EVL-Tiny": ("openclip", 1), "EVL-Tiny-SL2": ("timm-vit", 0), "EVL-Tiny-Reg": ("timm-vit", 5),
          "EVL-Tiny-EVA02": ("timm-eva", 1), "EVL-Tiny-PE": ("timm-eva", 1)}
PATCHES, FRAMES = 16, 3


@pytest.fixture(scope="module", params=list(TOWERS))
def tower(request):
    clip, spec = load_clip(request.param, "none")
    return request.param, clip, spec


def _pixels(spec, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (batch, FRAMES, 3, spec.image_size, spec.image_size), generator=g,
                           dtype=torch.uint8)
    x = pixels.flatten(0, 1).float() / 255
    return pixels, (x - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def _blocks(clip):
    """The tower's transformer blocks, where each family keeps them."""
    visual = clip.visual
    return list(visual.transformer.resblocks) if hasattr(visual, "transformer") else list(visual.trunk.blocks)


def _run_with_hooks(clip, x):
    """encode_image(x) with hooks of this test's own: each block's output and its attention's inputs."""
    outputs, inputs, handles = [], [], []
    for block in _blocks(clip):
        handles.append(block.register_forward_hook(lambda m, a, out: outputs.append(out)))
        handles.append(block.attn.register_forward_pre_hook(lambda m, a, kw: inputs.append((a, kw)),
                                                            with_kwargs=True))
    with torch.no_grad():
        embedding = clip.encode_image(x)
    for handle in handles:
        handle.remove()
    return outputs, inputs, embedding


def _module_q_k(attn, args, kwargs):
    """q and k [B, H, N, D] and the scale, from the attention module's weights, as each kind forms them."""
    from timm.layers import apply_rot_embed_cat

    x = args[0]
    if isinstance(attn, torch.nn.MultiheadAttention):  # open_clip: in_proj of ln_1(x), batch-first here
        width, heads = attn.embed_dim, attn.num_heads
        qk = F.linear(x, attn.in_proj_weight[:2 * width], attn.in_proj_bias[:2 * width])
        q, k = qk.view(*x.shape[:2], 2, heads, width // heads).permute(2, 0, 3, 1, 4)
        return q, k, (width // heads) ** -0.5
    batch, tokens, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    if attn.qkv is not None:
        bias = (torch.cat([attn.q_bias, attn.k_bias, attn.v_bias]) if getattr(attn, "q_bias", None) is not None
                else attn.qkv.bias)
        q, k, _ = F.linear(x, attn.qkv.weight, bias).view(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    else:
        q = attn.q_proj(x).view(batch, tokens, heads, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(batch, tokens, heads, head_dim).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    rope = kwargs.get("rope")
    if rope is not None:
        n = attn.num_prefix_tokens
        q, k = (torch.cat([t[:, :, :n], apply_rot_embed_cat(t[:, :, n:], rope, half=attn.rotate_half)], dim=2)
                for t in (q, k))
    return q, k, attn.scale


def test_the_spec_names_the_family_and_its_prefix_tokens(tower):
    name, clip, spec = tower
    assert (spec.family, spec.prefix_tokens) == TOWERS[name]
    assert spec.patch_grid == (4, 4) and spec.width == 64 and spec.heads == 2 and spec.layers == 4
    assert model_geometry(name) == {"width": 64, "layers": 4, "patch_grid": (4, 4), "embed_dim": spec.embed_dim,
                                    "image_size": 32, "heads": 2, "family": spec.family,
                                    "prefix_tokens": spec.prefix_tokens}


def test_cached_tokens_and_embeddings_equal_the_towers_own(tower):
    name, clip, spec = tower
    pixels, x = _pixels(spec)
    out = FrozenBackbone(clip.visual, 2, spec.mean, spec.std, name)(pixels)
    outputs, _, embedding = _run_with_hooks(clip, x)
    tokens = spec.prefix_tokens + PATCHES
    for captured, expected in zip(out.block_outputs, outputs[-2:]):
        assert captured.shape == (2, FRAMES, tokens, 64) and expected.shape[1] == tokens
        torch.testing.assert_close(captured.flatten(0, 1), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.embeddings.flatten(0, 1), embedding, rtol=0, atol=1e-6)
    assert out.embeddings.shape == (2, FRAMES, spec.embed_dim)


def test_maps_are_the_softmax_of_the_attention_modules_q_and_k(tower):
    name, clip, spec = tower
    pixels, x = _pixels(spec, batch=1)
    out = FrozenBackbone(clip.visual, 1, spec.mean, spec.std, name)(pixels)
    _, inputs, _ = _run_with_hooks(clip, x)
    args, kwargs = inputs[-1]
    with torch.no_grad():
        q, k, scale = _module_q_k(_blocks(clip)[-1].attn, args, kwargs)
    q, k = q[:, :, spec.prefix_tokens:], k[:, :, spec.prefix_tokens:]  # patch tokens: [T, H, P, D]
    for t in range(1, FRAMES):
        expected = torch.softmax(q[t] @ k[t - 1].transpose(-1, -2) * scale, dim=-1).mean(0)
        torch.testing.assert_close(out.maps_prev[0][0, t - 1], expected, rtol=0, atol=1e-6)
    for t in range(FRAMES - 1):
        expected = torch.softmax(q[t] @ k[t + 1].transpose(-1, -2) * scale, dim=-1).mean(0)
        torch.testing.assert_close(out.maps_next[0][0, t], expected, rtol=0, atol=1e-6)


def _module_probabilities(clip, block, x):
    """The attention probabilities [B, H, N, N] the block's attention module computes itself."""
    seen = []
    if isinstance(block.attn, torch.nn.MultiheadAttention):  # open_clip asks for none: ask it on its input
        handle = block.ln_1.register_forward_hook(lambda m, a, y: seen.append(
            block.attn(y, y, y, need_weights=True, average_attn_weights=False)[1]))
    else:  # timm's unfused path: the softmax goes through attn_drop (an identity in eval mode)
        fused, block.attn.fused_attn = block.attn.fused_attn, False
        handle = block.attn.attn_drop.register_forward_hook(lambda m, a, probabilities: seen.append(probabilities))
    try:
        with torch.no_grad():
            clip.encode_image(x)
    finally:
        handle.remove()
        if not isinstance(block.attn, torch.nn.MultiheadAttention):
            block.attn.fused_attn = fused
    return seen[0]


def test_the_taken_q_and_k_are_the_ones_the_attention_uses(tower):
    """Within a frame, softmax(q k^T * scale) of the taken q and k is the module's own attention: after
    RoPE, with the module's scale, whichever kind of attention the block has."""
    name, clip, spec = tower
    _, x = _pixels(spec)
    layout = tower_layout(clip.visual, name)
    block = layout.blocks[-1]
    tap = QueryKeyTap(layout, block)
    with torch.no_grad():
        clip.encode_image(x)
    q, k = (t.transpose(1, 2) for t in tap.take())  # [B*T, H, N, D]
    ours = torch.softmax(q @ k.transpose(-1, -2) * tap.scale, dim=-1)
    torch.testing.assert_close(ours, _module_probabilities(clip, block, x), rtol=0, atol=1e-6)


def test_maps_stay_float32_and_exact_under_autocast():
    clip, spec = load_clip("EVL-Tiny-PE", "none")
    backbone = FrozenBackbone(clip.visual, 1, spec.mean, spec.std, "EVL-Tiny-PE")
    pixels, _ = _pixels(spec)
    reference = backbone(pixels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = backbone(pixels)
    assert out.maps_prev[0].dtype == torch.float32 and torch.isfinite(out.maps_prev[0]).all()
    torch.testing.assert_close(out.maps_prev[0], reference.maps_prev[0], rtol=0, atol=2e-2)  # bf16 q and k


@pytest.mark.parametrize("model, why", [
    ("RN50", "convolutional image tower"), ("convnext_base", "timm's ConvNeXt"), ("MobileCLIP-S1", "timm's FastVit"),
    ("MobileCLIP-B", "hybrid ViT"), ("ViTamin-B", "hybrid ViT"), ("swin_base_patch4_window7_224", "SwinTransformer")])
def test_convolutional_hybrid_and_windowed_towers_are_refused_in_one_line(model, why):
    for call in (lambda: load_clip(model, "none"), lambda: model_geometry(model)):
        with pytest.raises(BackboneError) as error:
            call()
        message = str(error.value)
        assert message.startswith(f"{model}: ") and why in message and "\n" not in message


@pytest.mark.parametrize("model, family, prefix, grid", [
    ("ViT-B-32-SigLIP2-256", "timm-vit", 0, (8, 8)), ("PE-Core-T-16-384", "timm-eva", 1, (24, 24)),
    ("EVA02-B-16", "timm-eva", 1, (14, 14)), ("ViT-B-16-quickgelu", "openclip", 1, (14, 14)),
    ("MobileCLIP2-L-14", "timm-vit", 1, (16, 16))])
def test_the_full_size_towers_of_each_family_are_read(model, family, prefix, grid):
    """The towers of the issue, as open_clip 3 configures them (built on the meta device: no weights)."""
    geometry = model_geometry(model)
    assert (geometry["family"], geometry["prefix_tokens"], geometry["patch_grid"]) == (family, prefix, grid)
