"""The frozen CLIP image tower and what EVL needs from it (evl-model.md sections 1 and 2).

`load_clip` builds an open_clip model from a model name (or a model-config JSON file) and weights given
as an open_clip pretrained tag, a local file, or `none` (random weights, for tests), with any prompt
tokens the file fixes into the towers' blocks (`block_prompts`). `FrozenBackbone` runs its image tower
in eval mode without gradients and captures, for the last K blocks, the block outputs (the tower's
prefix tokens, if any, and its patch tokens) and the adjacent-frame attention maps from the blocks' own
q and k, plus the per-frame image embedding from the tower's own head. Which towers are read, and
where each family's tokens, q and k are taken, is `families`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import BackboneError, DownloadError
from .block_prompts import attach_image_prompts, attach_text_prompts, read_block_prompts
from .families import QueryKeyTap, tower_layout
from .statistics import add_clip_statistics, split_pretrained
from .tiny_trunks import register_tiny_trunks

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class BackboneSpec:
    """What identifies a backbone and the shapes of what it gives."""
    model: str
    pretrained: str
    weights_sha256: str
    quick_gelu: bool
    image_size: int
    patch_grid: tuple[int, int]
    width: int
    heads: int
    layers: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    family: str = "openclip"  # records of format versions 1 and 2 lack these two: open_clip ViTs, a class token
    prefix_tokens: int = 1  # class and register tokens before the patch tokens

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BackboneSpec":
        """A spec from its record (one of format versions 1 and 2 gets the family and prefix count they had)."""
        fields = dict(values)
        for name in ("patch_grid", "mean", "std"):
            fields[name] = tuple(fields[name])
        return cls(**fields)


@dataclass
class BackboneOutput:
    """Per clip: block outputs [B, T, L, C] and maps [B, T-1, P, P] per captured block, embeddings [B, T, E]."""
    block_outputs: list[torch.Tensor]
    maps_prev: list[torch.Tensor]
    maps_next: list[torch.Tensor]
    embeddings: torch.Tensor


def prefix_tokens(backbone: dict) -> int:
    """The class and register tokens before the patch tokens, from a cache's or run's backbone record."""
    return int(backbone.get("prefix_tokens", BackboneSpec.prefix_tokens))


def _register_model_name(model: str) -> str:
    """Accept an open_clip model name or a path to a model-config JSON; return the open_clip name."""
    import open_clip

    register_tiny_trunks()  # the timm trunks of the shipped EVL-Tiny-* configs
    open_clip.add_model_config(MODEL_CONFIG_DIR)
    if model.endswith(".json"):
        path = Path(model)
        if not path.is_file():
            raise BackboneError("model config file not found", path)
        open_clip.add_model_config(path)
        return path.stem
    if model not in open_clip.list_models():
        raise BackboneError(f"unknown open_clip model {model!r} (see open_clip.list_models(), "
                            f"or pass a model-config JSON file)")
    return model


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_state(module: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def model_geometry(model: str, image_size: int | None = None) -> dict:
    """Image-tower shapes from the open_clip model config alone: the model is built on the meta device (no
    memory, no weights); a tower evl-cache cannot read is refused here too."""
    import open_clip

    name = _register_model_name(model)
    kwargs = {"force_image_size": image_size} if image_size is not None else {}
    quiet = logging.root.manager.disable
    logging.disable(logging.WARNING)  # open_clip warns that no weights were loaded: none were asked for
    try:
        with torch.device("meta"):
            clip = open_clip.create_model(name, pretrained=None, device="meta", **kwargs)
    finally:
        logging.disable(quiet)
    layout = tower_layout(clip.visual, model)
    return {"width": layout.width, "layers": len(layout.blocks), "patch_grid": layout.grid,
            "embed_dim": open_clip.get_model_config(name)["embed_dim"], "image_size": layout.image_size,
            "heads": layout.heads, "family": layout.family, "prefix_tokens": layout.prefix_tokens}


def load_clip(model: str, pretrained: str = "openai", image_size: int | None = None,
              device: str | torch.device = "cpu", seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    """Build an open_clip CLIP model with frozen weights and describe it.

    `pretrained` is an open_clip tag (downloaded by open_clip), a local weights file (with the prompt
    tokens it may carry for the towers' blocks), or `none` (random weights from `seed`, for tests). A tag
    whose weights used QuickGELU gets QuickGELU even if the model name lacks `-quickgelu` (open_clip would
    otherwise build a different network). A tower evl-cache cannot read is refused before it is built.
    """
    import open_clip

    name = _register_model_name(model)
    model_geometry(model, image_size)  # refuses a tower evl-cache cannot read, on the meta device
    base, statistics = split_pretrained(pretrained)  # `+outliers`: CLIP's statistics added (towers/statistics.py)
    weights, tag_cfg = _weights_of(name, base)
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
    kwargs = {"force_image_size": image_size} if image_size is not None else {}
    if quick_gelu:
        kwargs["force_quick_gelu"] = True
    with torch.random.fork_rng(devices=[]):  # the model is built on the CPU: its generator alone, restored after
        torch.default_generator.manual_seed(seed)  # (torch.manual_seed would re-seed every CUDA generator too)
        try:
            clip = open_clip.create_model(name, pretrained=weights, device="cpu", **kwargs)
        except RuntimeError as error:
            if weights is not None and not os.path.isfile(weights):
                raise DownloadError(
                    f"could not download open_clip weights {pretrained!r} for {name} (no network?): "
                    f"pass --pretrained /path/to/weights (a local file) or --pretrained none "
                    f"(random weights, for tests)") from None
            raise BackboneError(f"cannot load weights {weights}: {error}") from None
    if statistics:
        family = tower_layout(clip.visual, model).family
        if family != "openclip":
            raise BackboneError(f"--pretrained {pretrained!r}: CLIP's statistics are added to open_clip ViT towers "
                                f"(OpenAI layout); {model} is a {family} tower")
        add_clip_statistics(clip.visual, seed=seed)
    if weights is None or statistics:
        sha = _sha256_state(clip)
    elif os.path.isfile(weights):
        sha = sha256_file(weights)
    else:
        from open_clip.pretrained import download_pretrained
        sha = sha256_file(download_pretrained(tag_cfg))
    if weights is not None and os.path.isfile(weights):
        _attach_prompts(clip, model, weights)
    clip = clip.to(device).eval().requires_grad_(False)
    return clip, describe(clip, model, pretrained, sha, quick_gelu, open_clip.get_model_config(name) or {})


def _weights_of(name: str, pretrained: str) -> tuple[str | None, dict]:
    """(what open_clip loads: None, a file or a tag; the tag's open_clip config, {} for none or a file)."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    if pretrained.lower() == "none":
        return None, {}
    if os.path.isfile(pretrained):
        return pretrained, {}
    tag_cfg = get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        tags = open_clip.list_pretrained_tags_by_model(name)
        raise BackboneError(f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of "
                            f"{name} (tags: {', '.join(tags) or 'none'}; or pass a weights file, or none)")
    return pretrained, tag_cfg


def _attach_prompts(clip: nn.Module, model: str, weights: str) -> None:
    """Fix the block prompts a weights file carries into the towers (ViFi-CLIP's OpenAI-layout towers)."""
    prompts = read_block_prompts(weights)
    if "image" in prompts:
        family = tower_layout(clip.visual, model).family
        if family != "openclip":
            raise BackboneError(f"image block prompts go into open_clip ViT blocks; {model} is a {family} tower",
                                weights)
        attach_image_prompts(clip.visual, prompts["image"], weights)
    if "text" in prompts:
        if not hasattr(clip, "transformer"):
            raise BackboneError(f"text block prompts go into a CLIP text transformer; {model}'s text tower is "
                                f"{type(getattr(clip, 'text', None)).__name__}", weights)
        attach_text_prompts(clip, prompts["text"], weights)
    for tower, blocks in prompts.items():
        log.info("%s: %d prompt tokens fixed into %s blocks %s", weights, len(next(iter(blocks.values()))),
                 tower, ", ".join(map(str, sorted(blocks))))


def describe(clip: nn.Module, model: str, pretrained: str, sha: str, quick_gelu: bool, config: dict) -> BackboneSpec:
    """The BackboneSpec of a built CLIP model (its image tower refused here if evl-cache cannot read it)."""
    layout = tower_layout(clip.visual, model)
    visual = clip.visual
    return BackboneSpec(
        model=model, pretrained=pretrained, weights_sha256=sha,
        quick_gelu=bool(quick_gelu or config.get("quick_gelu", False)),
        image_size=layout.image_size, patch_grid=layout.grid, width=layout.width, heads=layout.heads,
        layers=len(layout.blocks), embed_dim=int(config["embed_dim"]),
        mean=tuple(float(m) for m in (getattr(visual, "image_mean", None) or CLIP_MEAN)),
        std=tuple(float(s) for s in (getattr(visual, "image_std", None) or CLIP_STD)),
        family=layout.family, prefix_tokens=layout.prefix_tokens,
    )


def adjacent_maps(q: torch.Tensor, k: torch.Tensor,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal maps from patch queries and keys [B, T, P, H, D] -> (A_prev, A_next), each [B, T-1, P, P].

    A_prev[:, t-1] = mean_h softmax(q_t . k_{t-1} * scale) for t = 1..T-1;
    A_next[:, t]   = mean_h softmax(q_t . k_{t+1} * scale) for t = 0..T-2;
    scale: the attention's own (default 1/sqrt(D), the scale of every tower read today).
    Computed in float32 on every device, under autocast too: a float16 q . k loses about 1e-2 of the
    maps and overflows to inf for large logits, which turns their rows into NaN.
    """
    with torch.autocast(q.device.type, enabled=False):
        q = q.float().permute(0, 1, 3, 2, 4)  # [B, T, H, P, D]
        k = k.float().permute(0, 1, 3, 2, 4)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        prev = torch.softmax(q[:, 1:] @ k[:, :-1].transpose(-1, -2) * scale, dim=-1).mean(dim=2)
        nxt = torch.softmax(q[:, :-1] @ k[:, 1:].transpose(-1, -2) * scale, dim=-1).mean(dim=2)
    return prev, nxt


class FrozenBackbone(nn.Module):
    """The image tower of a CLIP model, capturing what the EVL decoder, the probes and CLIP heads need."""

    def __init__(self, visual: nn.Module, blocks: int, mean: tuple[float, ...], std: tuple[float, ...],
                 model: str = "this model"):
        super().__init__()
        self.layout = layout = tower_layout(visual, model)
        if not 0 <= blocks <= len(layout.blocks):
            raise BackboneError(f"--blocks {blocks} is not in 0..{len(layout.blocks)} (the model's blocks)")
        self.visual = visual.eval().requires_grad_(False)
        self.block_indices = list(range(len(layout.blocks) - blocks, len(layout.blocks)))
        self.tokens = layout.tokens  # prefix and patch tokens; any prompt tokens follow, not kept
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._outputs: dict[int, torch.Tensor] = {}
        self._taps = {i: QueryKeyTap(layout, layout.blocks[i]) for i in self.block_indices}
        for i in self.block_indices:
            layout.blocks[i].register_forward_hook(self._keep_output(i))

    def _keep_output(self, i: int):
        def hook(module, inputs, output):
            self._outputs[i] = output if self.layout.batch_first else output.transpose(0, 1)
        return hook

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The tower's own image embedding of normalised images (`encode_image`, not normalised)."""
        out = self.visual(x)
        return out[0] if getattr(self.visual, "output_tokens", False) else out  # CoCa's tower: (pooled, tokens)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> BackboneOutput:
        """pixels: uint8 [B, T, 3, S, S] -> BackboneOutput (maps from float32 q and k, float32 on every
        device; features in the compute dtype)."""
        batch, frames = pixels.shape[:2]
        x = pixels.flatten(0, 1).float().div_(255).sub_(self.mean).div_(self.std)
        self._outputs.clear()
        embeddings = self.embed(x)
        prefix, outputs, prevs, nexts = self.layout.prefix_tokens, [], [], []
        for i in self.block_indices:
            out = self._outputs.pop(i)[:, :self.tokens]
            outputs.append(out.reshape(batch, frames, *out.shape[1:]))
            q, k = (t[:, prefix:self.tokens].unflatten(0, (batch, frames)) for t in self._taps[i].take())
            prev, nxt = adjacent_maps(q, k, self._taps[i].scale)
            prevs.append(prev)
            nexts.append(nxt)
        return BackboneOutput(outputs, prevs, nexts, embeddings.reshape(batch, frames, -1))
