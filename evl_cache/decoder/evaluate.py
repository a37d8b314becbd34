"""Evaluate a trained run on a cache: views averaged per video, top-1/top-5, per-class files."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import load_file

from ..cache.dataset import CacheDataset, CacheLoader, class_label_map, usable_videos
from ..cache.store import FeatureStore, location
from ..config import option, shared
from ..errors import CheckpointError, EvlCacheError
from ..runtime import bind_device, resolve_device
from ..video.find import read_class_names
from .metrics import average_views, classification_metrics
from .run import (
    TEXT_HEADS,
    add_novel,
    build_model,
    check_cache_serves_run,
    check_fixed_classes,
    load_run,
    load_weights,
    predict_views,
    run_class_names,
    run_head,
    run_selection,
    write_evaluation,
)

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Options of `evl-cache eval`."""
    run: Path = option(None, "run folder written by `evl-cache train`")
    features: Path | None = option(None, "cache to evaluate on [default: the run's own cache]")
    split: str = shared("split")
    weights: str = shared("weights")
    batch_size: int = option(64, "clips per batch")
    workers: int = option(2, "threads that read the cache ahead (0: read in the evaluation loop)")
    device: str = shared("device")
    classes: Path | None = option(None, "class names to score against (text and clip-text runs): names of "
                                        "the cache's classes (a subset), or one per cache class in its order "
                                        "(a rename) [default: the run's own]")
    pretrained: str | None = option(None, "CLIP weights file for the text tower instead of the run's tag/file "
                                          "(must have the run's sha256)")


def evaluate(config: EvalConfig) -> dict:
    """Metrics of a run on a cache's split; writes eval/per-class/confusion files into the run folder."""
    if config.run is None:
        raise EvlCacheError("--run is required")
    run_config = load_run(config.run)
    if config.features is None and not run_config["cache"].get("path"):
        raise EvlCacheError("this run has no cache of its own (it was imported): pass --features CACHE")
    features = location(config.features or run_config["cache"]["path"])
    weights_path = Path(config.run) / f"{config.weights}.safetensors"
    if not weights_path.exists():
        raise CheckpointError(f"no {config.weights} weights in the run", weights_path)
    device = bind_device(resolve_device(config.device))
    head = run_head(run_config)
    check_fixed_classes(head, [] if config.classes is not None else None)
    with FeatureStore(features) as store:
        attrs = store.check_version()
        check_cache_serves_run(attrs, run_config, features)
        splits = ("train", "val", "test", "none") if config.split == "all" else (config.split,)
        videos = usable_videos(store, splits)
        cache_labels = store.column("label")
    if len(videos) == 0:
        raise EvlCacheError(f"no finished, labelled videos in split {config.split!r}", features)
    # Which class lists to score: --classes, or the run's own (and, for base-to-novel, its novel classes).
    if config.classes is not None:
        class_lists = {"": read_class_names(config.classes)}
    else:
        class_lists = {"": run_class_names(run_config)}
        if head.get("novel_classes"):
            class_lists["novel"] = head["novel_classes"]
    selection = run_selection(attrs, run_config)
    model = build_model(run_config, class_lists[""] if head["kind"] in TEXT_HEADS else None, config.pretrained)
    model = model.to(device)
    load_weights(model, load_file(weights_path), weights_path)
    results = {}
    for part, names in class_lists.items():
        label_map = class_label_map(attrs["class_names"], names, allow_rename=config.classes is not None)
        scored = videos[label_map[cache_labels[videos]] >= 0]
        if len(scored) == 0:
            raise EvlCacheError(f"no videos of the {part or 'given'} classes in split {config.split!r}", features)
        if len(scored) < len(videos):
            log.info("eval: %d of %d videos belong to the %s classes (%d)", len(scored), len(videos),
                     part or "scored", len(names))
        if head["kind"] in TEXT_HEADS:
            model.text.set_classes(names)
        loader = CacheLoader.sequential(CacheDataset(features, scored, selection, views="all", label_map=label_map),
                                        config.batch_size, config.workers, device.type == "cuda")
        scores = average_views(*predict_views(model, loader, device, device.type == "cuda"))
        results[part] = classification_metrics(scores["probabilities"], scores["labels"], len(names))
    metrics = results[""] if "novel" not in results else add_novel(results[""], results["novel"])
    name = config.split if config.features is None else f"{config.split}_{Path(str(features).split('://')[-1]).stem}"
    if config.classes is not None:
        name += f"_{Path(config.classes).stem}"
    write_evaluation(Path(config.run), name, metrics, class_lists[""], class_lists.get("novel"))
    if "novel" in results:
        log.info("eval: base-to-novel: base top-1 %.4f, novel top-1 %.4f, harmonic mean %.4f", metrics["top1"],
                 metrics["novel"]["top1"], metrics["harmonic_mean"])
    log.info("eval: %s on %s (%s, %d videos): top-1 %.4f, top-5 %.4f, mean class accuracy %.4f",
             config.run, features, config.split, metrics["videos"], metrics["top1"], metrics["top5"],
             metrics["mean_class_accuracy"])
    summary = {k: v for k, v in metrics.items() if k != "confusion"}
    if "novel" in summary:
        summary["novel"] = {k: v for k, v in summary["novel"].items() if k != "confusion"}
    return summary
