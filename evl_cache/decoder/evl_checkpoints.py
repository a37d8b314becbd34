"""The authors' EVL checkpoints (evl-model.md section 7): import them as runs, export runs to them.

An authors' checkpoint is a `torch.save` dict whose `model` holds a DataParallel state dict
(`module.` prefix) of `decoder.*` and `proj.*`; the frozen backbone is not in it. Our `EVLModel` uses
the same parameter names, so the conversion only strips or adds the prefix, after checking every key
and shape. The decoder's shape (layers, width, classes, frames, grid, MLP width, temporal modules) is
read from the weights; what weights cannot say (heads, stride, views) comes from the options.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..cache.dataset import FeatureSelection
from ..config import option, shared
from ..errors import CheckpointError, EvlCacheError
from ..runtime import library_versions
from ..towers.backbone import load_clip, sha256_file
from ..towers.checkpoint_files import DATA_PARALLEL_PREFIX, load_checkpoint, load_exactly, model_state
from ..video.clips import ClipSpec
from ..video.find import read_class_names
from .model import DecoderConfig, EVLModel
from .run import load_run

log = logging.getLogger(__name__)


@dataclass
class ImportConfig:
    """Options of `evl-cache import-evl`."""
    checkpoint: Path = option(None, "the authors' checkpoint (.pth/.pt)", argument=True)
    out: Path = option(None, "run folder to write")
    model: str = option("ViT-B-16", "open_clip model of the checkpoint's backbone")
    pretrained: str = option("openai", "the backbone's weights: open_clip tag or local file")
    classes: Path | None = option(None, "class names: the authors' JSON mapping or a plain list")
    frames: int | None = option(None, "frames per clip [default: from the checkpoint]")
    stride: int = shared("stride")
    eval_views: int = shared("eval_views")
    heads: int | None = option(None, "decoder heads [default: the backbone's]")
    size: int | None = option(None, "input size [default: the model's own]")


def read_evl_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The decoder/head state dict of an authors' checkpoint, without the `module.` prefix."""
    state = model_state(load_checkpoint(path), path)
    unknown = sorted(k for k in state if not k.startswith(("decoder.", "proj.")))
    if unknown:
        raise CheckpointError(f"unexpected keys for an EVL decoder checkpoint: {', '.join(unknown[:5])}", path)
    return state


def infer_decoder(state: dict[str, torch.Tensor], grid: tuple[int, int], heads: int,
                  path: str | Path) -> DecoderConfig:
    """The DecoderConfig whose parameters have exactly these names and shapes."""
    def need(key: str) -> torch.Tensor:
        if key not in state:
            raise CheckpointError(f"missing key {key}", path)
        return state[key]

    layers = len({m.group(1) for k in state if (m := re.match(r"decoder\.decoder_layers\.(\d+)\.", k))})
    if layers == 0:
        raise CheckpointError("no decoder layers (decoder.decoder_layers.N.*)", path)
    width = need("decoder.cls_token").numel()
    fc1 = need("decoder.decoder_layers.0.mlp.fc1.weight")
    pos = state.get("decoder.temporal_pos_embed.0")
    w1 = state.get("decoder.cross_attention.0.w1")
    if w1 is not None and w1.shape[0] != (2 * grid[0] - 1) * (2 * grid[1] - 1):
        raise CheckpointError(f"cross-attention weights are for another patch grid than the backbone's {grid}", path)
    return DecoderConfig(
        width=width, grid=grid, frames=int(pos.shape[0]) if pos is not None else 0, num_classes=int(
            need("proj.2.weight").shape[0]), layers=layers, heads=heads,
        qkv_dim=int(need("decoder.decoder_layers.0.attn.q_proj.weight").shape[0]),
        mlp_factor=fc1.shape[0] / width, temporal_conv="decoder.temporal_conv.0.weight" in state,
        temporal_pos_embed=pos is not None, temporal_cross_attention=w1 is not None)


def import_evl(config: ImportConfig) -> Path:
    """Turn an authors' checkpoint into a run folder that `eval` and `predict` accept."""
    if config.checkpoint is None or config.out is None:
        raise EvlCacheError("a CHECKPOINT and --out are required")
    state = read_evl_state(config.checkpoint)
    _, spec = load_clip(config.model, config.pretrained, config.size)
    if spec.family != "openclip":
        raise CheckpointError(f"the authors' decoders read OpenAI CLIP towers (open_clip ViTs, a class token); "
                              f"{config.model} is a {spec.family} tower", config.checkpoint)
    decoder = infer_decoder(state, spec.patch_grid, config.heads or spec.heads, config.checkpoint)
    if decoder.width != spec.width:
        raise CheckpointError(f"decoder width {decoder.width} does not match {config.model}'s width {spec.width}",
                              config.checkpoint)
    if decoder.layers > spec.layers:
        raise CheckpointError(f"{decoder.layers} decoder layers but {config.model} has {spec.layers} blocks",
                              config.checkpoint)
    if decoder.frames and config.frames and decoder.frames != config.frames:
        raise CheckpointError(f"the checkpoint is for {decoder.frames} frames, --frames says {config.frames}",
                              config.checkpoint)
    decoder.frames = decoder.frames or config.frames or 8
    class_names = read_class_names(config.classes) if config.classes else [str(i) for i in range(decoder.num_classes)]
    if len(class_names) != decoder.num_classes:
        raise CheckpointError(f"the head has {decoder.num_classes} classes, {config.classes} names "
                              f"{len(class_names)}", config.checkpoint)
    model = EVLModel(decoder)
    load_exactly(model, state, config.checkpoint, "the decoder")
    clip_spec = ClipSpec("dense", decoder.frames, config.stride, config.eval_views, 1,
                         config.size or spec.image_size, 0)
    blocks = list(range(spec.layers - decoder.layers, spec.layers))
    digest = sha256_file(config.checkpoint)
    run_config = {
        "train": None,
        "imported": {"checkpoint": str(config.checkpoint), "sha256": digest, "format": "evl-authors"},
        "decoder": asdict(decoder),
        "selection": asdict(FeatureSelection(tuple(blocks), 0, decoder.frames, 1, decoder.temporal_cross_attention)),
        "cache": {"path": None, "fingerprint": None, "backbone": spec.to_dict(), "blocks": blocks,
                  "sampling": clip_spec.sampling_record(), "class_names": class_names,
                  "preprocessing": clip_spec.preprocessing_record(spec.mean, spec.std)},
        "versions": library_versions(),
    }
    out = Path(config.out)
    if (out / "config.json").exists():
        raise EvlCacheError("run folder exists already", out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(json.loads(json.dumps(run_config)), indent=2))
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(weights, out / "best.safetensors")
    save_file(weights, out / "last.safetensors")
    log.info("import-evl: %s -> %s (%d layers, %d frames, %d classes, backbone %s %s)", config.checkpoint, out,
             decoder.layers, decoder.frames, decoder.num_classes, spec.model, spec.pretrained)
    return out


@dataclass
class ExportConfig:
    """Options of `evl-cache export-evl`."""
    run: Path = option(None, "run folder to export", argument=True)
    out: Path = option(None, "checkpoint file to write")
    weights: str = shared("weights")


def export_evl(config: ExportConfig) -> Path:
    """Write a run's weights as an authors' checkpoint (`{'model': {'module.' + name: tensor}}`)."""
    run, out, weights = config.run, config.out, config.weights
    if run is None or out is None:
        raise EvlCacheError("a run folder and --out are required")
    run_config = load_run(run)
    head = (run_config.get("head") or {"kind": "linear"})["kind"]
    if head != "linear":
        raise CheckpointError(f"a {head} run has no EVL linear head: the authors' format cannot hold it", run)
    prefix = run_config["decoder"].get("prefix_tokens", DecoderConfig.prefix_tokens)
    if prefix != 1:
        raise CheckpointError(f"the authors' decoder reads one class token per frame; this run's tower has {prefix} "
                              f"prefix tokens", run)
    path = Path(run) / f"{weights}.safetensors"
    if not path.exists():
        raise CheckpointError(f"no {weights} weights in the run", path)
    state = load_file(path)
    torch.save({"model": {DATA_PARALLEL_PREFIX + k: v for k, v in state.items()}}, out)
    log.info("export-evl: %s -> %s (%d tensors)", path, out, len(state))
    return Path(out)
