"""The tiny timm trunks of the shipped test towers have their families' architecture, at EVL-Tiny's size."""
import timm
import torch
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer

from evl_cache.towers.tiny_trunks import register_tiny_trunks


def _trunk(name: str, **kwargs):
    register_tiny_trunks()
    return timm.create_model(name, pretrained=False, **kwargs)


def test_registering_twice_changes_nothing():
    register_tiny_trunks()
    names = set(timm.list_models("evl_tiny_*"))
    register_tiny_trunks()
    assert set(timm.list_models("evl_tiny_*")) == names == {"evl_tiny_siglip2_p8_32", "evl_tiny_reg4_p8_32",
                                                            "evl_tiny_eva02_p8_32", "evl_tiny_pe_p8_32"}


def test_each_trunk_has_its_familys_tokens_attention_and_head():
    siglip = _trunk("evl_tiny_siglip2_p8_32", num_classes=0, global_pool="map")
    assert type(siglip) is VisionTransformer and siglip.num_prefix_tokens == 0 and siglip.attn_pool is not None
    registers = _trunk("evl_tiny_reg4_p8_32")
    assert registers.num_prefix_tokens == 5 and registers.has_class_token
    assert not isinstance(registers.blocks[0].attn.q_norm, torch.nn.Identity)
    eva02 = _trunk("evl_tiny_eva02_p8_32")
    assert type(eva02) is Eva and eva02.rope is not None and type(eva02.blocks[0].attn) is EvaAttention
    assert eva02.blocks[0].attn.qkv is None  # EVA-02 CLIP: separate q, k and v projections
    pe = _trunk("evl_tiny_pe_p8_32")
    assert type(pe) is Eva and pe.rope is not None and type(pe.blocks[0].attn) is AttentionRope
    assert pe.attn_pool is not None and pe.num_prefix_tokens == 1
    for trunk in (siglip, registers, eva02, pe):
        assert trunk.patch_embed.grid_size == (4, 4) and trunk.embed_dim == 64 and len(trunk.blocks) == 4
        assert sum(p.numel() for p in trunk.parameters()) < 500_000
