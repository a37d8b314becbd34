"""Stage two: train the EVL decoder and head from the cache (evl-model.md sections 3, 4 and 6).

`train(config)` reads top to bottom: check the options and the run folder, open the cache and choose
the videos, build the model, restore a killed run, then for each epoch: train, evaluate, checkpoint.
A killed run continues with `--resume` from its last finished epoch and reaches the same weights: the
data order, the drawn views and the dropout generator all restart from the saved state.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from ..cache.dataset import (
    PREFETCH,
    CacheDataset,
    CacheLoader,
    EpochBatches,
    FeatureSelection,
    class_label_map,
    holdout_split,
    model_inputs,
    select_embeddings,
    select_features,
    select_final_block,
    usable_videos,
)
from ..cache.store import FeatureStore, cache_fingerprint, cache_storage, is_url
from ..config import option, shared, to_dict
from ..distributed import Process, barrier, gather_objects, init_process, on_every, on_main, raise_together, sum_across
from ..errors import EvlCacheError
from ..runtime import (
    bind_device,
    deterministic_kernels,
    device_memory_available,
    library_versions,
    memory_available,
    resolve_device,
)
from ..towers.backbone import prefix_tokens
from ..towers.text import BARE_NAME, read_templates
from ..video.find import read_class_names
from .checkpoints import (
    atomic_save,
    check_run_folder,
    keep_finished_epochs,
    latest_state,
    prepare_run_folder,
    save_checkpoint,
)
from .events import EpochEvents, check_tensorboard
from .loop import Optimisation, cosine_lr, distributed, log_epoch, restore, rng_state
from .memory import fitting_grad_accum, step_memory
from .metrics import average_views, classification_metrics, plot_curves
from .model import DecoderConfig, EVLModel
from .probes import AttentiveProbeConfig, LinearProbeConfig
from .run import HEADS, TEXT_HEADS, add_novel, build_model, predict_views, saved_weights, write_evaluation

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Options of `evl-cache train` (defaults: the authors' recipe, evl-model.md section 6)."""
    features: Path = option(None, "the cache to train from (*.zarr or *.h5)")
    out: Path = option(None, "run folder to write (config, metrics, checkpoints, plots)")
    layers: int = option(4, "decoder layers N, on the last N cached blocks")
    heads: int | None = option(None, "decoder (or attentive probe) attention heads [default: the backbone's]")
    qkv_dim: int | None = option(None, "decoder attention width [default: the backbone width]")
    mlp_factor: float = option(4.0, "decoder (or attentive probe) MLP width over the backbone width")
    mlp_dropout: float = option(0.5, "dropout inside the decoder MLP")
    head_dropout: float = option(0.5, "dropout before the classification layer")
    temporal_conv: bool = option(True, "depthwise temporal convolution")
    temporal_pos_embed: bool = option(True, "temporal position embedding")
    temporal_cross_attention: bool = option(True, "temporal cross-attention on the cached maps")
    head: str = option("linear", "classification head: linear (EVL's decoder and head), text (CLIP's text tower on "
                                 "the cached frame embeddings, ViFi-CLIP's text side; no decoder), clip-text (the "
                                 "decoder projected into CLIP's space, scored against class-name text embeddings), "
                                 "attentive-probe (learned queries over the final cached block's tokens of all "
                                 "frames, V-JEPA's frozen-probe protocol) or linear-probe (a linear classifier on "
                                 "the frames' mean image embedding)", choices=HEADS)
    probe_queries: int | None = option(None, "attentive probe: learned query tokens, their outputs averaged "
                                             "[default: 1]")
    probe_depth: int | None = option(None, "attentive probe: blocks, the cross-attention block then self-attention "
                                           "blocks over the queries [default: 1]")
    prompt_tokens: int | None = option(None, "text heads: learned prompt context vectors before each class name "
                                             "(CoOp) [default: 16 for --head text, 0 for clip-text]")
    templates: Path | None = option(None, "text heads with --prompt-tokens 0: prompt templates, one per line with "
                                          "{} for the class name, averaged [default: the bare class name]")
    tune: str = option("none", "text heads: what of CLIP's text tower trains: none (frozen) or text (all of it)",
                       choices=("none", "text"))
    base_classes: Path | None = option(None, "text heads, base-to-novel: train on these classes (one name per "
                                             "line) and report base, novel and harmonic-mean accuracy")
    pretrained: str | None = option(None, "text heads: CLIP weights file for the text tower instead of the "
                                          "cache's tag/file (must have the cache's sha256)")
    frames: int | None = option(None, "frames per clip [default: all cached]; fewer take a centred window")
    frame_step: int = option(1, "use every k-th cached frame (needs --no-temporal-cross-attention if > 1)")
    train_views: str = option("all", "cached training views: all (one drawn per epoch) or first",
                              choices=("all", "first"))
    epochs: int = option(50, "training epochs (ignored when --steps is given)")
    steps: int | None = option(None, "optimizer steps in total (sets the cosine schedule's length)")
    batch_size: int = option(256, "clips per optimizer step")
    grad_accum: int = option(1, "micro-batches per optimizer step (batch-size must divide by it); raised when a "
                                "micro-batch would not fit the device's free memory")
    lr: float = option(4e-4, "peak learning rate (AdamW)")
    weight_decay: float = option(0.05, "AdamW weight decay")
    warmup_steps: int = option(0, "linear warm-up steps before the cosine decay")
    label_smoothing: float = option(0.0, "cross-entropy label smoothing")
    val_fraction: float = option(0.1, "hold-out fraction when the cache has no validation split")
    seed: int = option(0, "seed of initialisation, data order, views and dropout")
    device: str = shared("device")
    workers: int = option(2, "threads that read the cache ahead of training (0: read in the training loop)")
    in_memory: bool = option(False, "hold the selected features in RAM before the first epoch (one copy per node "
                                    "under torchrun); refused with the size it needs when it does not fit")
    tensorboard: bool = option(False, "also write each epoch's scalars (loss, accuracies, learning rate, clips/s, "
                                      "data-wait share) as TensorBoard event files in the run folder's "
                                      "tensorboard/ (needs pip install 'evl-cache[tensorboard]')")
    resume: bool = option(False, "continue a killed run in --out from its last finished epoch")
    overwrite: bool = option(False, "replace an existing run folder at --out (only ever a run folder)")


PROGRESS_LOSS_EVERY = 50  # batches between the progress bar's loss readings (each waits for the device)

# Options that may change between a run and its resumption (they do not change the result).
RESUMABLE_CHANGES = {"resume", "overwrite", "workers", "device", "in_memory", "pretrained", "tensorboard"}


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
                f"top-5 {self.final.get('top5', float('nan')):.4f}"
                + (f"; novel top-1 {self.final['novel']['top1']:.4f}, harmonic mean "
                   f"{self.final['harmonic_mean']:.4f}" if "novel" in self.final else "")
                + f"; run in {self.run}")


@dataclass
class TrainingData:
    """What a run reads from its cache: the cache's description, the head, the selection, the datasets."""
    attrs: dict
    fingerprint: str
    head: dict
    selection: FeatureSelection
    train_set: CacheDataset
    val_set: CacheDataset
    novel_set: CacheDataset | None

    @property
    def datasets(self) -> list[CacheDataset]:
        return [self.train_set, self.val_set] + ([self.novel_set] if self.novel_set is not None else [])


@dataclass
class Evaluator:
    """Evaluation on the validation videos (and, for base-to-novel, the novel classes' videos)."""
    loader: CacheLoader
    novel_loader: CacheLoader | None
    head: dict
    device: torch.device
    use_amp: bool

    def __call__(self, model: torch.nn.Module) -> dict:
        return _evaluate(model, self.loader, self.novel_loader, self.head, self.device, self.use_amp)


def _check_options(config: TrainConfig, process: Process) -> None:
    """Options that cannot work, refused before anything is read or written."""
    if config.features is None or config.out is None:
        raise EvlCacheError("--features and --out are required")
    for name in ("epochs", "batch_size", "grad_accum", "frame_step"):
        if getattr(config, name) < 1:
            raise EvlCacheError(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("probe_queries", "probe_depth"):
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise EvlCacheError(f"--{name.replace('_', '-')} must be at least 1")
    if config.batch_size % config.grad_accum:
        raise EvlCacheError(f"--batch-size {config.batch_size} does not divide by --grad-accum {config.grad_accum}")
    if (config.batch_size // config.grad_accum) % process.world_size:
        raise EvlCacheError(f"--batch-size {config.batch_size} / --grad-accum {config.grad_accum} does not split "
                            f"evenly over {process.world_size} processes")
    if config.tensorboard:
        check_tensorboard()


def open_training_data(config: TrainConfig) -> TrainingData:
    """The cache's description, the run's head, and its train, validation (and novel) videos: the cache's
    validation split, or a seeded per-class hold-out of `--val-fraction` when it has none."""
    with FeatureStore(config.features) as store:
        attrs = store.check_version()
        train_videos, val_videos = usable_videos(store, ("train",)), usable_videos(store, ("val",))
        if len(val_videos) == 0:
            pool = usable_videos(store, ("train", "none"))
            train_videos, val_videos = holdout_split(pool, store.column("label")[pool], config.val_fraction,
                                                     config.seed)
            log.info("train: no validation split in the cache; holding out %d of %d videos (--val-fraction %s)",
                     len(val_videos), len(pool), config.val_fraction)
        cache_labels = store.column("label")
    head = _head_record(config, attrs["class_names"])
    train_videos, val_videos, novel_videos, label_map, novel_map = _videos_of_head(
        head, attrs["class_names"], cache_labels, train_videos, val_videos)
    if len(train_videos) == 0:
        raise EvlCacheError("the cache has no finished, labelled training videos", config.features)
    if config.head in ("text", "linear-probe"):  # the frame embeddings only: no blocks, no maps, no decoder
        selection = select_embeddings(attrs, config.frames, config.frame_step)
    elif config.head == "attentive-probe":  # the final cached block's tokens, no maps
        selection = select_final_block(attrs, config.frames, config.frame_step)
    else:
        selection = select_features(attrs, config.layers, config.frames, config.frame_step,
                                    config.temporal_cross_attention)
    train_set = CacheDataset(config.features, train_videos, selection,
                             views="random" if config.train_views == "all" else "first",
                             seed=config.seed, label_map=label_map)
    val_set = CacheDataset(config.features, val_videos, selection, views="all", label_map=label_map)
    novel_set = CacheDataset(config.features, novel_videos, selection, views="all",
                             label_map=novel_map) if len(novel_videos) else None
    return TrainingData(attrs, cache_fingerprint(attrs), head, selection, train_set, val_set, novel_set)


def run_record(config: TrainConfig, data: TrainingData) -> dict:
    """The run's config.json: the options, the head, the decoder or probe, the selection and the cache it
    reads."""
    attrs, backbone = data.attrs, data.attrs["backbone"]
    return {
        "train": to_dict(config), "head": data.head, **_model_record(config, data),
        "selection": asdict(data.selection),
        "cache": {"path": str(config.features if is_url(config.features) else Path(config.features).resolve()),
                  "fingerprint": data.fingerprint, "backbone": backbone, "blocks": attrs["blocks"],
                  "sampling": attrs["sampling"], "preprocessing": attrs["preprocessing"],
                  "class_names": attrs["class_names"], "storage": cache_storage(attrs)},
        "videos": {"train": len(data.train_set.videos), "val": len(data.val_set.videos),
                   **({"val_novel": len(data.novel_set.videos)} if data.novel_set is not None else {})},
        "versions": library_versions(),
    }


def _model_record(config: TrainConfig, data: TrainingData) -> dict:
    """The run's model shape: {"decoder": ...} for the heads on the EVL decoder, {"probe": ...} for a probe,
    {"decoder": None} for the text head."""
    backbone, frames = data.attrs["backbone"], data.selection.frames
    classes = len(data.head.get("class_names", data.attrs["class_names"]))
    grid = tuple(backbone["patch_grid"])
    if config.head == "attentive-probe":
        return {"decoder": None, "probe": asdict(AttentiveProbeConfig(
            width=backbone["width"], tokens=prefix_tokens(backbone) + grid[0] * grid[1], frames=frames,
            num_classes=classes, heads=config.heads or backbone["heads"], queries=config.probe_queries or 1,
            depth=config.probe_depth or 1, mlp_factor=config.mlp_factor))}
    if config.head == "linear-probe":
        return {"decoder": None, "probe": asdict(LinearProbeConfig(backbone["embed_dim"], frames, classes))}
    if config.head == "text":
        return {"decoder": None}
    return {"decoder": asdict(DecoderConfig(
        width=backbone["width"], grid=grid, frames=frames, num_classes=classes, layers=config.layers,
        heads=config.heads or backbone["heads"], qkv_dim=config.qkv_dim, mlp_factor=config.mlp_factor,
        mlp_dropout=config.mlp_dropout, head_dropout=config.head_dropout, temporal_conv=config.temporal_conv,
        temporal_pos_embed=config.temporal_pos_embed, temporal_cross_attention=config.temporal_cross_attention,
        prefix_tokens=prefix_tokens(backbone)))}


def _optimisation(config: TrainConfig, model: torch.nn.Module, train_size: int, device: torch.device,
                  grad_accum: int) -> Optimisation:
    """AdamW over the trained parameters (a frozen text tower stays out), a cosine schedule over the run's
    steps, and the fp16 loss scaler on CUDA; `grad_accum` micro-batches per step."""
    micro_batch = config.batch_size // grad_accum
    steps_per_epoch = math.ceil(math.ceil(train_size / micro_batch) / grad_accum)
    total_steps = config.steps or config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_lr(step, total_steps, config.warmup_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return Optimisation(optimizer, schedule, scaler, grad_accum, micro_batch, steps_per_epoch, total_steps,
                        math.ceil(total_steps / steps_per_epoch))


def _grad_accum(config: TrainConfig, process: Process, device: torch.device, model: torch.nn.Module,
                data: TrainingData, resumed: dict | None) -> int:
    """Micro-batches per step: --grad-accum (a resumed run's own, which may have been raised), or more
    where a micro-batch would not fit the device's free memory (`step_memory`'s estimate). Every process
    takes the largest any of them needs."""
    wanted = resumed.get("grad_accum", config.grad_accum) if resumed else config.grad_accum
    amp = device.type == "cuda"
    loader_batches = 0 if amp else PREFETCH + 1  # a CPU's loader holds its batches in the same memory
    memory = step_memory(model, data.train_set, amp, process.world_size, loader_batches)
    available = device_memory_available(device)
    chosen = max(gather_objects(process, on_every(process, lambda: fitting_grad_accum(
        config.batch_size, wanted, process.world_size, memory, available))))
    if chosen != wanted:
        log.warning("train: a micro-batch of %d clips per process would not fit %s (%s; %.2f GB free): %d "
                    "micro-batches of %d per step instead of %d (the same steps, other float sums)",
                    config.batch_size // wanted // process.world_size, device, memory.describe(),
                    (available or 0) / 1e9, chosen, config.batch_size // chosen, wanted)
    return chosen


def _train_epoch(net: torch.nn.Module, loader: CacheLoader, batches: EpochBatches, epoch: int, step: int,
                 opt: Optimisation, config: TrainConfig, process: Process, device: torch.device) -> tuple[int, dict]:
    """One epoch; returns (the step reached, the epoch's loss, accuracy, speed and data-wait figures).

    The order and the drawn views depend only on (seed, epoch). Every process sees the same global
    batches and takes its share; a step's loss is the mean over the step's whole global batch, however
    it is split over processes and micro-batches. The loss and accuracy are summed on the device and
    read once at the end (and for the progress bar every `PROGRESS_LOSS_EVERY` batches): reading them
    every batch would wait for the device twice a step."""
    batches.set_epoch(epoch)
    sizes = [len(b) for b in batches.global_batches]
    net.train()
    use_amp, accum = device.type == "cuda", opt.grad_accum
    started = fetch_start = time.perf_counter()
    wait, seen = 0.0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    progress = tqdm(total=len(loader), desc=f"epoch {epoch + 1}/{opt.epochs}", unit="batch", dynamic_ncols=True,
                    leave=False, disable=not process.is_main)
    for i, batch in enumerate(loader):
        wait += time.perf_counter() - fetch_start
        if step >= opt.total_steps:
            break
        group = slice(i - i % accum, i - i % accum + accum)
        ends_step = (i + 1) % accum == 0 or i + 1 == len(sizes)
        labels = batch["label"].to(device, non_blocking=True)
        sync = contextlib.nullcontext() if ends_step or process.world_size == 1 else net.no_sync()
        with sync:
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = net(*model_inputs(batch, device))
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing,
                                       reduction="sum")
            opt.scaler.scale(loss * process.world_size / sum(sizes[group])).backward()
        if ends_step:
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
            opt.optimizer.zero_grad(set_to_none=True)
            opt.schedule.step()
            step += 1
        loss_sum += loss.detach().double()
        correct += (logits.argmax(1) == labels).sum()
        seen += len(labels)
        progress.update(1)
        if process.is_main and i % PROGRESS_LOSS_EVERY == 0:
            progress.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.4f}",
                                 clips_per_s=f"{seen / (time.perf_counter() - started):.1f}", refresh=False)
        fetch_start = time.perf_counter()
    progress.close()
    seconds = time.perf_counter() - started
    loss_sum, correct, seen, wait = sum_across(process, [float(loss_sum), int(correct), seen,
                                                         wait / process.world_size])
    return step, {"train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                  "train_clips_per_s": seen / seconds, "data_wait_share": wait / seconds, "started": started}


def _end_epoch(out: Path, model: torch.nn.Module, evaluator: Evaluator, epoch: int, step: int, stats: dict,
               best_top1: float, opt: Optimisation, rng_states: list,
               events: EpochEvents | None) -> tuple[dict, float]:
    """On the main process: evaluate, log the epoch to metrics.jsonl (and TensorBoard), keep the best
    weights, checkpoint. Returns (the evaluation, the best top-1 so far)."""
    evaluation = evaluator(model)
    started = stats.pop("started")
    record = {"event": "epoch", "epoch": epoch, "step": step, "lr": opt.schedule.get_last_lr()[0], **stats,
              "epoch_seconds": time.perf_counter() - started, "val_top1": evaluation["top1"],
              "val_top5": evaluation["top5"], "val_mean_class_accuracy": evaluation["mean_class_accuracy"],
              **_novel_record(evaluation), "wall_time": time.time()}
    log_epoch(out, record, events)
    log.info("epoch %d/%d: loss %.4f, train top-1 %.3f, val top-1 %.3f top-5 %.3f, lr %.2e, %.1f clips/s, "
             "data wait %.1f%%", epoch + 1, opt.epochs, record["train_loss"], record["train_top1"],
             record["val_top1"], record["val_top5"], record["lr"], record["train_clips_per_s"],
             100 * record["data_wait_share"])
    if evaluation["top1"] > best_top1:
        best_top1 = evaluation["top1"]
        weights = saved_weights(model)
        atomic_save(lambda p: save_file(weights, p), out / "best.safetensors")
    save_checkpoint(out, model, {"epoch": epoch, "step": step, "best_top1": best_top1, "grad_accum": opt.grad_accum,
                                 "device": evaluator.device.type, "optimizer": opt.optimizer.state_dict(),
                                 "schedule": opt.schedule.state_dict(), "scaler": opt.scaler.state_dict(),
                                 "rng": rng_states})
    return evaluation, best_top1


def _finish(out: Path, model: torch.nn.Module, evaluator: Evaluator, data: TrainingData, final: dict,
            summary: TrainSummary) -> TrainSummary:
    """On the main process: the last evaluation's files, the curves, and the summary line."""
    if not final:  # resumed a run that had already finished: evaluate its last weights
        final = summary.final = evaluator(model)
    write_evaluation(out, "val", final, data.head.get("class_names", data.attrs["class_names"]),
                     data.head.get("novel_classes"))
    plot_curves(out / "curve.png", out / "metrics.jsonl")
    log_epoch(out, {"event": "summary", "seconds": summary.seconds, "steps": summary.steps,
                    "best_val_top1": summary.best_top1, "val_top1": final["top1"], "val_top5": final["top5"],
                    **_novel_record(final)}, None)
    log.info(summary.line())
    return summary


def train(config: TrainConfig) -> TrainSummary:
    """Train and evaluate the EVL decoder (or a text head) on a cache; see TrainConfig for the options."""
    process = init_process(resolve_device(config.device))
    device = bind_device(process.device(resolve_device(config.device)))
    _check_options(config, process)
    with deterministic_kernels(device):
        return _train(config, process, device)


def _train(config: TrainConfig, process: Process, device: torch.device) -> TrainSummary:
    """`train` in this process, on `device`: the run folder, the data, the model, then epoch by epoch."""
    out = Path(config.out)
    on_main(process, lambda: check_run_folder(out, [config.features], config.overwrite, config.resume))
    torch.manual_seed(config.seed)
    data = open_training_data(config)
    run_config = run_record(config, data)
    shared_memory = _memory_for(process, data.datasets) if config.in_memory else None
    on_main(process, lambda: prepare_run_folder(out, run_config, config.overwrite, config.resume, RESUMABLE_CHANGES))
    resumed = latest_state(out) if config.resume else None
    model = build_model(run_config, pretrained=config.pretrained).to(device)  # the same weights in every process
    net = distributed(model, process, device, config.seed)
    if config.in_memory:
        _hold_in_memory(process, data.datasets, shared_memory)
    opt = _optimisation(config, model, len(data.train_set), device,
                        _grad_accum(config, process, device, model, data, resumed))
    start_epoch, step, best_top1 = (restore(resumed, out, model, opt, process, device, config.seed)
                                    if config.resume else (0, 0, -1.0))
    if config.resume and process.is_main:
        keep_finished_epochs(out / "metrics.jsonl", start_epoch - 1)
    events = EpochEvents(out) if config.tensorboard and process.is_main else None  # the kept epochs, once each
    log.info("train: %d train / %d val videos, %d classes, %d trained parameters, %d steps (%d epochs of %d), "
             "device %s, %d process(es), reading blocks %s%s", len(data.train_set.videos), len(data.val_set.videos),
             len(data.head.get("class_names", data.attrs["class_names"])),
             sum(p.numel() for p in model.parameters() if p.requires_grad), opt.total_steps, opt.epochs,
             opt.steps_per_epoch, device, process.world_size, list(data.selection.blocks),
             " and maps" if data.selection.maps else " and the frame embeddings" if data.selection.embed else "")

    pin, use_amp = device.type == "cuda", device.type == "cuda"
    evaluator = Evaluator(CacheLoader.sequential(data.val_set, opt.micro_batch, config.workers, pin),
                          CacheLoader.sequential(data.novel_set, opt.micro_batch, config.workers, pin)
                          if data.novel_set is not None else None, data.head, device, use_amp)
    batches = EpochBatches(len(data.train_set), opt.micro_batch, config.seed, process.rank, process.world_size)
    loader = CacheLoader(data.train_set, batches, config.workers, pin)
    started, final = time.perf_counter(), {}
    for epoch in range(start_epoch, opt.epochs):
        step, stats = _train_epoch(net, loader, batches, epoch, step, opt, config, process, device)
        rng_states = gather_objects(process, rng_state(device))
        if process.is_main:  # the main process evaluates and writes; the others go on to the next epoch
            final, best_top1 = _end_epoch(out, model, evaluator, epoch, step, stats, best_top1, opt, rng_states,
                                          events)
    if events is not None:
        events.close()
    barrier(process)
    summary = TrainSummary(out, opt.epochs, step, time.perf_counter() - started, best_top1, final)
    return _finish(out, model, evaluator, data, final, summary) if process.is_main else summary


def _memory_for(process: Process, datasets: list[CacheDataset]) -> Path | None:
    """Where --in-memory holds the datasets' selection: this process's memory (None) or, under torchrun,
    one copy per node in shared memory (/dev/shm); or a one-line refusal with the size it needs."""
    needed = sum(d.memory_bytes() for d in datasets)
    shared = Path("/dev/shm") if process.world_size > 1 and Path("/dev/shm").is_dir() else None
    copies = 1 if shared is not None else process.local_world_size
    free = [("memory available", memory_available())]
    if shared is not None:
        stat = os.statvfs(shared)
        free.append(("free in /dev/shm", stat.f_bavail * stat.f_frsize))
    error = None
    for what, available in free:
        if available is not None and needed * copies > available:
            error = EvlCacheError(f"--in-memory needs {needed * copies / 1e9:.2f} GB for the selected features "
                                  f"({'one copy per process' if copies > 1 else 'one copy'}); {what} is "
                                  f"{available / 1e9:.2f} GB: train without --in-memory, or from a cache with "
                                  f"fewer bytes per clip (extract --storage int8 or int4)")
            break
    raise_together(process, error)
    return shared


def _hold_in_memory(process: Process, datasets: list[CacheDataset], shared: Path | None) -> None:
    """Read every dataset's selection into memory (`_memory_for` says where)."""
    needed = sum(d.memory_bytes() for d in datasets)
    started = time.perf_counter()
    if shared is None:
        for dataset in datasets:
            dataset.hold_in_memory()
    else:  # the first process of each node reads; the others map its file, then the name goes
        first = process.local_rank == 0
        if first:
            for dataset in datasets:
                dataset.hold_in_memory(shared / dataset.shared_memory_name(), read=True)
        barrier(process)
        if not first:
            for dataset in datasets:
                dataset.hold_in_memory(shared / dataset.shared_memory_name(), read=False)
        barrier(process)
        if first:
            for dataset in datasets:
                (shared / dataset.shared_memory_name()).unlink(missing_ok=True)
    log.info("train: holding %.2f GB of features in memory%s (read in %.1f s)", needed / 1e9,
             " shared by this node's processes" if shared is not None else
             f", one copy in each of {process.local_world_size} processes" if process.world_size > 1 else "",
             time.perf_counter() - started)


def _video_scores(model: EVLModel, loader: CacheLoader, device: torch.device, use_amp: bool) -> dict:
    """Per-video averaged probabilities and labels, in the form classification_metrics takes."""
    scores = average_views(*predict_views(model, loader, device, use_amp))
    return {"probabilities": scores["probabilities"], "labels": scores["labels"]}


def _evaluate(model: torch.nn.Module, loader: CacheLoader, novel_loader: CacheLoader | None, head: dict,
              device: torch.device, use_amp: bool) -> dict:
    """Metrics over the run's classes; for base-to-novel also over the novel classes (scored against the
    novel names only, as ViFi-CLIP does) under "novel", with the harmonic mean of the two top-1s."""
    num_classes = len(head["class_names"]) if "class_names" in head else model.config.num_classes
    metrics = classification_metrics(**_video_scores(model, loader, device, use_amp), num_classes=num_classes)
    if novel_loader is None:
        return metrics
    model.text.set_classes(head["novel_classes"])
    try:
        novel = classification_metrics(**_video_scores(model, novel_loader, device, use_amp),
                                       num_classes=len(head["novel_classes"]))
    finally:
        model.text.set_classes(head["class_names"])
    return add_novel(metrics, novel)


def _novel_record(metrics: dict) -> dict:
    """The novel classes' figures for metrics.jsonl (empty unless base-to-novel)."""
    if "novel" not in metrics:
        return {}
    return {"val_novel_top1": metrics["novel"]["top1"], "val_novel_top5": metrics["novel"]["top5"],
            "val_harmonic_mean": metrics["harmonic_mean"]}


def _head_record(config: TrainConfig, cache_names: list[str]) -> dict:
    """The run's head: its kind and, for the text heads, the classes it trains on (the base classes for
    base-to-novel), the novel classes, prompt tokens, templates and what of the text tower trains."""
    text_only = {"--prompt-tokens": config.prompt_tokens is not None, "--templates": config.templates is not None,
                 "--tune text": config.tune != "none", "--base-classes": config.base_classes is not None,
                 "--pretrained": config.pretrained is not None}
    if config.head != "attentive-probe" and (config.probe_queries, config.probe_depth) != (None, None):
        raise EvlCacheError("--probe-queries and --probe-depth: only for --head attentive-probe")
    if config.head not in TEXT_HEADS:
        given = [flag for flag, is_given in text_only.items() if is_given]
        if given:
            raise EvlCacheError(f"{', '.join(given)}: only for --head text or --head clip-text")
        return {"kind": config.head}
    names, novel = list(cache_names), []
    if config.base_classes is not None:
        base = read_class_names(config.base_classes)
        unknown = [name for name in base if name not in cache_names]
        if unknown:
            raise EvlCacheError(f"{len(unknown)} base classes are not classes of the cache (e.g. {unknown[:3]})",
                                config.base_classes)
        names = [name for name in cache_names if name in base]
        novel = [name for name in cache_names if name not in base]
        if not novel:
            raise EvlCacheError("the base classes are all of the cache's classes: none is left as novel",
                                config.base_classes)
    prompt_tokens = config.prompt_tokens if config.prompt_tokens is not None else 16 if config.head == "text" else 0
    if prompt_tokens < 0:
        raise EvlCacheError("--prompt-tokens must be 0 or more")
    if prompt_tokens and config.templates is not None:
        raise EvlCacheError("--templates apply to --prompt-tokens 0 (learned prompts are 'context name.')")
    if config.head == "text" and prompt_tokens == 0 and config.tune == "none":
        raise EvlCacheError("--head text with --prompt-tokens 0 and --tune none trains nothing: that is "
                            "`evl-cache zeroshot`")
    return {"kind": config.head, "class_names": names, "novel_classes": novel, "prompt_tokens": prompt_tokens,
            "templates": read_templates(config.templates) if config.templates else [BARE_NAME],
            "tune": config.tune}


def _videos_of_head(head: dict, cache_names: list[str], cache_labels: np.ndarray, train_videos: np.ndarray,
                    val_videos: np.ndarray) -> tuple:
    """(train, val and novel val videos, label maps of the run's and the novel classes) for the head.

    A linear head trains on every class, with the cache's labels. A text head's classes may be a subset
    (base-to-novel): videos of other classes leave training, and validation splits into base and novel.
    """
    none = np.empty(0, dtype=np.int64)
    if head["kind"] not in TEXT_HEADS:
        return train_videos, val_videos, none, None, None

    def of_classes(videos: np.ndarray, label_map: np.ndarray) -> np.ndarray:
        videos = np.asarray(videos, dtype=np.int64)
        return videos[label_map[cache_labels[videos]] >= 0]

    label_map = class_label_map(cache_names, head["class_names"])
    novel_map = class_label_map(cache_names, head["novel_classes"]) if head["novel_classes"] else None
    novel_videos = of_classes(val_videos, novel_map) if novel_map is not None else none
    if novel_map is not None and len(novel_videos) == 0:
        raise EvlCacheError("base-to-novel needs validation videos of the novel classes; the cache has none")
    return of_classes(train_videos, label_map), of_classes(val_videos, label_map), novel_videos, label_map, novel_map
