"""ViFi-CLIP's released models (Rasheed et al., CVPR 2023) as open_clip weights: `evl-cache import-vificlip`.

A ViFi-CLIP checkpoint is a `torch.save` dict whose `model` holds its DistributedDataParallel state dict
(`module.` prefix): the fine-tuned image tower under `image_encoder.`, the text tower under
`text_encoder.` (transformer, positional_embedding, ln_final, text_projection), both with the key names
of OpenAI's `clip` package, CLIP's `logit_scale`, and the prompt learner's tensors under
`prompt_learner.`. open_clip's CLIP models use OpenAI's names too, so the conversion strips the two
prefixes and loads the result strictly into the open_clip model (`ViT-B-16-quickgelu` for the released
models: OpenAI's CLIP uses QuickGELU). The token embedding, which ViFi-CLIP neither trains nor saves,
comes from the base CLIP weights. The written file is `{"state_dict": ..., "vifi_clip": ...}`: open_clip
(`--pretrained FILE`) reads the first and ignores the second, which records where the weights came from
and how ViFi-CLIP prompts its text tower:

- a fine-tuned model scores the prompt "{CTX_INIT} {name}." ("a photo of a {}." unless its config
  changed CTX_INIT); the file records the template, for `zeroshot --templates`;
- a text-prompted model (`prompt_learner.ctx`: n learned vectors in place of the first n tokens after
  the start token, at the text tower's input) keeps its vectors in the file, and `zeroshot` uses
  them, naming classes with underscores as spaces as ViFi-CLIP does;
- a "bridge and prompt" model (deep vision and language prompts: `image_encoder.VPT`,
  `image_encoder.transformer.resblocks.N.VPT_shallow`, `text_encoder.transformer.resblocks.N.VPT_shallow`)
  also has its prompt tokens in the file, under a third key, `prompts` (see `block_prompts`), rounded
  to float16 as ViFi-CLIP's forward rounds them; `load_clip` fixes them into the towers, so
  extraction, `predict` and `zeroshot` run the prompted towers. The cache holds each block's CLS and
  patch tokens, not the prompt tokens.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..config import option
from ..errors import BackboneError, CheckpointError, DownloadError, EvlCacheError
from .backbone import _register_model_name, load_clip, sha256_file
from .block_prompts import attach_image_prompts, attach_text_prompts, read_weights_file
from .checkpoint_files import load_checkpoint, load_exactly, model_state

log = logging.getLogger(__name__)

FROM_BASE = ("token_embedding.weight",)  # what ViFi-CLIP never saves
PROMPT_BUFFERS = ("prompt_learner.token_prefix", "prompt_learner.token_suffix",
                  "prompt_learner.complete_text_embeddings")  # token embeddings of its training class names
DEFAULT_CTX_INIT = "a photo of a"  # ViFi-CLIP's TRAINER.ViFi_CLIP.CTX_INIT default
CONTEXT_FROM_WORDS = 4  # ViFi-CLIP initialises at most this many context vectors from the CTX_INIT words
INPUT_VISION_PROMPT = "image_encoder.VPT"  # block 0's vision prompts
_BLOCK_PROMPT = re.compile(r"(image|text)_encoder\.transformer\.resblocks\.(\d+)\.VPT_shallow")


@dataclass
class VifiImportConfig:
    """Options of `evl-cache import-vificlip`."""
    checkpoint: Path = option(None, "ViFi-CLIP checkpoint (.pth)", argument=True)
    out: Path = option(None, "open_clip weights file to write (e.g. vifi_b16.pt)")
    base: str = option("openai", "CLIP weights for what the checkpoint lacks (the token embedding): openai "
                                 "(OpenAI's, downloaded by open_clip) or a local open_clip weights file")
    model: str = option("ViT-B-16-quickgelu", "open_clip model of the checkpoint's towers (a QuickGELU model; "
                                              "the released models are ViT-B-16-quickgelu)")


@dataclass
class VifiCheckpoint:
    """A ViFi-CLIP checkpoint, read: its CLIP weights in open_clip's names and how it prompts."""
    clip_state: dict[str, Tensor]
    text_context: Tensor | None      # [n, width] learned context vectors, or None
    context_prefix: str | None       # the words the context overwrites (None: placeholder words)
    prompt_template: str | None      # the prompt of a model without learned context
    block_prompts: dict[str, dict[int, Tensor]]  # "image"/"text" -> {block: [n, width]} (deep prompts)


@dataclass
class VifiImport:
    """What `import_vificlip` wrote."""
    out: Path
    prompt_template: str | None
    context_tokens: int
    block_prompts: dict[str, list[int]]  # tower -> the blocks its prompt tokens go into

    def line(self) -> str:
        prompts = (f"learned prompt context, {self.context_tokens} vectors (zeroshot uses them)"
                   if self.context_tokens else f"prompts {self.prompt_template!r} (pass it to zeroshot --templates)")
        deep = "".join(f"; {tower} prompt tokens in blocks {blocks[0]}-{blocks[-1]}"
                       for tower, blocks in self.block_prompts.items())
        return f"import-vificlip: wrote {self.out}; {prompts}{deep}"


def _saved_ctx_init(checkpoint: object) -> str | None:
    """TRAINER.ViFi_CLIP.CTX_INIT of the config ViFi-CLIP saves beside the weights, if it is there."""
    config = checkpoint.get("config") if isinstance(checkpoint, dict) else None
    trainer = config.get("TRAINER", {}).get("ViFi_CLIP", {}) if isinstance(config, dict) else {}
    ctx_init = trainer.get("CTX_INIT") if isinstance(trainer, dict) else None
    return ctx_init.replace("_", " ") if isinstance(ctx_init, str) else None


def read_vificlip(path: str | Path) -> VifiCheckpoint:
    """Read a ViFi-CLIP checkpoint, refusing what cannot be converted exactly (one-line reasons)."""
    checkpoint = load_checkpoint(path)
    state = model_state(checkpoint, path)
    clip_state, block_prompts, unexpected = {}, {}, []
    for key, value in state.items():
        found = _BLOCK_PROMPT.fullmatch(key)
        if found or key == INPUT_VISION_PROMPT:
            tower, block = (found[1], int(found[2])) if found else ("image", 0)
            block_prompts.setdefault(tower, {})[block] = value.half().float()  # ViFi-CLIP's forward: .half()
        elif key.startswith("image_encoder."):
            clip_state["visual." + key.removeprefix("image_encoder.")] = value
        elif key.startswith("text_encoder."):
            clip_state[key.removeprefix("text_encoder.")] = value
        elif key == "logit_scale":
            clip_state[key] = value
        elif key != "prompt_learner.ctx" and key not in PROMPT_BUFFERS:
            unexpected.append(key)
    if unexpected:
        raise CheckpointError(f"unexpected keys for a ViFi-CLIP checkpoint: {', '.join(unexpected[:5])}", path)
    if not any(k.startswith("visual.") for k in clip_state) or "text_projection" not in clip_state:
        raise CheckpointError("not a ViFi-CLIP checkpoint: no image_encoder.* or text_encoder.text_projection "
                              "weights under 'model'", path)
    if "image" in block_prompts and 0 not in block_prompts["image"]:
        raise CheckpointError(f"has vision prompts of blocks {sorted(block_prompts['image'])} but no "
                              f"{INPUT_VISION_PROMPT}, the ones that enter with the patches", path)
    ctx_init = _saved_ctx_init(checkpoint)
    context = state.get("prompt_learner.ctx")
    if context is None:
        if "text" in block_prompts:
            raise CheckpointError("has text prompts inside the text tower but no prompt_learner.ctx, the context "
                                  "they continue", path)
        template = f"{ctx_init if ctx_init is not None else DEFAULT_CTX_INIT} {{}}."
        return VifiCheckpoint(clip_state, None, None, template, block_prompts)
    if context.dim() != 2:
        raise CheckpointError(f"prompt_learner.ctx has shape {tuple(context.shape)}: only context shared by all "
                              f"classes ([n, width]) is supported", path)
    for block, tokens in block_prompts.get("text", {}).items():
        if len(tokens) != len(context):
            raise CheckpointError(f"text prompts of block {block} hold {len(tokens)} tokens, prompt_learner.ctx "
                                  f"{len(context)}: each block's replace the context's positions", path)
    prefix = None
    if len(context) <= CONTEXT_FROM_WORDS:
        if ctx_init is None:
            raise CheckpointError(f"its {len(context)} learned context vectors stand in place of the words they "
                                  f"started from (CTX_INIT), which the checkpoint's saved config would name, but it "
                                  f"holds none", path)
        prefix = ctx_init or None  # an empty CTX_INIT: random initialisation, placeholder words
    return VifiCheckpoint(clip_state, context.float(), prefix, None, block_prompts)


def _base_clip(config: VifiImportConfig) -> torch.nn.Module:
    """The open_clip model with the base CLIP weights (only its token embedding is kept)."""
    if config.base != "openai" and not os.path.isfile(config.base):
        raise BackboneError(f"--base {config.base!r} is neither openai nor a file (CLIP weights for the token "
                            f"embedding)", config.base)
    try:
        clip, _ = load_clip(config.model, config.base)
    except DownloadError:
        raise DownloadError(f"could not download OpenAI's CLIP weights for {config.model} (no network?), which give "
                            f"the token embedding: pass --base /path/to/weights, a local open_clip weights file of "
                            f"them", config.checkpoint) from None
    return clip


def import_vificlip(config: VifiImportConfig) -> VifiImport:
    """Convert a ViFi-CLIP checkpoint into an open_clip weights file (see the module docstring)."""
    import open_clip

    if config.checkpoint is None or config.out is None:
        raise EvlCacheError("a CHECKPOINT and --out are required")
    out = Path(config.out)
    if out.exists():
        raise EvlCacheError("exists already: choose another --out, or remove it", out)
    model_config = open_clip.get_model_config(_register_model_name(config.model)) or {}
    if not model_config.get("quick_gelu"):
        raise BackboneError(f"{config.model} uses GELU, but ViFi-CLIP's towers are OpenAI's CLIP with QuickGELU: "
                            f"use a -quickgelu model name (ViT-B-16-quickgelu)")
    vifi = read_vificlip(config.checkpoint)
    clip = _base_clip(config)
    base_state = clip.state_dict()
    state = {**{k: base_state[k] for k in FROM_BASE if k not in vifi.clip_state}, **vifi.clip_state}
    load_exactly(clip, state, config.checkpoint, config.model)
    if "image" in vifi.block_prompts:  # their shapes checked against the towers, as load_clip will
        attach_image_prompts(clip.visual, vifi.block_prompts["image"], config.checkpoint)
    if "text" in vifi.block_prompts:
        attach_text_prompts(clip, vifi.block_prompts["text"], config.checkpoint)
    record = {"format": "vifi-clip", "checkpoint": str(config.checkpoint),
              "checkpoint_sha256": sha256_file(config.checkpoint), "model": config.model, "base": config.base}
    if vifi.text_context is not None:
        if vifi.text_context.shape[1] != clip.token_embedding.weight.shape[1]:
            raise CheckpointError(f"prompt_learner.ctx has width {vifi.text_context.shape[1]}, {config.model}'s text "
                                  f"tower {clip.token_embedding.weight.shape[1]}", config.checkpoint)
        record["text_context"] = vifi.text_context
        if vifi.context_prefix is not None:
            record["context_prefix"] = vifi.context_prefix
    else:
        record["prompt_template"] = vifi.prompt_template
    write_vifi_weights(out, clip.state_dict(), record, vifi.block_prompts)
    result = VifiImport(out, vifi.prompt_template, 0 if vifi.text_context is None else len(vifi.text_context),
                        {tower: sorted(blocks) for tower, blocks in vifi.block_prompts.items()})
    log.info("%s (from %s; %s from --base %s)", result.line(), config.checkpoint, ", ".join(FROM_BASE), config.base)
    return result


def learned_prompt(weights: str | Path) -> tuple[Tensor, str | None] | None:
    """(context vectors, the words they overwrite or None) of a weights file `import-vificlip` wrote from
    a text-prompted model; None for any other weights (a tag, or a file without learned context)."""
    record = read_weights_file(weights).get("vifi_clip")
    if not isinstance(record, dict) or "text_context" not in record:
        return None
    return record["text_context"], record.get("context_prefix")


def prompt_class_names(names: list[str]) -> list[str]:
    """Class names as ViFi-CLIP's learned prompts spell them: underscores as spaces."""
    return [name.replace("_", " ") for name in names]


def write_vifi_weights(out: Path, state_dict: dict[str, Tensor], record: dict,
                       prompts: dict[str, dict[int, Tensor]]) -> None:
    """The weights file `import-vificlip` and `finetune` write: open_clip's `state_dict`, the `vifi_clip`
    record (where the weights came from, the template or learned context) and any block `prompts`; written
    under a temporary name, then renamed into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, "vifi_clip": record}
    if prompts:
        saved["prompts"] = prompts
    partial = out.with_name(out.name + ".partial")
    torch.save(saved, partial)
    os.replace(partial, out)


@dataclass
class VifiExportConfig:
    """Options of `evl-cache export-vificlip`."""
    towers: Path = option(None, "weights file written by finetune (RUN/towers.pt) or import-vificlip", argument=True)
    out: Path = option(None, "ViFi-CLIP checkpoint to write (.pth)")


TEXT_ENCODER_KEYS = ("positional_embedding", "text_projection", "ln_final.", "transformer.")  # ViFi-CLIP's TextEncoder


def vifi_checkpoint_state(state_dict: dict[str, Tensor], record: dict, prompts: dict[str, dict[int, Tensor]],
                          source: Path) -> dict[str, Tensor]:
    """open_clip weights, learned context and block prompts in ViFi-CLIP's DDP state dict names (the
    inverse of `read_vificlip`); the token embedding, which ViFi-CLIP never saves, is left out."""
    model = {}
    for key, value in state_dict.items():
        if key.startswith("visual."):
            model["module.image_encoder." + key.removeprefix("visual.")] = value
        elif key == "logit_scale":
            model["module.logit_scale"] = value
        elif key.startswith(TEXT_ENCODER_KEYS):
            model["module.text_encoder." + key] = value
        elif key not in FROM_BASE:
            raise CheckpointError(f"{key} has no place in ViFi-CLIP's model, which builds OpenAI's CLIP towers: "
                                  f"only such towers export", source)
    for block, tokens in prompts.get("image", {}).items():
        name = INPUT_VISION_PROMPT if block == 0 else f"image_encoder.transformer.resblocks.{block}.VPT_shallow"
        model[f"module.{name}"] = tokens
    for block, tokens in prompts.get("text", {}).items():
        model[f"module.text_encoder.transformer.resblocks.{block}.VPT_shallow"] = tokens
    if "text_context" in record:
        model["module.prompt_learner.ctx"] = record["text_context"]
    return model


def vifi_config(record: dict, prompts: dict[str, dict[int, Tensor]], source: Path) -> dict:
    """The parts of ViFi-CLIP's config a checkpoint's weights depend on, as a plain dict (`import-vificlip`
    reads CTX_INIT back from it)."""
    if "text_context" in record:
        context = record["text_context"]
        words = record.get("context_prefix") or ("" if len(context) <= CONTEXT_FROM_WORDS else DEFAULT_CTX_INIT)
    else:
        template = record.get("prompt_template") or ""
        if not template.endswith(" {}.") or template.count("{}") != 1:
            raise CheckpointError(f"prompt template {template!r} is not ViFi-CLIP's 'WORDS {{}}.' form", source)
        words, context = template.removesuffix(" {}."), None
    depth = {tower: max(blocks) + 1 for tower, blocks in prompts.items()}
    trainer = {"CTX_INIT": words, "N_CTX_TEXT": 0 if context is None else len(context),
               "N_CTX_VISION": len(next(iter(prompts["image"].values()))) if "image" in prompts else 0,
               "PROMPT_DEPTH_TEXT": depth.get("text", 1 if context is not None else 0),
               "PROMPT_DEPTH_VISION": depth.get("image", 0),
               "PROMPT_MODEL": bool(prompts) or context is not None}
    config = {"TRAINER": {"ViFi_CLIP": trainer}}
    if record.get("frames"):
        config["DATA"] = {"NUM_FRAMES": int(record["frames"])}
    return config


def export_vificlip(config: VifiExportConfig) -> Path:
    """Write a weights file (finetune's or import-vificlip's) as a ViFi-CLIP checkpoint, which ViFi-CLIP's
    code loads with MODEL.RESUME (and `import-vificlip` reads back)."""
    if config.towers is None or config.out is None:
        raise EvlCacheError("a TOWERS file and --out are required")
    out = Path(config.out)
    if out.exists():
        raise EvlCacheError("exists already: choose another --out, or remove it", out)
    contents = read_weights_file(config.towers)
    record = contents.get("vifi_clip")
    if not isinstance(contents.get("state_dict"), dict) or not isinstance(record, dict):
        raise CheckpointError("not a weights file of finetune or import-vificlip (no state_dict and vifi_clip "
                              "record)", config.towers)
    prompts = contents.get("prompts") or {}
    state = vifi_checkpoint_state(contents["state_dict"], record, prompts, config.towers)
    checkpoint = {"model": {k: v.detach().clone() for k, v in state.items()},
                  "config": vifi_config(record, prompts, config.towers)}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(checkpoint, out)
    log.info("export-vificlip: wrote %s (%d tensors in ViFi-CLIP's names, from %s)", out, len(state), config.towers)
    return out
