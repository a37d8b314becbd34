"""CLIP's text tower on class names: the class side of zero-shot and of the text heads.

ViFi-CLIP (Rasheed et al., CVPR 2023) scores a video against a class by CLIP's logit scale times the
cosine similarity of two L2-normalised vectors (plus the model's logit bias, for SigLIP's towers): the video's per-frame CLIP embeddings averaged over
frames, and the text tower's embedding of a prompt naming the class. The video side is in the cache
(`embed`); this module gives the class side.

- `load_text_tower` builds the open_clip model a cache (or run) names, checks its weights' sha256
  against the cache's, and keeps only the text tower: the image tower is dropped at once.
- `TextTower` is open_clip's `encode_text` (of `CLIP`, or of `CustomTextCLIP`'s text transformer, as
  SigLIP, PE-Core and EVA-02 models have), reimplemented so that token embeddings can be given instead of
  token ids (learned prompts), with the same parameter names, and with the model's own logits. Its transformer is causal,
  so the embedding at the end-of-text token depends only on the tokens before it: sequences are cut
  after the longest prompt's end-of-text token, which is exact and saves most of the 77 positions.
- `ClassPrompts` turns class names into normalised class embeddings, either from templates ("a photo
  of a {}.", several averaged in embedding space and renormalised) or from learned context vectors
  in front of each name (CoOp, Zhou et al. 2022: "X X ... X name." whose X embeddings are replaced).
  A frozen prompt set is computed once per class list and reused.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import BackboneError, EvlCacheError

log = logging.getLogger(__name__)

BARE_NAME = "{}"
POOLS = ("argmax", "eos", "first", "last")  # where open_clip's text towers take the text embedding
CONTEXT_WORD = "X"  # placeholder whose token embeddings the learned context vectors replace (as CoOp)


def read_templates(path: str | Path) -> list[str]:
    """Prompt templates, one per line with `{}` where the class name goes; blank and # lines skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise EvlCacheError(f"cannot read templates: {error.strerror}", path) from None
    templates = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not templates:
        raise EvlCacheError("no templates in the file (one per line, with {} for the class name)", path)
    for template in templates:
        if template.count("{}") != 1:
            raise EvlCacheError(f"template {template!r} must hold {{}} exactly once (where the class name goes)",
                                path)
    return templates


class TextTower(nn.Module):
    """The text tower of an open_clip CLIP model: prompts (ids, or token embeddings) -> text embeddings.

    Parameter names are open_clip's own (`token_embedding.weight`, `positional_embedding`,
    `transformer.resblocks.*`, `ln_final.*`, `text_projection`). The model's logit scale and logit bias
    (SigLIP's; None for CLIP's) are kept as buffers: they never train here.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        text = clip if hasattr(clip, "token_embedding") else getattr(clip, "text", None)  # CLIP / CustomTextCLIP
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
        pool = getattr(text, "text_pool_type", getattr(text, "pool_type", None))
        if (not all(hasattr(text, name) for name in needed) or pool not in POOLS
                or getattr(text, "cls_emb", None) is not None or getattr(text, "use_pad_mask", False)):
            raise BackboneError(f"unsupported text tower ({type(text).__name__}, pooling {pool!r}): the text heads "
                                f"need an open_clip text transformer without a class token or padding mask, pooled "
                                f"at one token ({', '.join(POOLS)})")
        self.token_embedding = text.token_embedding
        self.positional_embedding = text.positional_embedding
        self.transformer = text.transformer
        self.ln_final = text.ln_final
        self.text_projection = text.text_projection
        self.pool_type = pool
        self.eos_id = getattr(text, "text_eos_id", getattr(text, "eos_id", None))
        mask = getattr(text, "attn_mask", None)
        self.register_buffer("attn_mask", None if mask is None else mask.detach().clone(), persistent=False)
        length = self.positional_embedding.shape[0]
        self.causal = mask is not None and torch.equal(torch.isinf(mask[:length, :length]),
                                                       torch.ones(length, length, dtype=torch.bool).triu(1))
        self.register_buffer("logit_scale", clip.logit_scale.detach().clone().float(), persistent=False)
        bias = getattr(clip, "logit_bias", None)
        self.register_buffer("logit_bias", None if bias is None else bias.detach().clone().float(), persistent=False)

    def logits(self, cosine: Tensor) -> Tensor:
        """The model's own logits of cosine similarities: exp(logit_scale) * cosine (+ logit_bias)."""
        logits = self.logit_scale.exp() * cosine
        return logits if self.logit_bias is None else logits + self.logit_bias

    @property
    def width(self) -> int:
        return int(self.token_embedding.weight.shape[1])

    def pool_index(self, token_ids: Tensor) -> Tensor:
        """Position of the token each prompt's embedding is taken at: its end-of-text token (the highest id
        for CLIP's tokenizer, or the tokenizer's end id), or the first or last position."""
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        position = 0 if self.pool_type == "first" else token_ids.shape[1] - 1
        return torch.full((len(token_ids),), position, dtype=torch.long, device=token_ids.device)

    def forward(self, token_ids: Tensor, token_embeddings: Tensor | None = None) -> Tensor:
        """Text embeddings [K, E], not normalised, of K prompts.

        token_ids: [K, context] from the model's tokenizer; token_embeddings: [K, context, width] to use
        instead of looking the ids up (learned prompts), with the ids still marking the end of text.
        """
        pool = self.pool_index(token_ids)
        length = int(pool.max()) + 1 if self.causal else token_ids.shape[1]
        x = self.token_embedding(token_ids[:, :length]) if token_embeddings is None else token_embeddings[:, :length]
        cast_dtype = self.transformer.get_cast_dtype()
        x = (x + self.positional_embedding[:length]).to(cast_dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        x = x[torch.arange(x.shape[0], device=x.device), pool]
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


def load_text_tower(backbone: dict, seed: int, pretrained: str | None = None) -> tuple[TextTower, object]:
    """The text tower (frozen, on the CPU) and tokenizer of the CLIP model a cache's backbone record names.

    `backbone` is the cache's `backbone` attribute (model, pretrained, weights_sha256, image_size);
    `seed` the cache's sampling seed, which rebuilds random (`none`) weights identically; `pretrained`
    a weights file to use instead of the recorded tag or file. Weights with another sha256 than the
    cache's are refused: the text tower must be the image tower's own partner.
    """
    import open_clip

    from .backbone import _register_model_name, load_clip

    weights = pretrained or backbone["pretrained"]
    clip, spec = load_clip(backbone["model"], weights, backbone["image_size"], "cpu", seed=seed)
    if spec.weights_sha256 != backbone["weights_sha256"]:
        raise BackboneError(f"CLIP weights sha256 {spec.weights_sha256[:12]} differ from the cache's "
                            f"{backbone['weights_sha256'][:12]}: the text tower must come with the cached image tower",
                            weights)
    clip.visual = None  # the image tower's outputs are in the cache; free its memory now
    tower = TextTower(clip)
    try:
        tokenizer = open_clip.get_tokenizer(_register_model_name(backbone["model"]))
    except Exception as error:  # e.g. a hub tokenizer without a network
        raise BackboneError(f"cannot load the tokenizer of {backbone['model']}: {error}") from None
    return tower, tokenizer


class ClassPrompts(nn.Module):
    """Normalised class embeddings [K, E] from the text tower: templates, or learned context (CoOp).

    context_tokens = 0: each class is the average of its templates' normalised embeddings,
    renormalised (one template: just that prompt). context_tokens = n > 0: each class is the prompt
    "[SOT] c_1 ... c_n name . [EOT]" whose c_i are learned vectors shared by all classes (CoOp's
    generic context, initialised normal with std 0.02, or to given `context_vectors` [n, width], such as
    a ViFi-CLIP checkpoint's learned ones). `context_prefix` is the text whose first n tokens the
    context vectors overwrite ("[SOT] prefix name . [EOT]"; ViFi-CLIP's CTX_INIT words when it
    initialised 4 or fewer vectors from them), by default n placeholder words. tune_tower trains the
    text tower too; otherwise it stays frozen and is left out of saved weights (it is rebuilt from
    the backbone).
    """

    def __init__(self, tower: TextTower, tokenizer, class_names: list[str], templates: list[str] | None = None,
                 context_tokens: int = 0, tune_tower: bool = False, context_vectors: Tensor | None = None,
                 context_prefix: str | None = None):
        super().__init__()
        if context_vectors is not None:
            context_tokens = len(context_vectors)
        if context_tokens < 0:
            raise EvlCacheError("--prompt-tokens must be 0 or more")
        if context_tokens and templates and list(templates) != [BARE_NAME]:
            raise EvlCacheError("--templates apply to --prompt-tokens 0; learned prompts are 'context name.'")
        deep = getattr(tower.transformer, "block_prompts", None)
        if deep is not None and context_tokens != deep.tokens:
            raise EvlCacheError(f"the text tower's blocks put {deep.tokens} learned prompt tokens after the start "
                                f"token, in place of {deep.tokens} context vectors in front of the class name: "
                                f"use --prompt-tokens {deep.tokens}, not {context_tokens}")
        self.tower = tower.requires_grad_(tune_tower)
        self.tune_tower = tune_tower
        self.tokenizer = tokenizer
        self.templates = list(templates or [BARE_NAME])
        self.context_tokens = context_tokens
        self.context_prefix = context_prefix or " ".join([CONTEXT_WORD] * context_tokens)
        self._placeholder_context = context_prefix is None  # one placeholder token per context vector
        self.context = None
        if context_vectors is not None:
            self.context = nn.Parameter(context_vectors.detach().clone().float())
        elif context_tokens:
            self.context = nn.Parameter(torch.empty(context_tokens, tower.width))
            nn.init.normal_(self.context, std=0.02)
        self._cached: Tensor | None = None
        self.set_classes(class_names)

    @property
    def trainable(self) -> bool:
        return self.context is not None or self.tune_tower

    @property
    def overwritten_words(self) -> str | None:
        """The words the learned context vectors stand in place of; None for placeholder words or no context."""
        return None if self.context is None or self._placeholder_context else self.context_prefix

    def prompts(self, class_names: list[str]) -> list[str]:
        """The prompt strings, class-major ([K * M] for M templates; [K] with learned context)."""
        if self.context is not None:
            return [f"{self.context_prefix} {name}." for name in class_names]
        return [template.format(name) for name in class_names for template in self.templates]

    def set_classes(self, class_names: list[str]) -> None:
        """Score against these class names from now on."""
        if not class_names:
            raise EvlCacheError("no class names to score against")
        token_ids = self.tokenizer(self.prompts(list(class_names)))
        if self.context is not None and self._placeholder_context:
            placeholder = self.tokenizer([CONTEXT_WORD])[0, 1]
            if not (token_ids[:, 1:1 + self.context_tokens] == placeholder).all():
                raise EvlCacheError("the tokenizer does not give one token per learned context position after a "
                                    "start token (as CLIP's does): use --prompt-tokens 0 (templates) with this model")
        device = self.tower.positional_embedding.device
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)
        self.class_names = list(class_names)
        self._cached = None

    def train(self, mode: bool = True) -> "ClassPrompts":
        self._cached = None  # trainable prompts change with every step
        return super().train(mode)

    def forward(self) -> Tensor:
        """[K, E] L2-normalised class embeddings."""
        reusable = not self.trainable or not (self.training or torch.is_grad_enabled())
        if reusable and self._cached is not None and self._cached.device == self.token_ids.device:
            return self._cached
        if self.context is None:
            embeddings = self.tower(self.token_ids)
        else:
            looked_up = self.tower.token_embedding(self.token_ids)
            context = self.context.to(looked_up.dtype).expand(len(looked_up), -1, -1)
            looked_up = torch.cat([looked_up[:, :1], context, looked_up[:, 1 + self.context_tokens:]], dim=1)
            embeddings = self.tower(self.token_ids, looked_up)
        embeddings = F.normalize(embeddings.float(), dim=-1)
        if self.context is None and len(self.templates) > 1:
            embeddings = embeddings.view(len(self.class_names), len(self.templates), -1).mean(1)
            embeddings = F.normalize(embeddings, dim=-1)
        if reusable:
            self._cached = embeddings
        return embeddings
