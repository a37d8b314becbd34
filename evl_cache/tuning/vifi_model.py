"""ViFi-CLIP's video model (Rasheed et al., CVPR 2023) on an open_clip CLIP model, for training online.

Every frame goes through the image tower; the projected frame embeddings are averaged over the clip's
frames and L2-normalised; each class prompt goes through the text tower and is L2-normalised; logits
are the logit scale (exp) times the cosine (plus the logit bias of towers that have one). `tune`
chooses what learns, as ViFi-CLIP's TRAINER.ViFi_CLIP.USE does: `both` towers and the logit scale,
the `image` tower, or the `text` tower (never the token embedding, which ViFi-CLIP neither trains nor
saves), or `none`: then only prompt tokens learn ("bridge and prompt", PROMPT_MODEL):

- text: n learned context vectors in place of the n tokens after the start token of "WORDS name."
  (started from the first n words' embeddings when n <= 4 and WORDS are given, as ViFi-CLIP does; else
  normal with std 0.02 in front of placeholder words), and with depth d > 1 n tokens of their own in
  text blocks 1..d-1 (`block_prompts`);
- vision: n tokens after the patch tokens at the input, and with depth d > 1 n tokens of their own in
  image blocks 1..d-1. ViFi-CLIP's prompting needs text prompts; vision ones are optional.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import BackboneError, EvlCacheError
from ..towers.block_prompts import attach_image_prompts, attach_text_prompts
from ..towers.families import tower_layout
from ..towers.text import ClassPrompts, TextTower
from ..towers.vificlip import CONTEXT_FROM_WORDS, prompt_class_names

TUNES = ("both", "image", "text", "none")
PROMPT_STD = 0.02  # ViFi-CLIP's (and CoOp's, VPT's) initialisation of learned tokens


@dataclass(frozen=True)
class PromptSpec:
    """Learned prompt tokens: counts and depths (1: at the input only) per tower, and the prompt words."""
    words: str = "a photo of a"
    text_tokens: int = 0
    text_depth: int = 1
    vision_tokens: int = 0
    vision_depth: int = 1

    @property
    def learned(self) -> bool:
        return bool(self.text_tokens or self.vision_tokens)

    def check(self, tune: str) -> None:
        """Refuse prompt settings ViFi-CLIP's model cannot have, in one line."""
        for name in ("text_tokens", "vision_tokens"):
            if getattr(self, name) < 0:
                raise EvlCacheError(f"--{name.replace('_', '-').replace('tokens', 'prompt-tokens')} must be 0 or more")
        for name in ("text_depth", "vision_depth"):
            if getattr(self, name) < 1:
                raise EvlCacheError(f"--{name.replace('_', '-').replace('depth', 'prompt-depth')} must be 1 (the "
                                    f"input only) or more")
        if self.learned and tune != "none":
            raise EvlCacheError(f"learned prompts train with both towers frozen (bridge and prompt): use --tune none, "
                                f"not --tune {tune}")
        if self.vision_tokens and not self.text_tokens:
            raise EvlCacheError("vision prompts need text prompts too (ViFi-CLIP's prompting always learns text "
                                "context): give --text-prompt-tokens")
        if tune == "none" and not self.learned:
            raise EvlCacheError("--tune none without prompt tokens trains nothing: that is `evl-cache zeroshot`")

    def template(self) -> str:
        """The class prompt without learned context: "WORDS {}." (ViFi-CLIP's CTX_INIT)."""
        return f"{self.words} {{}}." if self.words else "{}."


def initial_context(spec: PromptSpec, tower: TextTower, tokenizer,
                    generator: torch.Generator) -> tuple[Tensor, str | None]:
    """(n context vectors, the words they overwrite or None for placeholders), as ViFi-CLIP starts them."""
    width = tower.width
    if spec.words and spec.text_tokens <= CONTEXT_FROM_WORDS:
        ids = tokenizer([spec.words])[0]
        words_tokens = int((ids != 0).sum()) - 2  # without the start and end tokens
        if words_tokens < spec.text_tokens:
            raise EvlCacheError(f"--prompt-words {spec.words!r} has {words_tokens} tokens, fewer than the "
                                f"--text-prompt-tokens {spec.text_tokens} context vectors that start from them")
        with torch.no_grad():
            return tower.token_embedding(ids[1:1 + spec.text_tokens]).float().clone(), spec.words
    return torch.randn(spec.text_tokens, width, generator=generator) * PROMPT_STD, None


class VideoCLIP(nn.Module):
    """Clips (normalised pixels [B, T, 3, S, S]) -> class logits [B, K], ViFi-CLIP's way (module docstring).

    `clip` keeps its own modules: the open_clip model's `state_dict()` is the trained one at any time.
    The parameters that do not train are left out of a run's saved weights (`rebuilt_prefixes`): they
    are rebuilt from the base weights.
    """

    def __init__(self, clip: nn.Module, tokenizer, class_names: list[str], tune: str, prompts: PromptSpec,
                 mean: tuple[float, ...], std: tuple[float, ...], seed: int = 0):
        super().__init__()
        if tune not in TUNES:
            raise EvlCacheError(f"--tune {tune!r}: one of {', '.join(TUNES)}")
        prompts.check(tune)
        generator = torch.Generator().manual_seed(seed)
        self.clip_model = [clip]  # a list: not a submodule (its tensors are this module's, under other names)
        self.visual = clip.visual
        self.spec, self.tune = prompts, tune
        tower = TextTower(clip)
        context, prefix = (initial_context(prompts, tower, tokenizer, generator) if prompts.text_tokens
                           else (None, None))
        names = _prompted_names(class_names, context is not None)
        self.prompts = ClassPrompts(tower, tokenizer, names, [prompts.template()] if context is None else None,
                                    tune_tower=tune in ("text", "both"), context_vectors=context,
                                    context_prefix=prefix)
        self.logit_scale = clip.logit_scale
        self.logit_bias = getattr(clip, "logit_bias", None)
        self._attach_prompts(clip, generator)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 1, 3, 1, 1), persistent=False)
        self._set_trainable()

    def _attach_prompts(self, clip: nn.Module, generator: torch.Generator) -> None:
        """Trainable block prompts: vision ones at the input and in blocks 1..depth-1, text ones in blocks
        1..depth-1 (the input context is `ClassPrompts`')."""
        spec = self.spec
        if spec.vision_tokens:
            family = tower_layout(clip.visual, "this model").family
            if family != "openclip":
                raise BackboneError(f"vision prompts go into open_clip ViT blocks; this is a {family} tower")
            width = int(clip.visual.transformer.width)
            attach_image_prompts(clip.visual, {block: torch.randn(spec.vision_tokens, width, generator=generator)
                                               * PROMPT_STD for block in range(spec.vision_depth)}, trainable=True)
        if spec.text_tokens and spec.text_depth > 1:
            width = int(clip.transformer.width)
            attach_text_prompts(clip, {block: torch.randn(spec.text_tokens, width, generator=generator) * PROMPT_STD
                                       for block in range(1, spec.text_depth)}, trainable=True)

    def _set_trainable(self) -> None:
        """Gradients for what `tune` names (or the prompts only), and nothing else."""
        self.requires_grad_(False)
        if self.tune in ("image", "both"):
            self.visual.requires_grad_(True)
        if self.tune in ("text", "both"):
            self.prompts.tower.requires_grad_(True)
            self.prompts.tower.token_embedding.requires_grad_(False)
        if self.tune == "both":
            self.logit_scale.requires_grad_(True)
        for name, parameter in self.named_parameters():
            if "block_prompts." in name or name == "prompts.context":
                parameter.requires_grad_(True)
        trained = {name for name, p in self.named_parameters() if p.requires_grad}
        self.rebuilt_prefixes = tuple(name for name in self.state_dict() if name not in trained)

    def set_classes(self, class_names: list[str]) -> None:
        """Score against these classes from now on (named as ViFi-CLIP's prompts name them)."""
        self.prompts.set_classes(_prompted_names(class_names, self.prompts.context is not None))

    def prompt_record(self) -> dict:
        """How the text side prompts, as a weights file's `vifi_clip` record says: the template, or the learned
        context (and the words it overwrites)."""
        prompts = self.prompts
        if prompts.context is None:
            return {"prompt_template": prompts.templates[0]}
        record = {"text_context": prompts.context.detach().cpu().float().clone()}
        if prompts.overwritten_words is not None:
            record["context_prefix"] = prompts.overwritten_words
        return record

    @property
    def image_learns(self) -> bool:
        return any(p.requires_grad for p in self.visual.parameters())

    def pixels(self, clips: Tensor) -> Tensor:
        """uint8 clips [B, T, 3, S, S] -> normalised float32 pixels."""
        return (clips.float() / 255 - self.mean) / self.std

    def video_embeddings(self, pixels: Tensor) -> Tensor:
        """[B, T, 3, S, S] -> [B, E]: the frames' projected embeddings, averaged, L2-normalised."""
        batch, frames = pixels.shape[:2]
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.image_learns):
            out = self.visual(pixels.flatten(0, 1))
        out = out[0] if isinstance(out, tuple) else out  # CoCa's tower: (pooled, tokens)
        return F.normalize(out.float().view(batch, frames, -1).mean(1), dim=-1)

    def forward(self, pixels: Tensor) -> Tensor:
        """Normalised pixels [B, T, 3, S, S] -> logits [B, K] over the prompts' classes."""
        logits = self.logit_scale.exp().float() * self.video_embeddings(pixels) @ self.prompts().T
        return logits if self.logit_bias is None else logits + self.logit_bias.float()

    def open_clip_state(self) -> dict[str, Tensor]:
        """The open_clip model's weights as trained (on the CPU), without the learned prompt tokens."""
        return {k: v.detach().cpu().clone() for k, v in self.clip_model[0].state_dict().items()
                if "block_prompts." not in k}

    def block_prompts(self) -> dict[str, dict[int, Tensor]]:
        """{"image"/"text": {block: tokens}} of the learned block prompts, as a weights file holds them."""
        found = {}
        image = getattr(self.visual, "block_prompts", None)
        text = getattr(self.prompts.tower.transformer, "block_prompts", None)
        for tower, attached in (("image", image), ("text", text)):
            if attached is not None:
                found[tower] = attached.tensors()
        return found


def _prompted_names(class_names: list[str], learned_context: bool) -> list[str]:
    """Class names as ViFi-CLIP's prompts spell them: with underscores as spaces behind learned context, as
    they are behind its template."""
    return prompt_class_names(class_names) if learned_context else list(class_names)
