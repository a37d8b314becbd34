"""Predict classes of new videos with a run: backbone and decoder online, the run's own sampling.

The backbone's outputs pass through the run's cache's storage encoding (float16, or int8/fp8/int4
codes with their scales, and the cache's calibration), as they do in the cache, so a video predicted
here gets the same logits as the same video evaluated from a cache.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..cache.calibration import block_channels
from ..cache.dataset import FeatureSelection
from ..cache.encodings import as_stored, stored_encoding
from ..cache.store import cache_storage
from ..config import option, shared
from ..decoder.run import build_model, check_fixed_classes, load_run, load_weights, run_class_names, run_head
from ..errors import CheckpointError, EvlCacheError
from ..runtime import bind_device, resolve_device
from ..towers.backbone import FrozenBackbone, load_clip
from ..video.clips import ClipSpec, read_video_clips
from ..video.find import expand_video_inputs, read_class_names

log = logging.getLogger(__name__)


@dataclass
class PredictConfig:
    """Options of `evl-cache predict`."""
    videos: list[str] = option([], "video files, folders of videos, or list files", argument=True)
    run: Path = option(None, "run folder (trained, or imported with import-evl)")
    topk: int = option(5, "classes to show per video")
    weights: str = shared("weights")
    pretrained: str | None = option(None, "backbone weights file to use instead of the run's tag/file "
                                          "(must have the run's sha256)")
    device: str = shared("device")
    classes: Path | None = option(None, "class names to score against, one per line (text and clip-text runs) "
                                        "[default: the run's own]")
    decode_timeout: float = shared("decode_timeout")


@dataclass
class Prediction:
    """One video's result: averaged probabilities and logits over its views, or an error."""
    path: str
    error: str = ""
    probabilities: list[float] = field(default_factory=list)
    logits: list[float] = field(default_factory=list)

    def top(self, class_names: list[str], k: int) -> list[tuple[str, float]]:
        order = sorted(range(len(self.probabilities)), key=lambda i: -self.probabilities[i])[:k]
        return [(class_names[i], self.probabilities[i]) for i in order]


class OnlineModel:
    """A run's backbone and decoder together: clips in, per-view logits out."""

    def __init__(self, run: str | Path, weights: str = "best", pretrained: str | None = None,
                 device: str = "auto", classes: list[str] | None = None):
        self.run_config = load_run(run)
        check_fixed_classes(run_head(self.run_config), classes)
        cache = self.run_config["cache"]
        backbone = cache["backbone"]
        self.device = bind_device(resolve_device(device))
        # built on the CPU: only the image tower goes to the device (the text heads build their own text tower)
        clip, spec = load_clip(backbone["model"], pretrained or backbone["pretrained"], cache["preprocessing"]["size"],
                               "cpu", seed=cache["sampling"]["seed"])
        if spec.weights_sha256 != backbone["weights_sha256"]:
            raise CheckpointError(f"backbone weights sha256 {spec.weights_sha256[:12]} differ from the run's "
                                  f"{backbone['weights_sha256'][:12]}", pretrained or backbone["pretrained"])
        selection = self.run_config["selection"]
        self.selection = FeatureSelection(tuple(selection["blocks"]), selection["frame_start"], selection["frames"],
                                          selection["frame_step"], selection["maps"], selection.get("embed", False))
        # A text-head run needs only the per-frame embeddings: capture one block, use none.
        blocks = max(len(self.selection.blocks), 1)
        preprocessing = cache["preprocessing"]  # the cache's normalisation, which may not be the model's
        self.backbone = FrozenBackbone(clip.visual, blocks, preprocessing["mean"], preprocessing["std"],
                                       backbone["model"]).to(self.device)
        if not self.selection.embed and self.backbone.block_indices != list(self.selection.blocks):
            raise CheckpointError("the run's blocks are not the backbone's last blocks", run)
        self.class_names: list[str] = list(classes) if classes is not None else run_class_names(self.run_config)
        self.model = build_model(self.run_config, classes, pretrained).to(self.device).eval()
        weights_path = Path(run) / f"{weights}.safetensors"
        if not weights_path.exists():
            raise CheckpointError(f"no {weights} weights in the run", weights_path)
        load_weights(self.model, load_file(weights_path), weights_path)
        self.clip_spec = ClipSpec.from_cache(cache)
        storage = cache_storage(cache)
        self.encoding = stored_encoding(storage)
        self.channels = [block_channels(storage, b) for b in self.selection.blocks]

    @torch.no_grad()
    def model_inputs(self, clips: torch.Tensor, maps: bool | None = None) -> tuple:
        """The model's arguments for uint8 clips [V, T, 3, S, S], as the run's cache would give them:
        (block outputs, prev maps, next maps), or (frame embeddings,) for a text head. `maps` True gives
        the adjacent-frame maps even to a run that does not read them (None: as the run reads)."""
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            output = self.backbone(clips.to(self.device))
        frames = self.selection.frame_indices
        pairs = slice(self.selection.frame_start, self.selection.frame_start + self.selection.frames - 1)

        def as_cached(tensor: torch.Tensor, signed: bool, channels=None) -> torch.Tensor:
            return as_stored(tensor, self.encoding, signed, channels=channels).float()

        if self.selection.embed:  # the embeddings are float16 in every cache
            return (output.embeddings[:, frames].to(torch.float16).float(),)
        tokens = [as_cached(t[:, frames], True, channels) for t, channels in zip(output.block_outputs, self.channels)]
        if not (self.selection.maps if maps is None else maps):
            return tokens, None, None
        return (tokens, [as_cached(m[:, pairs], signed=False) for m in output.maps_prev],
                [as_cached(m[:, pairs], signed=False) for m in output.maps_next])

    @torch.no_grad()
    def logits(self, clips: torch.Tensor) -> torch.Tensor:
        """uint8 clips [V, T, 3, S, S] -> logits [V, classes]."""
        inputs = self.model_inputs(clips)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            return self.model(*inputs).float().cpu()

    def predict(self, path: str | Path, timeout: float | None = None) -> Prediction:
        """Views of the video per the run's sampling; softmax and logits averaged over them. A video
        that takes longer than `timeout` seconds to decode gets an error (as in extraction)."""
        if "://" in str(path):
            return Prediction(str(path), error="URLs are not read: download the video and pass the file")
        clips = read_video_clips(path, "val", 0, self.clip_spec, timeout)
        if clips.clips is None:
            return Prediction(str(path), error=clips.error)
        logits = self.logits(clips.clips)
        return Prediction(str(path), probabilities=logits.softmax(-1).mean(0).tolist(),
                          logits=logits.mean(0).tolist())


def prediction_classes(config: PredictConfig) -> list[str] | None:
    """The class list of `--classes`, or None for the run's own."""
    return read_class_names(config.classes) if config.classes is not None else None


def predicted_class_names(config: PredictConfig) -> list[str]:
    """The names the probabilities of `predict(config)` belong to, in order."""
    return prediction_classes(config) or run_class_names(load_run(config.run))


def predict(config: PredictConfig) -> list[Prediction]:
    """Predictions for every video named by `config.videos`; a video that fails carries its error (the
    command exits 1 only when every video failed)."""
    if config.run is None:
        raise EvlCacheError("--run is required")
    if config.decode_timeout < 0:
        raise EvlCacheError("--decode-timeout must be 0 (no limit) or more")
    paths = expand_video_inputs(config.videos)
    online = OnlineModel(config.run, config.weights, config.pretrained, config.device, prediction_classes(config))
    predictions = []
    for path in paths:
        prediction = online.predict(path, config.decode_timeout)
        if prediction.error:
            log.warning("failed: %s: %s", path, prediction.error)
        predictions.append(prediction)
    return predictions
