"""The frozen CLIP image tower and what EVL needs from it (evl-model.md sections 1 and 2).

`load_clip` builds an open_clip model from a model name (or a model-config JSON file) and weights given
as an open_clip pretrained tag, a local file, or `none` (random weights, for tests), with any prompt
tokens the file fixes into the towers' blocks (`block_prompts`). `FrozenBackbone` runs its image tower
in eval mode without gradients and captures, for the last K blocks, the block outputs (CLS and patch
tokens) and the adjacent-frame attention maps, plus the projected per-frame CLS embedding.
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
from .statistics import add_clip_statistics, split_pretrained

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

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "BackboneSpec":
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


def _register_model_name(model: str) -> str:
    """Accept an open_clip model name or a path to a model-config JSON; return the open_clip name."""
    import open_clip

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
    """Image-tower shapes from the open_clip model config alone (no weights are built or loaded)."""
    import open_clip

    config = open_clip.get_model_config(_register_model_name(model))
    vision = config["vision_cfg"]
    size = image_size or vision["image_size"]
    size = size if isinstance(size, int) else size[0]
    patch = vision["patch_size"]
    return {"width": vision["width"], "layers": vision["layers"], "patch_grid": (size // patch, size // patch),
            "embed_dim": config["embed_dim"], "image_size": size}


def load_clip(model: str, pretrained: str = "openai", image_size: int | None = None,
              device: str | torch.device = "cpu", seed: int = 0) -> tuple[nn.Module, BackboneSpec]:
    """Build an open_clip CLIP model with frozen weights and describe it.

    `pretrained` is an open_clip tag (downloaded by open_clip), a local weights file (with the prompt
    tokens it may carry for the towers' blocks), or `none` (random weights from `seed`, for tests). A tag whose weights used QuickGELU gets QuickGELU even
    if the model name lacks `-quickgelu` (open_clip would otherwise build a different network).
    """
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    name = _register_model_name(model)
    kwargs: dict = {}
    if image_size is not None:
        kwargs["force_image_size"] = image_size
    tag_cfg = {}
    base, statistics = split_pretrained(pretrained)  # `+outliers`: CLIP's statistics added (towers/statistics.py)
    if base.lower() == "none":
        weights = None
    elif os.path.isfile(base):
        weights = base
    else:
        tag_cfg = get_pretrained_cfg(name, base)
        if not tag_cfg:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise BackboneError(f"--pretrained {pretrained!r} is neither a file nor an open_clip tag of "
                                f"{name} (tags: {', '.join(tags) or 'none'}; or pass a weights file, or none)")
        weights = base
    quick_gelu = bool(tag_cfg.get("quick_gelu", False))
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
        add_clip_statistics(clip.visual, seed=seed)
    if weights is None or statistics:
        sha = _sha256_state(clip)
    elif os.path.isfile(weights):
        sha = sha256_file(weights)
    else:
        from open_clip.pretrained import download_pretrained
        sha = sha256_file(download_pretrained(tag_cfg))
    if weights is not None and os.path.isfile(weights):
        prompts = read_block_prompts(weights)
        if "image" in prompts:
            attach_image_prompts(clip.visual, prompts["image"], weights)
        if "text" in prompts:
            attach_text_prompts(clip, prompts["text"], weights)
        for tower, blocks in prompts.items():
            log.info("%s: %d prompt tokens fixed into %s blocks %s", weights, len(next(iter(blocks.values()))),
                     tower, ", ".join(map(str, sorted(blocks))))
    clip = clip.to(device).eval().requires_grad_(False)
    visual = clip.visual
    config = open_clip.get_model_config(name) or {}
    grid = tuple(visual.grid_size)
    block = visual.transformer.resblocks[0]
    spec = BackboneSpec(
        model=model, pretrained=pretrained, weights_sha256=sha,
        quick_gelu=bool(quick_gelu or config.get("quick_gelu", False)),
        image_size=int(visual.image_size[0]), patch_grid=(int(grid[0]), int(grid[1])),
        width=int(visual.transformer.width), heads=int(block.attn.num_heads),
        layers=len(visual.transformer.resblocks), embed_dim=int(visual.output_dim),
        mean=tuple(float(m) for m in (getattr(visual, "image_mean", None) or CLIP_MEAN)),
        std=tuple(float(s) for s in (getattr(visual, "image_std", None) or CLIP_STD)),
    )
    return clip, spec


def adjacent_maps(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temporal maps from patch queries and keys [B, T, P, H, D] -> (A_prev, A_next), each [B, T-1, P, P].

    A_prev[:, t-1] = mean_h softmax(q_t . k_{t-1} / sqrt(D)) for t = 1..T-1;
    A_next[:, t]   = mean_h softmax(q_t . k_{t+1} / sqrt(D)) for t = 0..T-2.
    Computed in float32 on every device, under autocast too: a float16 q . k loses about 1e-2 of the
    maps and overflows to inf for large logits, which turns their rows into NaN.
    """
    with torch.autocast(q.device.type, enabled=False):
        q = q.float().permute(0, 1, 3, 2, 4)  # [B, T, H, P, D]
        k = k.float().permute(0, 1, 3, 2, 4)
        scale = q.shape[-1] ** -0.5
        prev = torch.softmax(q[:, 1:] @ k[:, :-1].transpose(-1, -2) * scale, dim=-1).mean(dim=2)
        nxt = torch.softmax(q[:, :-1] @ k[:, 1:].transpose(-1, -2) * scale, dim=-1).mean(dim=2)
    return prev, nxt


class FrozenBackbone(nn.Module):
    """The image tower of a CLIP model, capturing what the EVL decoder and CLIP heads need."""

    def __init__(self, visual: nn.Module, blocks: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        resblocks = visual.transformer.resblocks
        if not 0 <= blocks <= len(resblocks):
            raise BackboneError(f"--blocks {blocks} is not in 0..{len(resblocks)} (the model's blocks)")
        for block in resblocks[len(resblocks) - blocks:]:
            if not isinstance(getattr(block, "attn", None), nn.MultiheadAttention) or not hasattr(block, "ln_1"):
                raise BackboneError("unsupported image tower: blocks need ln_1 and a MultiheadAttention")
        self.visual = visual.eval().requires_grad_(False)
        self.block_indices = list(range(len(resblocks) - blocks, len(resblocks)))
        grid = visual.grid_size
        self.tokens = 1 + int(grid[0]) * int(grid[1])  # CLS and patches; any prompt tokens follow, not kept
        self.batch_first = getattr(visual.transformer, "batch_first", True)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self._captured: dict[str, torch.Tensor] = {}
        for i in self.block_indices:
            block = resblocks[i]
            block.ln_1.register_forward_hook(self._capture(f"qk{i}", block.attn))
            block.register_forward_hook(self._capture(f"out{i}", None))

    def _capture(self, key: str, attn: nn.MultiheadAttention | None):
        def hook(module, inputs, output):
            x = output if self.batch_first else output.transpose(0, 1)
            if attn is not None:  # q and k: the in-projection of ln_1(x), without scaling, in float32
                width = attn.embed_dim
                with torch.autocast(x.device.type, enabled=False):
                    x = nn.functional.linear(x.float(), attn.in_proj_weight[: 2 * width].float(),
                                             attn.in_proj_bias[: 2 * width].float())
            self._captured[key] = x
        return hook

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> BackboneOutput:
        """pixels: uint8 [B, T, 3, S, S] -> BackboneOutput (maps from float32 q and k, float32 on every
        device; features in the compute dtype)."""
        batch, frames = pixels.shape[:2]
        x = pixels.flatten(0, 1).float().div_(255).sub_(self.mean).div_(self.std)
        self._captured.clear()
        embeddings = self.visual(x)
        outputs, prevs, nexts = [], [], []
        heads = self.visual.transformer.resblocks[0].attn.num_heads
        for i in self.block_indices:
            out = self._captured.pop(f"out{i}")[:, :self.tokens]
            outputs.append(out.reshape(batch, frames, *out.shape[1:]))
            qk = self._captured.pop(f"qk{i}")[:, 1:self.tokens]
            width = qk.shape[-1] // 2
            qk = qk.reshape(batch, frames, self.tokens - 1, 2, heads, width // heads)
            prev, nxt = adjacent_maps(qk[..., 0, :, :], qk[..., 1, :, :])
            prevs.append(prev)
            nexts.append(nxt)
        return BackboneOutput(outputs, prevs, nexts, embeddings.reshape(batch, frames, -1))

