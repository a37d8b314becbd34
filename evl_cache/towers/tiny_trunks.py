"""Tiny timm trunks for the shipped test towers (`model_configs/EVL-Tiny-*.json`).

open_clip builds a timm-trunk tower from a timm model name alone, so a tiny tower of each family needs a
tiny timm model under its own name. Each entry below is one family's architecture (the arguments timm's
own definition of the full-size tower passes) at the size of `EVL-Tiny`: 32 px, 8-pixel patches (a 4 x 4
grid), width 64, 2 heads, 4 blocks. Registering them adds names to timm's registry, all starting with
`evl_tiny_`; nothing else of timm changes.
"""
from __future__ import annotations

from functools import partial

SIZE, PATCH, WIDTH, HEADS, DEPTH = 32, 8, 64, 2, 4
_SHAPE = dict(img_size=SIZE, patch_size=PATCH, embed_dim=WIDTH, num_heads=HEADS, depth=DEPTH)


def _trunks() -> dict[str, tuple[type, dict]]:
    """timm model name -> (timm class, its arguments)."""
    from timm.layers import LayerNorm
    from timm.models.eva import Eva
    from timm.models.vision_transformer import VisionTransformer

    return {
        # SigLIP 2 (vit_*_siglip_*): no class token, an attention-pool (MAP) head, tanh GELU
        "evl_tiny_siglip2_p8_32": (VisionTransformer, dict(class_token=False, global_pool="map",
                                                           act_layer="gelu_tanh")),
        # a ViT with a class token and 4 register tokens (vit_*_reg4_*), and q/k norm
        "evl_tiny_reg4_p8_32": (VisionTransformer, dict(class_token=True, reg_tokens=4, no_embed_class=True,
                                                        global_pool="token", qk_norm=True)),
        # EVA-02 CLIP (eva02_*_clip_*): separate q/k/v projections, RoPE, SwiGLU, scale norms
        "evl_tiny_eva02_p8_32": (Eva, dict(qkv_fused=False, mlp_ratio=4 * 2 / 3, swiglu_mlp=True, scale_mlp=True,
                                           scale_attn_inner=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                                           global_pool="token")),
        # Perception Encoder (vit_pe_core_*): class token, 2D RoPE ('xy' grid, offset 1), a norm before the
        # blocks, an attention-pool head
        "evl_tiny_pe_p8_32": (Eva, dict(mlp_ratio=4.0, global_pool="map", attn_type="rope",
                                        use_pre_transformer_norm=True, use_rot_pos_emb=True, ref_feat_shape=(4, 4),
                                        rope_grid_offset=1.0, rope_grid_indexing="xy", attn_pool_num_heads=HEADS,
                                        attn_pool_mlp_ratio=4.0, norm_layer=partial(LayerNorm, eps=1e-5))),
    }


def register_tiny_trunks() -> None:
    """Make timm know the tiny trunks' names (once; later calls do nothing)."""
    import timm
    from timm.models import build_model_with_cfg, register_model

    for name, (cls, args) in _trunks().items():
        if timm.is_model(name):
            continue

        def entry(pretrained: bool = False, name: str = name, cls: type = cls, args: dict = args, **kwargs):
            kwargs["pretrained_cfg"] = kwargs.get("pretrained_cfg") or {"architecture": name,
                                                                         "input_size": (3, SIZE, SIZE)}
            return build_model_with_cfg(cls, name, pretrained, **{**_SHAPE, **args, **kwargs})

        entry.__name__ = name
        entry.__module__ = __name__
        register_model(entry)
