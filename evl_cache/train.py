"""Stage two: train the EVL decoder and head from the cache (evl-model.md sections 3, 4 and 6).

`train(config)` reads top to bottom: open the cache, check it can serve the options, build the model,
then for each epoch: train, evaluate, log, checkpoint. A killed run continues with `--resume` from its
last finished epoch and reaches the same weights: the data order, the drawn views and the dropout
generator all restart from the saved state.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from .config import option, to_dict
from .data import (CacheDataset, collate, holdout_split, model_inputs, select_features, usable_videos,
                   worker_init)
from .errors import EvlCacheError
from .evaluate import predict_views, write_evaluation
from .extract import library_versions, resolve_device
from .metrics import average_views, classification_metrics, plot_curves
from .model import DecoderConfig, EVLModel
from .store import FeatureStore, cache_fingerprint

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of `evl-cache train` (defaults: the authors' recipe, evl-model.md section 6)."""
    features: Path = option(None, "the cache to train from (*.zarr or *.h5)")
    out: Path = option(None, "run folder to write (config, metrics, checkpoints, plots)")
    layers: int = option(4, "decoder layers N, on the last N cached blocks")
    heads: int | None = option(None, "decoder attention heads [default: the backbone's]")
    qkv_dim: int | None = option(None, "decoder attention width [default: the backbone width]")
    mlp_factor: float = option(4.0, "decoder MLP width over the backbone width")
    mlp_dropout: float = option(0.5, "dropout inside the decoder MLP")
    head_dropout: float = option(0.5, "dropout before the classification layer")
    temporal_conv: bool = option(True, "depthwise temporal convolution")
    temporal_pos_embed: bool = option(True, "temporal position embedding")
    temporal_cross_attention: bool = option(True, "temporal cross-attention on the cached maps")
    frames: int | None = option(None, "frames per clip [default: all cached]; fewer take a centred window")
    frame_step: int = option(1, "use every k-th cached frame (needs --no-temporal-cross-attention if > 1)")
    train_views: str = option("all", "cached training views: all (one drawn per epoch) or first",
                              choices=("all", "first"))
    epochs: int = option(50, "training epochs (ignored when --steps is given)")
    steps: int | None = option(None, "optimizer steps in total (sets the cosine schedule's length)")
    batch_size: int = option(256, "clips per optimizer step")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch-size must divide by it)")
    lr: float = option(4e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup_steps: int = option(0, "linear warm-up steps before the cosine decay")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    val_fraction: float = option(0.1, "hold-out fraction when the cache has no validation split")
    seed: int = option(0, "seed of initialisation, data order, views and dropout")
    device: str = option("auto", "cuda, cpu, or auto (cuda if available)")
    workers: int = option(2, "DataLoader worker processes")
    in_memory: bool = option(False, "hold the selected features in RAM (small datasets)")
    resume: bool = option(False, "continue a killed run in --out from its last finished epoch")
    overwrite: bool = option(False, "delete an existing run folder at --out first")


# Options that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {"resume", "overwrite", "workers", "device", "in_memory"}


@dataclass
class TrainSummary:
    run: Path
    epochs: int
    steps: int
    seconds: float
    best_top1: float
    final: dict

    def line(self) -> str:
        return (f"train: {self.epochs} epochs, {self.steps} steps in {self.seconds:.1f} s; best val top-1 "
                f"{self.best_top1:.4f}; last val top-1 {self.final.get('top1', float('nan')):.4f} "
                f"top-5 {self.final.get('top5', float('nan')):.4f}; run in {self.run}")


def cosine_lr(step: int, total: int, warmup: int) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to zero over `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _atomic_save(write, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    write(tmp)
    os.replace(tmp, path)


def _prepare_run_folder(config: TrainConfig, run_config: dict) -> dict | None:
    """Create the run folder, or check a resumed one; returns the saved training state if resuming."""
    out = Path(config.out)
    if out.exists() and config.overwrite:
        shutil.rmtree(out)
    saved_config = out / "config.json"
    if out.exists() and any(out.iterdir()) and not config.resume:
        raise EvlCacheError("run folder exists; pass --resume to continue it or --overwrite to start again", out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)
    if config.resume and saved_config.exists():
        old = json.loads(saved_config.read_text())
        diffs = [f"{k}: run has {old['train'].get(k)!r}, asked for {v!r}"
                 for k, v in run_config["train"].items()
                 if k not in RESUMABLE_CHANGES and old["train"].get(k) != v]
        if old.get("cache", {}).get("fingerprint") != run_config["cache"]["fingerprint"]:
            diffs.append("the cache differs from the one the run started on")
        if diffs:
            raise EvlCacheError("cannot resume with different options (" + "; ".join(diffs) + ")", out)
        latest = out / "checkpoints" / "LATEST"
        if latest.exists():
            state_dir = out / "checkpoints" / latest.read_text().strip()
            return {"weights": load_file(state_dir / "weights.safetensors"),
                    **torch.load(state_dir / "state.pt", weights_only=False)}
        return None
    saved_config.write_text(json.dumps(run_config, indent=2))
    return None


def _save_checkpoint(out: Path, model: EVLModel, state: dict) -> None:
    """Write epoch E's weights and state to checkpoints/epoch_E, then point LATEST at it."""
    name = f"epoch_{state['epoch']:04d}"
    folder = out / "checkpoints" / name
    if folder.exists():
        shutil.rmtree(folder)
    tmp = folder.with_name(name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, tmp / "weights.safetensors")
    torch.save(state, tmp / "state.pt")
    os.replace(tmp, folder)
    _atomic_save(lambda p: p.write_text(name), out / "checkpoints" / "LATEST")
    _atomic_save(lambda p: save_file(weights, p), out / "last.safetensors")
    for old in (out / "checkpoints").glob("epoch_*"):
        if old.name != name:
            shutil.rmtree(old)


def train(config: TrainConfig) -> TrainSummary:
    """Train and evaluate the EVL decoder on a cache; see TrainConfig for the options."""
    if config.features is None or config.out is None:
        raise EvlCacheError("--features and --out are required")
    if config.batch_size % config.grad_accum:
        raise EvlCacheError(f"--batch-size {config.batch_size} does not divide by --grad-accum {config.grad_accum}")
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)

    # The cache: what it holds, which videos train and which evaluate.
    with FeatureStore(config.features) as store:
        attrs = store.check_version()
        train_videos = usable_videos(store, ("train",))
        val_videos = usable_videos(store, ("val",))
        if len(val_videos) == 0:
            pool = usable_videos(store, ("train", "none"))
            train_videos, val_videos = holdout_split(pool, store.column("label")[pool], config.val_fraction,
                                                     config.seed)
            log.info("train: no validation split in the cache; holding out %d of %d videos (--val-fraction %s)",
                     len(val_videos), len(pool), config.val_fraction)
        fingerprint = cache_fingerprint(attrs)
    if len(train_videos) == 0:
        raise EvlCacheError("the cache has no finished, labelled training videos", config.features)
    selection = select_features(attrs, config.layers, config.frames, config.frame_step,
                                config.temporal_cross_attention)
    backbone = attrs["backbone"]
    decoder_config = DecoderConfig(
        width=backbone["width"], grid=tuple(backbone["patch_grid"]), frames=selection.frames,
        num_classes=len(attrs["class_names"]), layers=config.layers, heads=config.heads or backbone["heads"],
        qkv_dim=config.qkv_dim, mlp_factor=config.mlp_factor, mlp_dropout=config.mlp_dropout,
        head_dropout=config.head_dropout, temporal_conv=config.temporal_conv,
        temporal_pos_embed=config.temporal_pos_embed, temporal_cross_attention=config.temporal_cross_attention)
    run_config = {
        "train": to_dict(config), "decoder": asdict(decoder_config), "selection": asdict(selection),
        "cache": {"path": str(Path(config.features).resolve()), "fingerprint": fingerprint,
                  "backbone": backbone, "blocks": attrs["blocks"], "sampling": attrs["sampling"],
                  "preprocessing": attrs["preprocessing"], "class_names": attrs["class_names"]},
        "videos": {"train": len(train_videos), "val": len(val_videos)},
        "versions": library_versions(),
    }
    out = Path(config.out)
    resumed = _prepare_run_folder(config, run_config)

    # Model, optimizer, schedule.
    model = EVLModel(decoder_config).to(device)
    micro_batch = config.batch_size // config.grad_accum
    train_set = CacheDataset(config.features, train_videos, selection,
                             views="random" if config.train_views == "all" else "first",
                             seed=config.seed, in_memory=config.in_memory)
    val_set = CacheDataset(config.features, val_videos, selection, views="all", in_memory=config.in_memory)
    micro_per_epoch = math.ceil(len(train_set) / micro_batch)
    steps_per_epoch = math.ceil(micro_per_epoch / config.grad_accum)
    total_steps = config.steps or config.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, total_steps, config.warmup_steps))
    use_amp = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    start_epoch, step, best_top1 = 0, 0, -1.0
    metrics_path = out / "metrics.jsonl"
    if resumed is not None:
        model.load_state_dict(resumed["weights"])
        optimizer.load_state_dict(resumed["optimizer"])
        schedule.load_state_dict(resumed["schedule"])
        scaler.load_state_dict(resumed["scaler"])
        torch.set_rng_state(resumed["torch_rng"])
        start_epoch, step, best_top1 = resumed["epoch"] + 1, resumed["step"], resumed["best_top1"]
        kept = [line for line in metrics_path.read_text().splitlines()
                if json.loads(line).get("epoch", -1) <= resumed["epoch"]]
        metrics_path.write_text("".join(line + "\n" for line in kept))
        log.info("train: resuming %s after epoch %d (step %d)", out, resumed["epoch"], step)
    elif config.resume:
        log.info("train: nothing to resume in %s; starting from the beginning", out)
    log.info("train: %d train / %d val videos, %d classes, %d decoder parameters, %d steps (%d epochs of %d), "
             "device %s, reading blocks %s%s", len(train_videos), len(val_videos), decoder_config.num_classes,
             sum(p.numel() for p in model.parameters()), total_steps, epochs, steps_per_epoch, device,
             list(selection.blocks), " and maps" if selection.maps else "")
    loader_options = dict(collate_fn=collate, num_workers=config.workers, worker_init_fn=worker_init,
                          pin_memory=device.type == "cuda", persistent_workers=config.workers > 0,
                          prefetch_factor=4 if config.workers else None)
    val_loader = DataLoader(val_set, batch_size=micro_batch, shuffle=False, **loader_options)
    started = time.perf_counter()
    final: dict = {}

    for epoch in range(start_epoch, epochs):
        # Train one epoch: the order and the drawn views depend only on (seed, epoch).
        train_set.set_epoch(epoch)
        order = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        loader = DataLoader(train_set, batch_size=micro_batch, shuffle=True, generator=order,
                            **{**loader_options, "persistent_workers": False})
        model.train()
        epoch_start = time.perf_counter()
        wait, loss_sum, correct, seen = 0.0, 0.0, 0, 0
        progress = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{epochs}", unit="batch",
                        dynamic_ncols=True, leave=False)
        fetch_start = time.perf_counter()
        for i, batch in enumerate(loader):
            wait += time.perf_counter() - fetch_start
            if step >= total_steps:
                break
            tokens, prev, nxt = model_inputs(batch, device)
            labels = batch["label"].to(device)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = model(tokens, prev, nxt)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            scaler.scale(loss / config.grad_accum).backward()
            if (i + 1) % config.grad_accum == 0 or i + 1 == len(loader):
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                schedule.step()
                step += 1
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            progress.update(1)
            progress.set_postfix(loss=f"{loss_sum / seen:.4f}",
                                 clips_per_s=f"{seen / (time.perf_counter() - epoch_start):.1f}", refresh=False)
            fetch_start = time.perf_counter()
        progress.close()
        train_seconds = time.perf_counter() - epoch_start

        # Evaluate: softmax averaged over each video's cached views.
        evaluation = classification_metrics(**_video_scores(model, val_loader, device, use_amp),
                                            num_classes=decoder_config.num_classes)
        record = {"event": "epoch", "epoch": epoch, "step": step, "lr": schedule.get_last_lr()[0],
                  "train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                  "train_clips_per_s": seen / train_seconds, "data_wait_share": wait / train_seconds,
                  "epoch_seconds": time.perf_counter() - epoch_start,
                  "val_top1": evaluation["top1"], "val_top5": evaluation["top5"],
                  "val_mean_class_accuracy": evaluation["mean_class_accuracy"]}
        with open(metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        log.info("epoch %d/%d: loss %.4f, train top-1 %.3f, val top-1 %.3f top-5 %.3f, lr %.2e, "
                 "%.1f clips/s, data wait %.1f%%", epoch + 1, epochs, record["train_loss"], record["train_top1"],
                 record["val_top1"], record["val_top5"], record["lr"], record["train_clips_per_s"],
                 100 * record["data_wait_share"])
        if evaluation["top1"] > best_top1:
            best_top1 = evaluation["top1"]
            weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            _atomic_save(lambda p: save_file(weights, p), out / "best.safetensors")
        _save_checkpoint(out, model, {"epoch": epoch, "step": step, "best_top1": best_top1,
                                      "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                                      "scaler": scaler.state_dict(), "torch_rng": torch.get_rng_state()})
        final = evaluation

    if not final:  # resumed a run that had already finished: evaluate its last weights
        final = classification_metrics(**_video_scores(model, val_loader, device, use_amp),
                                       num_classes=decoder_config.num_classes)
    write_evaluation(out, "val", final, attrs["class_names"])
    plot_curves(out / "curve.png", metrics_path)
    summary = TrainSummary(out, epochs, step, time.perf_counter() - started, best_top1, final)
    with open(metrics_path, "a") as handle:
        handle.write(json.dumps({"event": "summary", "seconds": summary.seconds, "steps": step,
                                 "best_val_top1": best_top1, "val_top1": final["top1"],
                                 "val_top5": final["top5"]}) + "\n")
    log.info(summary.line())
    return summary


def _video_scores(model: EVLModel, loader: DataLoader, device: torch.device, use_amp: bool) -> dict:
    """Per-video averaged probabilities and labels, in the form classification_metrics takes."""
    scores = average_views(*predict_views(model, loader, device, use_amp))
    return {"probabilities": scores["probabilities"], "labels": scores["labels"]}
