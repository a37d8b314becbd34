"""CLIP zero-shot video recognition from the cache (the ViFi-CLIP baseline), with no training.

Per clip view: the cached per-frame CLIP embeddings (projected CLS, pre-normalisation) averaged over
frames, L2-normalised. Per class: CLIP's text tower on a prompt (the bare class name, one template,
or several templates averaged in embedding space), L2-normalised. Logits: CLIP's logit scale times
the cosine similarity. A video's score is the softmax averaged over its views, as evaluation does.
Only the cache's `embed` array is read, and only the text half of CLIP is kept in memory.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import option
from .data import CacheDataset, CacheLoader, class_label_map, select_embeddings, usable_videos
from .errors import EvlCacheError
from .evaluate import predict_views
from .metrics import average_views, classification_metrics
from .model import TextHeadModel
from .store import FeatureStore
from .text import BARE_NAME, ClassPrompts, load_text_tower, read_templates
from .videos import read_class_names

log = logging.getLogger(__name__)


@dataclass
class ZeroShotConfig:
    """Options of `evl-cache zeroshot`."""
    features: Path = option(None, "the cache (*.zarr or *.h5)")
    split: str = option("val", "which videos of the cache: val, test, train, none or all")
    templates: Path | None = option(None, "prompt templates, one per line with {} for the class name; several "
                                          "are averaged in embedding space [default: the bare class name]")
    classes: Path | None = option(None, "class names for the prompts: one per cache class in the cache's order "
                                        "(readable names for CamelCase or id folders), or a subset of the "
                                        "cache's names [default: the cache's]")
    pretrained: str | None = option(None, "CLIP weights file instead of the cache's tag/file "
                                          "(must have the cache's sha256)")
    batch_size: int = option(256, "clip views per batch")
    workers: int = option(2, "threads that read the cache ahead (0: read in the scoring loop)")
    device: str = option("auto", "cuda, cpu, or auto (cuda if available)")


def zeroshot_scores(config: ZeroShotConfig) -> tuple[list[str], dict[str, np.ndarray]]:
    """(the scored class names, per-video `average_views` scores: videos, probabilities, logits, labels)."""
    from .extract import resolve_device

    if config.features is None:
        raise EvlCacheError("--features is required")
    device = resolve_device(config.device)
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
    templates = read_templates(config.templates) if config.templates else [BARE_NAME]
    tower, tokenizer = load_text_tower(attrs["backbone"], attrs["sampling"]["seed"], config.pretrained)
    model = TextHeadModel(ClassPrompts(tower, tokenizer, names, templates)).to(device).eval()
    selection = select_embeddings(attrs, None, 1)
    loader = CacheLoader.sequential(CacheDataset(config.features, videos, selection, views="all", label_map=label_map),
                                    config.batch_size, config.workers, device.type == "cuda")
    return names, average_views(*predict_views(model, loader, device, device.type == "cuda"))


def zeroshot(config: ZeroShotConfig) -> dict:
    """Zero-shot top-1, top-5 and mean class accuracy of the cache's split, views averaged."""
    names, scores = zeroshot_scores(config)
    metrics = classification_metrics(scores["probabilities"], scores["labels"], len(names))
    templates = read_templates(config.templates) if config.templates else [BARE_NAME]
    result = {"videos": metrics["videos"], "classes": len(names), "templates": templates,
              "top1": metrics["top1"], "top5": metrics["top5"],
              "mean_class_accuracy": metrics["mean_class_accuracy"],
              "per_class_accuracy": dict(zip(names, metrics["per_class_accuracy"]))}
    log.info("zeroshot: %s (%s, %d videos, %d classes, %d template(s)): top-1 %.4f, top-5 %.4f, "
             "mean class accuracy %.4f", config.features, config.split, result["videos"], len(names),
             len(templates), result["top1"], result["top5"], result["mean_class_accuracy"])
    return result
