"""Evaluate a trained run on a cache: views averaged per video, top-1/top-5, per-class files."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from .config import option
from .data import CacheDataset, collate, model_inputs, select_features, usable_videos, worker_init
from .errors import CacheError, CheckpointError, EvlCacheError
from .model import DecoderConfig, EVLModel
from .metrics import average_views, classification_metrics, plot_confusion, write_per_class_csv
from .store import FeatureStore

log = logging.getLogger(__name__)


@dataclass
class EvalConfig:
    """Options of `evl-cache eval`."""
    run: Path = option(None, "run folder written by `evl-cache train`")
    features: Path | None = option(None, "cache to evaluate on [default: the run's own cache]")
    split: str = option("val", "which videos of the cache: val, test, train, none or all")
    weights: str = option("best", "which weights of the run: best or last", choices=("best", "last"))
    batch_size: int = option(64, "clips per batch")
    workers: int = option(2, "DataLoader worker processes")
    device: str = option("auto", "cuda, cpu, or auto (cuda if available)")


@torch.no_grad()
def predict_views(model: torch.nn.Module, loader: DataLoader, device: torch.device,
                  use_amp: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probabilities, logits, video indices, labels), one row per cached view."""
    was_training = model.training
    model.eval()
    probabilities, logits, videos, labels = [], [], [], []
    for batch in loader:
        tokens, prev, nxt = model_inputs(batch, device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            out = model(tokens, prev, nxt).float()
        logits.append(out.cpu())
        probabilities.append(out.softmax(-1).cpu())
        videos.append(batch["video"])
        labels.append(batch["label"])
    model.train(was_training)
    return torch.cat(probabilities), torch.cat(logits), torch.cat(videos), torch.cat(labels)


def write_evaluation(out: Path, name: str, metrics: dict, class_names: list[str]) -> None:
    """eval_NAME.json, per_class_NAME.csv and confusion_NAME.png in the run folder."""
    summary = {k: v for k, v in metrics.items() if k != "confusion"}
    (out / f"eval_{name}.json").write_text(json.dumps(summary, indent=2))
    write_per_class_csv(out / f"per_class_{name}.csv", metrics, class_names)
    plot_confusion(out / f"confusion_{name}.png", metrics["confusion"], class_names)


def load_run(run: str | Path) -> dict:
    """A run folder's config.json."""
    path = Path(run) / "config.json"
    if not path.exists():
        raise CheckpointError("not a run folder (no config.json)", run)
    return json.loads(path.read_text())


def build_model(run_config: dict) -> EVLModel:
    """The model a run's config.json describes."""
    decoder = dict(run_config["decoder"])
    decoder["grid"] = tuple(decoder["grid"])
    return EVLModel(DecoderConfig(**decoder))


def check_cache_serves_run(attrs: dict, run_config: dict, path: Path) -> None:
    """Refuse a cache whose backbone, preprocessing or classes differ from the run's."""
    run_cache = run_config["cache"]
    if attrs["backbone"]["weights_sha256"] != run_cache["backbone"]["weights_sha256"]:
        raise CacheError(f"backbone weights differ from the run's (sha256 {attrs['backbone']['weights_sha256'][:12]} "
                         f"vs {run_cache['backbone']['weights_sha256'][:12]}): features would not match", path)
    for key in ("preprocessing",):
        if attrs[key] != run_cache[key]:
            raise CacheError(f"{key} differs from the run's cache: {attrs[key]} vs {run_cache[key]}", path)
    for key in ("frames", "stride", "mode"):
        if attrs["sampling"][key] != run_cache["sampling"][key]:
            raise CacheError(f"sampling {key} is {attrs['sampling'][key]}, the run was trained on "
                             f"{run_cache['sampling'][key]}", path)
    if attrs["class_names"] != run_cache["class_names"]:
        raise CacheError("class names differ from the run's", path)


def evaluate(config: EvalConfig) -> dict:
    """Metrics of a run on a cache's split; writes eval/per-class/confusion files into the run folder."""
    from .extract import resolve_device

    if config.run is None:
        raise EvlCacheError("--run is required")
    run_config = load_run(config.run)
    if config.features is None and not run_config["cache"].get("path"):
        raise EvlCacheError("this run has no cache of its own (it was imported): pass --features CACHE")
    features = Path(config.features or run_config["cache"]["path"])
    weights_path = Path(config.run) / f"{config.weights}.safetensors"
    if not weights_path.exists():
        raise CheckpointError(f"no {config.weights} weights in the run", weights_path)
    device = resolve_device(config.device)
    with FeatureStore(features) as store:
        attrs = store.check_version()
        check_cache_serves_run(attrs, run_config, features)
        splits = ("train", "val", "test", "none") if config.split == "all" else (config.split,)
        videos = usable_videos(store, splits)
    if len(videos) == 0:
        raise EvlCacheError(f"no finished, labelled videos in split {config.split!r}", features)
    decoder = run_config["decoder"]
    selection = select_features(attrs, decoder["layers"], decoder["frames"], run_config["selection"]["frame_step"],
                                decoder["temporal_cross_attention"])
    model = build_model(run_config).to(device)
    try:
        model.load_state_dict(load_file(weights_path))
    except RuntimeError as error:
        raise CheckpointError(f"weights do not fit the run's model: {str(error).splitlines()[0]}",
                              weights_path) from None
    loader = DataLoader(CacheDataset(features, videos, selection, views="all"), batch_size=config.batch_size,
                        collate_fn=collate, num_workers=config.workers, worker_init_fn=worker_init)
    scores = average_views(*predict_views(model, loader, device, device.type == "cuda"))
    metrics = classification_metrics(scores["probabilities"], scores["labels"], len(attrs["class_names"]))
    name = config.split if config.features is None else f"{config.split}_{Path(features).stem}"
    write_evaluation(Path(config.run), name, metrics, attrs["class_names"])
    log.info("eval: %s on %s (%s, %d videos): top-1 %.4f, top-5 %.4f, mean class accuracy %.4f",
             config.run, features, config.split, metrics["videos"], metrics["top1"], metrics["top5"],
             metrics["mean_class_accuracy"])
    return {k: v for k, v in metrics.items() if k != "confusion"}
