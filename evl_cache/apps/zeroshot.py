"""CLIP zero-shot video recognition from the cache (the ViFi-CLIP baseline), with no training.

Per clip view: the cached per-frame CLIP embeddings (projected CLS, pre-normalisation) averaged over
frames, L2-normalised. Per class: CLIP's text tower on a prompt (the bare class name, one template,
or several templates averaged in embedding space), L2-normalised. Logits: CLIP's logit scale times
the cosine similarity. A video's score is the softmax averaged over its views, as evaluation does.
Only the cache's `embed` array is read, and only the text half of CLIP is kept in memory.

A cache extracted with weights converted from a text-prompted ViFi-CLIP model (`import-vificlip`)
prompts with its learned context vectors instead of templates, as ViFi-CLIP evaluates it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.dataset import CacheDataset, CacheLoader, class_label_map, select_embeddings, usable_videos
from ..cache.store import FeatureStore
from ..config import option, shared
from ..decoder.metrics import average_views, classification_metrics
from ..decoder.model import TextHeadModel
from ..decoder.run import predict_views
from ..errors import EvlCacheError
from ..runtime import bind_device, resolve_device
from ..towers.text import BARE_NAME, ClassPrompts, load_text_tower, read_templates
from ..towers.vificlip import learned_prompt, prompt_class_names
from ..video.find import read_class_names

log = logging.getLogger(__name__)


@dataclass
class ZeroShotConfig:
    """Options of `evl-cache zeroshot`."""
    features: Path = option(None, "the cache (*.zarr or *.h5)")
    split: str = shared("split")
    templates: Path | None = option(None, "prompt templates, one per line with {} for the class name; several "
                                          "are averaged in embedding space [default: the bare class name]")
    classes: Path | None = option(None, "class names for the prompts: one per cache class in the cache's order "
                                        "(readable names for CamelCase or id folders), or a subset of the "
                                        "cache's names [default: the cache's]")
    pretrained: str | None = option(None, "CLIP weights file instead of the cache's tag/file "
                                          "(must have the cache's sha256)")
    batch_size: int = option(256, "clip views per batch")
    workers: int = option(2, "threads that read the cache ahead (0: read in the scoring loop)")
    device: str = shared("device")


def class_prompts(attrs: dict, names: list[str], templates: Path | None, pretrained: str | None) -> ClassPrompts:
    """The prompts for `names` with the text tower of a cache's backbone: the backbone's learned ViFi-CLIP
    context if its weights file has one, else the templates (default: the bare class name)."""
    tower, tokenizer = load_text_tower(attrs["backbone"], attrs["sampling"]["seed"], pretrained)
    weights = pretrained or attrs["backbone"]["pretrained"]
    learned = learned_prompt(weights)
    if learned is None:
        return ClassPrompts(tower, tokenizer, names, read_templates(templates) if templates else [BARE_NAME])
    if templates is not None:
        raise EvlCacheError("the backbone's weights carry ViFi-CLIP's learned prompt context, which replaces "
                            "templates: leave out --templates", weights)
    vectors, prefix = learned
    return ClassPrompts(tower, tokenizer, prompt_class_names(names), context_vectors=vectors, context_prefix=prefix)


def zeroshot_scores(config: ZeroShotConfig) -> tuple[list[str], dict[str, np.ndarray], ClassPrompts]:
    """(the scored class names, per-video `average_views` scores: videos, probabilities, logits, labels,
    and the prompts they were scored against)."""

    if config.features is None:
        raise EvlCacheError("--features is required")
    device = bind_device(resolve_device(config.device))
    with FeatureStore(config.features) as store:
        attrs = store.check_version()
        splits = ("train", "val", "test", "none") if config.split == "all" else (config.split,)
        videos = usable_videos(store, splits)
        cache_labels = store.column("label")
    names = read_class_names(config.classes) if config.classes else list(attrs["class_names"])
    label_map = class_label_map(attrs["class_names"], names, allow_rename=True)
    videos = videos[label_map[cache_labels[videos]] >= 0]
    if len(videos) == 0:
        raise EvlCacheError(f"no finished, labelled videos of the scored classes in split {config.split!r}",
                            config.features)
    prompts = class_prompts(attrs, names, config.templates, config.pretrained)
    model = TextHeadModel(prompts).to(device).eval()
    selection = select_embeddings(attrs, None, 1)
    loader = CacheLoader.sequential(CacheDataset(config.features, videos, selection, views="all", label_map=label_map),
                                    config.batch_size, config.workers, device.type == "cuda")
    return names, average_views(*predict_views(model, loader, device, device.type == "cuda")), prompts


def zeroshot(config: ZeroShotConfig) -> dict:
    """Zero-shot top-1, top-5 and mean class accuracy of the cache's split, views averaged."""
    names, scores, prompts = zeroshot_scores(config)
    metrics = classification_metrics(scores["probabilities"], scores["labels"], len(names))
    templates = [] if prompts.context is not None else prompts.templates
    result = {"videos": metrics["videos"], "classes": len(names), "templates": templates,
              "context_tokens": prompts.context_tokens, "top1": metrics["top1"], "top5": metrics["top5"],
              "mean_class_accuracy": metrics["mean_class_accuracy"],
              "per_class_accuracy": dict(zip(names, metrics["per_class_accuracy"]))}
    log.info("zeroshot: %s (%s, %d videos, %d classes, %s): top-1 %.4f, top-5 %.4f, mean class accuracy %.4f",
             config.features, config.split, result["videos"], len(names), prompt_description(result),
             result["top1"], result["top5"], result["mean_class_accuracy"])
    return result


def prompt_description(result: dict) -> str:
    """How a zeroshot result's classes were prompted, in words."""
    if result["context_tokens"]:
        return f"learned prompt context of {result['context_tokens']} vectors"
    return f"{len(result['templates'])} template(s)"
