"""ViFi-CLIP's model written out from its own tensors: the reference the ViFi-CLIP tests (import, zero-shot,
fine-tuning) hold evl-cache's towers to.

Checkpoints are made in ViFi-CLIP's layout (`model` -> `module.image_encoder.*`, `module.text_encoder.*`,
`module.logit_scale`, `module.prompt_learner.*`, beside a pickled config object of a class torch does not
allow), from a tiny open_clip model with every tensor random. The forward is ViFi-CLIP's: its image encoder
(OpenAI's ViT, QuickGELU, sequence-first attention), its text encoder on prompt embeddings, their deep
prompts ("bridge and prompt" models), and its logits.
"""
import open_clip
import torch
import torch.nn.functional as F

from evl_cache.towers.backbone import load_clip

TINY = "EVL-Tiny"  # vision: width 64, 2 heads, 4 blocks, patch 8, 32 px; text: width 32, 2 heads, 2 blocks
IMAGENET = dict(mean="0.485,0.456,0.406", std="0.229,0.224,0.225")


class CfgNode(dict):
    """Stands for ViFi-CLIP's yacs config: a dict subclass with attributes, pickled beside the weights."""

    def __init__(self, values):
        super().__init__(values)
        self.__dict__["frozen"] = True


def random_clip_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny open_clip CLIP's state dict with every tensor (LayerNorms, logit scale too) random."""
    clip, _ = load_clip(TINY, "none", seed=seed)
    generator = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=generator) for k, v in clip.state_dict().items()}


def vifi_layout(clip_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI/open_clip names -> ViFi-CLIP's DDP state dict names (the token embedding is not saved)."""
    state = {}
    for key, value in clip_state.items():
        if key.startswith("visual."):
            state["module.image_encoder." + key[len("visual."):]] = value
        elif key == "logit_scale":
            state["module.logit_scale"] = value
        elif key != "token_embedding.weight":
            state["module.text_encoder." + key] = value
    return state


def write_checkpoint(path, clip_state, context=None, ctx_init="a photo of a", extra=None):
    """A ViFi-CLIP checkpoint as its epoch_saving writes it; `context` adds prompt_learner.ctx."""
    model = vifi_layout(clip_state)
    width = clip_state["token_embedding.weight"].shape[1]
    if context is not None:
        model["module.prompt_learner.ctx"] = context
        model["module.prompt_learner.token_prefix"] = torch.zeros(3, 1, width)
        model["module.prompt_learner.token_suffix"] = torch.zeros(3, 77 - 1 - len(context), width)
    else:
        model["module.prompt_learner.complete_text_embeddings"] = torch.zeros(3, 77, width)
    model.update(extra or {})
    config = CfgNode({"TRAINER": CfgNode({"ViFi_CLIP": CfgNode({"CTX_INIT": ctx_init, "N_CTX_TEXT": 0})}),
                      "DATA": CfgNode({"NUM_FRAMES": 4})}) if ctx_init is not None else None
    checkpoint = {"model": model, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98)}]},
                  "lr_scheduler": {"t_initial": 10}, "max_accuracy": 12.5, "epoch": 9}
    if config is not None:
        checkpoint["config"] = config
    torch.save(checkpoint, path)
    return model


# --- ViFi-CLIP's forward, written out from its own tensors ----------------------------------------------

def _layer_norm(x, p, name):
    return F.layer_norm(x.float(), (x.shape[-1],), p[name + ".weight"], p[name + ".bias"])


def _block(x, p, prefix, heads, mask=None):
    """ResidualAttentionBlock on [L, N, D]: x + attn(ln_1 x); x + mlp(ln_2 x) with QuickGELU."""
    y = _layer_norm(x, p, prefix + "ln_1")
    attended, _ = F.multi_head_attention_forward(
        y, y, y, y.shape[-1], heads, p[prefix + "attn.in_proj_weight"], p[prefix + "attn.in_proj_bias"],
        None, None, False, 0.0, p[prefix + "attn.out_proj.weight"], p[prefix + "attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=mask)
    x = x + attended
    h = F.linear(_layer_norm(x, p, prefix + "ln_2"), p[prefix + "mlp.c_fc.weight"], p[prefix + "mlp.c_fc.bias"])
    return x + F.linear(h * torch.sigmoid(1.702 * h), p[prefix + "mlp.c_proj.weight"], p[prefix + "mlp.c_proj.bias"])


def _prompted(x, p, key, first):
    """ViFi-CLIP's deep prompts on [L, N, D]: before block `block` > 0, its tokens `key` (if the checkpoint
    has them) replace the previous ones: the last n (image, first=None) or positions 1..n (text)."""
    if key not in p:
        return x
    tokens = p[key].half().float().unsqueeze(1).expand(-1, x.shape[1], -1)  # ViFi-CLIP: VPT_shallow....half()
    if first is None:
        return torch.cat([x[:len(x) - len(tokens)], tokens])
    return torch.cat([x[:first], tokens, x[first + len(tokens):]])


def vifi_image_features(p, images, heads=2, layers=4, blocks_out=None):
    """image_encoder(images) of ViFi-CLIP: [N, 3, S, S] normalised -> [N, E]; with `blocks_out` (a list),
    each block's output [N, L, D] (prompt tokens included) is appended to it."""
    pre = "module.image_encoder."
    weight = p[pre + "conv1.weight"]
    x = F.conv2d(images, weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([p[pre + "class_embedding"].expand(len(x), 1, -1), x], dim=1) + p[pre + "positional_embedding"]
    if pre + "VPT" in p:  # visual prompts follow the patch tokens, before ln_pre
        x = torch.cat([x, p[pre + "VPT"].half().float().expand(len(x), -1, -1)], dim=1)
    x = _layer_norm(x, p, pre + "ln_pre").transpose(0, 1)
    for i in range(layers):
        if i > 0:
            x = _prompted(x, p, f"{pre}transformer.resblocks.{i}.VPT_shallow", None)
        x = _block(x, p, f"{pre}transformer.resblocks.{i}.", heads)
        if blocks_out is not None:
            blocks_out.append(x.transpose(0, 1))
    return _layer_norm(x.transpose(0, 1)[:, 0], p, pre + "ln_post") @ p[pre + "proj"]


def vifi_text_features(p, prompt_embeddings, token_ids, heads=2, layers=2):
    """text_encoder(prompts, tokenized_prompts) of ViFi-CLIP: the end-of-text token's projection."""
    pre = "module.text_encoder."
    length = prompt_embeddings.shape[1]
    mask = torch.full((length, length), float("-inf")).triu(1)
    x = (prompt_embeddings + p[pre + "positional_embedding"]).transpose(0, 1)
    for i in range(layers):
        if i > 0:
            x = _prompted(x, p, f"{pre}transformer.resblocks.{i}.VPT_shallow", 1)
        x = _block(x, p, f"{pre}transformer.resblocks.{i}.", heads, mask)
    x = _layer_norm(x.transpose(0, 1), p, pre + "ln_final")
    return x[torch.arange(len(x)), token_ids.argmax(-1)] @ p[pre + "text_projection"]


def vifi_prompt_embeddings(token_embedding, names, context=None, prefix="a photo of a"):
    """ViFi-CLIP's VLPromptLearner: "{prefix} {name}." embedded; with learned context, its first n
    tokens after the start token replaced by the context (names with underscores as spaces)."""
    tokenizer = open_clip.get_tokenizer(TINY)
    if context is None:
        ids = tokenizer([f"{prefix} {name}." for name in names])
        return F.embedding(ids, token_embedding), ids
    prefix = prefix if len(context) <= 4 else " ".join(["X"] * len(context))
    ids = tokenizer([f"{prefix} {name.replace('_', ' ')}." for name in names])
    embedded = F.embedding(ids, token_embedding)
    context = context.expand(len(names), -1, -1)
    return torch.cat([embedded[:, :1], context, embedded[:, 1 + context.shape[1]:]], dim=1), ids


def bridge_and_prompt(seed, context_tokens, vision_tokens=3, vision_depth=3):
    """A "bridge and prompt" model's deep prompts in ViFi-CLIP's layout (its VPT_shallow in text and image
    blocks 1..depth-1, image_encoder.VPT at the input) and its learned text context."""
    generator = torch.Generator().manual_seed(seed)
    extra = {"module.image_encoder.VPT": 0.5 * torch.randn(vision_tokens, 64, generator=generator)}
    for i in range(1, vision_depth):
        extra[f"module.image_encoder.transformer.resblocks.{i}.VPT_shallow"] = \
            0.5 * torch.randn(vision_tokens, 64, generator=generator)
    extra["module.text_encoder.transformer.resblocks.1.VPT_shallow"] = \
        0.5 * torch.randn(context_tokens, 32, generator=generator)
    return extra, 0.1 * torch.randn(context_tokens, 32, generator=generator)
