"""`evl-cache finetune`: ViFi-CLIP's training of CLIP's towers on decoded clips, and its "bridge and prompt"
stage (both towers frozen, learned prompt tokens), ending in a weights file the rest of evl-cache reads.

`finetune(config)` reads top to bottom: check the options and the run folder, find the videos, build the
model from the base weights, restore a killed run, evaluate the starting towers (their zero-shot), then
for each epoch: train on clips decoded in DataLoader workers, evaluate, checkpoint; at the end write
`towers.pt` in `import-vificlip`'s format (docs/finetune.md). A killed run continues with `--resume` from
its last finished epoch and reaches the same weights: the order, the clips, their augmentation and the
batches' mixing depend only on (seed, epoch, video or batch), and the optimizer state is saved.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..cache.dataset import EpochBatches
from ..cache.options import ExtractConfig, channel_values, dataset_of
from ..config import option, option_of, shared, to_dict
from ..decoder.checkpoints import (
    atomic_save,
    check_run_folder,
    keep_finished_epochs,
    latest_state,
    prepare_run_folder,
    save_checkpoint,
)
from ..decoder.events import EpochEvents, check_tensorboard
from ..decoder.loop import Optimisation, cosine_lr, distributed, log_epoch, restore, rng_state
from ..decoder.metrics import classification_metrics, plot_curves
from ..decoder.run import add_novel, load_weights, saved_weights, write_evaluation
from ..distributed import Process, barrier, gather_objects, init_process, on_main, sum_across
from ..errors import EvlCacheError
from ..runtime import bind_device, deterministic_kernels, library_versions, resolve_device
from ..towers.backbone import _register_model_name, load_clip
from ..towers.block_prompts import read_block_prompts
from ..towers.vificlip import learned_prompt, write_vifi_weights
from ..video.find import read_class_names
from ..video.pixels import vifi_short_side
from .blending import Blending
from .online_clips import Augmentation, TrainingClips, evaluation_loader, evaluation_spec, training_loader
from .splits import VideoSplits, splits_fingerprint, video_splits
from .vifi_model import TUNES, PromptSpec, VideoCLIP

log = logging.getLogger(__name__)

INPUTS = ("videos", "train_list", "val_list", "list", "data_root", "dataset", "root", "fold", "classes", "label_field")
ADAM_BETAS, ADAM_EPS = (0.9, 0.98), 1e-8  # X-CLIP's AdamW, which ViFi-CLIP's code builds on
MIN_LR_SHARE = 0.01  # the cosine ends at lr / 100 (X-CLIP's lr_min)
TOWERS_FILE = "towers.pt"
PROGRESS_LOSS_EVERY = 10  # batches between the progress bar's loss readings
RESUMABLE_CHANGES = {"resume", "overwrite", "workers", "device", "tensorboard", "decode_timeout", "weights",
                     "evaluate_first"}


@dataclass
class FinetuneConfig:
    """Options of `evl-cache finetune` (defaults: ViFi-CLIP's recipe as far as known, docs/finetune.md)."""
    out: Path = option(None, "run folder to write (config, metrics, checkpoints, curves, and towers.pt)")
    videos: Path | None = option_of(ExtractConfig, "videos")
    train_list: Path | None = option_of(ExtractConfig, "train_list")
    val_list: Path | None = option_of(ExtractConfig, "val_list")
    list: Path | None = option_of(ExtractConfig, "list")
    data_root: Path | None = option_of(ExtractConfig, "data_root")
    dataset: str | None = option_of(ExtractConfig, "dataset")
    root: Path | None = option_of(ExtractConfig, "root")
    fold: int | None = option_of(ExtractConfig, "fold")
    classes: Path | None = option_of(ExtractConfig, "classes")
    label_field: str | None = option_of(ExtractConfig, "label_field")
    model: str = option("ViT-B-16-quickgelu", "open_clip model name, or a model-config JSON (a -quickgelu model for "
                                              "OpenAI's CLIP weights, as ViFi-CLIP's)")
    pretrained: str = option("openai", "base weights: an open_clip tag, a weights file (e.g. a fine-tuned ViFi-CLIP "
                                       "from import-vificlip, to bridge and prompt), or none (random, for tests)")
    tune: str = option("both", "what trains: both towers and the logit scale (ViFi-CLIP's fine-tuning), image, "
                               "text, or none: only learned prompt tokens (bridge and prompt)", choices=TUNES)
    prompt_words: str = option("a photo of a", "ViFi-CLIP's CTX_INIT: classes are prompted 'WORDS name.'; 4 or "
                                               "fewer learned context vectors start from these words")
    text_prompt_tokens: int = option(0, "bridge and prompt: learned text context vectors in front of the class name "
                                        "(and, with --text-prompt-depth above 1, in the text blocks)")
    text_prompt_depth: int = option(1, "text blocks with learned prompt tokens, the input counted (1: the input "
                                       "context only)")
    vision_prompt_tokens: int = option(0, "bridge and prompt: learned tokens after the patch tokens (needs text "
                                          "prompt tokens)")
    vision_prompt_depth: int = option(1, "image blocks with learned prompt tokens, the input counted (1: shallow)")
    frames: int = option(16, "frames per clip, one from each of as many segments (ViFi-CLIP: 16, or 32 in its "
                             "zero-shot, few-shot and base-to-novel recipes)")
    size: int | None = option(None, "input size in pixels [default: the model's own]")
    mean: str = option("0.485,0.456,0.406", "normalisation mean 'R,G,B' (ViFi-CLIP's, ImageNet's; extract the "
                                            "written towers with the same --mean)")
    std: str = option("0.229,0.224,0.225", "normalisation std 'R,G,B' (ViFi-CLIP's, ImageNet's)")
    flip: bool = option(True, "horizontal flip of training clips (probability 0.5)")
    color_jitter: float = option(0.8, "probability of colour jitter of a training clip")
    gray_scale: float = option(0.2, "probability of grey scale of a training clip")
    mixup: float = option(0.8, "mixup's Beta alpha (0: no mixup)")
    cutmix: float = option(1.0, "cutmix's Beta alpha (0: no cutmix)")
    mixup_switch_prob: float = option(0.5, "probability that a batch is cut-mixed rather than mixed up")
    label_smoothing: float = option(0.1, "label smoothing of the targets")
    epochs: int = option(30, "training epochs")
    warmup_epochs: int = option(5, "epochs of linear learning-rate warm-up before the cosine decay")
    batch_size: int = option(8, "clips per optimizer step (ViFi-CLIP's TRAIN.BATCH_SIZE x GPUs x ACCUMULATION_STEPS)")
    grad_accum: int = option(1, "micro-batches per optimizer step (--batch-size must divide by it)")
    lr: float = option(8e-6, "peak learning rate (AdamW); the cosine ends at lr / 100")
    weight_decay: float = option(0.001, "AdamW weight decay (not on biases and other 1-D tensors)")
    grad_checkpointing: bool = option(False, "recompute the towers' block activations in the backward pass "
                                             "(open_clip's set_grad_checkpointing): less memory, more compute")
    eval_views: int = shared("eval_views", default=1)
    evaluate_first: bool = option(True, "evaluate the starting towers (their zero-shot) before the first epoch")
    val_fraction: float = option(0.1, "hold-out fraction when the videos have no validation split")
    base_classes: Path | None = option(None, "base-to-novel: train on these classes (one name per line) and report "
                                             "base, novel and harmonic-mean accuracy")
    shots: int | None = option(None, "few-shot: K training videos per class, a seeded draw")
    seed: int = option(0, "seed of the hold-out, shots, prompt initialisation, data order, clips, augmentation, "
                          "mixing (and of random weights)")
    workers: int = option(4, "DataLoader worker processes that decode videos (0: decode in the training loop)")
    decode_timeout: float = shared("decode_timeout")
    device: str = shared("device")
    weights: str = shared("weights")
    tensorboard: bool = option(False, "also write each epoch's scalars as TensorBoard event files (tensorboard/)")
    resume: bool = option(False, "continue a killed run in --out from its last finished epoch")
    overwrite: bool = option(False, "replace an existing run folder at --out (only ever a run folder)")


@dataclass
class FinetuneSummary:
    """What a fine-tuning run did, and the weights file it wrote."""
    run: Path
    epochs: int
    steps: int
    seconds: float
    start: dict  # the starting towers' evaluation ({} if not made)
    best_top1: float
    final: dict
    towers: Path
    extract_flags: str

    def line(self) -> str:
        start = f"; before training val top-1 {self.start['top1']:.4f}" if self.start else ""
        novel = (f"; novel top-1 {self.final['novel']['top1']:.4f}, harmonic mean {self.final['harmonic_mean']:.4f}"
                 if "novel" in self.final else "")
        return (f"finetune: {self.epochs} epochs, {self.steps} steps in {self.seconds:.1f} s{start}; best val top-1 "
                f"{self.best_top1:.4f}; last val top-1 {self.final.get('top1', float('nan')):.4f}{novel}; wrote "
                f"{self.towers} (extract with {self.extract_flags})")


def _check_options(config: FinetuneConfig, process: Process) -> None:
    """Options that cannot work, refused before anything is read or written."""
    if config.out is None:
        raise EvlCacheError("--out is required (the run folder)")
    for name in ("epochs", "batch_size", "grad_accum", "frames", "eval_views"):
        if getattr(config, name) < 1:
            raise EvlCacheError(f"--{name.replace('_', '-')} must be at least 1")
    if config.shots is not None and config.shots < 1:
        raise EvlCacheError("--shots must be at least 1")
    if config.warmup_epochs < 0 or config.workers < 0 or config.decode_timeout < 0:
        raise EvlCacheError("--warmup-epochs, --workers and --decode-timeout must be 0 or more")
    for name in ("color_jitter", "gray_scale", "mixup_switch_prob", "label_smoothing"):
        if not 0 <= getattr(config, name) <= 1:
            raise EvlCacheError(f"--{name.replace('_', '-')} is a probability: 0 to 1")
    if config.mixup < 0 or config.cutmix < 0:
        raise EvlCacheError("--mixup and --cutmix are Beta alphas: 0 (off) or more")
    if config.batch_size % config.grad_accum or (config.batch_size // config.grad_accum) % process.world_size:
        raise EvlCacheError(f"--batch-size {config.batch_size} must split into --grad-accum {config.grad_accum} "
                            f"micro-batches of equal shares for {process.world_size} process(es)")
    channel_values(config.mean, "mean")
    channel_values(config.std, "std")
    prompt_spec(config).check(config.tune)
    if config.tensorboard:
        check_tensorboard()


def prompt_spec(config: FinetuneConfig) -> PromptSpec:
    return PromptSpec(config.prompt_words.strip(), config.text_prompt_tokens, config.text_prompt_depth,
                      config.vision_prompt_tokens, config.vision_prompt_depth)


def input_config(config: FinetuneConfig) -> ExtractConfig:
    """`extract`'s options naming the same videos (the inputs are read by the same code)."""
    return ExtractConfig(**{name: getattr(config, name) for name in INPUTS})


def build_model(config: FinetuneConfig, class_names: list[str]) -> tuple[VideoCLIP, dict]:
    """The model from the base weights, on the CPU, and the base weights' description (BackboneSpec's dict).
    A base file that carries prompts of its own is refused: they would stay fixed, beside new ones."""
    import open_clip

    if read_block_prompts(config.pretrained) or learned_prompt(config.pretrained) is not None:
        raise EvlCacheError("the base weights carry learned prompts (a prompted model): finetune starts from "
                            "towers without them", config.pretrained)
    clip, spec = load_clip(config.model, config.pretrained, config.size, "cpu", seed=config.seed)
    tokenizer = open_clip.get_tokenizer(_register_model_name(config.model))
    model = VideoCLIP(clip, tokenizer, class_names, config.tune, prompt_spec(config),
                      channel_values(config.mean, "mean"), channel_values(config.std, "std"), config.seed)
    if config.grad_checkpointing:
        clip.set_grad_checkpointing(True)
    return model, spec.to_dict()


def run_record(config: FinetuneConfig, splits: VideoSplits, videos_fingerprint: str, backbone: dict,
               model: VideoCLIP) -> dict:
    """The run's config.json: the options, the base towers, the classes, the videos and what trains."""
    return {"finetune": to_dict(config), "backbone": backbone,
            "inputs": {"fingerprint": f"{videos_fingerprint}:{backbone['weights_sha256']}",
                       "videos": splits.counts()},
            "class_names": splits.class_names, "novel_classes": splits.novel_classes,
            "prompts": asdict(model.spec), "trained_parameters": sum(p.numel() for p in model.parameters()
                                                                   if p.requires_grad),
            "versions": library_versions()}


def _optimisation(config: FinetuneConfig, model: VideoCLIP, train_size: int, device: torch.device) -> Optimisation:
    """AdamW (decay on matrices only) over what trains, a warm-up and cosine to lr / 100 over the run's steps,
    and the float16 loss scaler on CUDA."""
    micro_batch = config.batch_size // config.grad_accum
    steps_per_epoch = math.ceil(math.ceil(train_size / micro_batch) / config.grad_accum)
    total_steps = config.epochs * steps_per_epoch
    trained = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trained if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in trained if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=ADAM_BETAS, eps=ADAM_EPS)
    warmup = config.warmup_epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_lr(step, total_steps, warmup,
                                                                                     MIN_LR_SHARE))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    return Optimisation(optimizer, schedule, scaler, config.grad_accum, micro_batch, steps_per_epoch, total_steps,
                        config.epochs)


def batch_rng(seed: int, epoch: int, batch: int, rank: int) -> np.random.Generator:
    """The generator of one micro-batch's mixing."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, batch, rank, 1]))


@dataclass
class Evaluation:
    """The validation (and novel-class) videos, scored in shares across processes."""
    loaders: dict  # "val" (and "novel") -> DataLoader of VideoClips
    labels: dict  # the same keys -> {video index: label in the scored classes}
    names: dict  # the same keys -> the class names scored
    batch: int
    process: Process
    device: torch.device

    def __call__(self, model: VideoCLIP) -> dict:
        """Metrics on the main process (top-1, top-5, ...; for base-to-novel the novel ones and the harmonic
        mean); {} on the others."""
        results = {}
        for part, loader in self.loaders.items():
            model.set_classes(self.names[part])
            try:
                results[part] = self._metrics(part, _video_scores(model, loader, self.batch, self.device))
            finally:
                model.set_classes(self.names["val"])
        if not self.process.is_main:
            return {}
        return add_novel(results["val"], results["novel"]) if "novel" in results else results["val"]

    def _metrics(self, part: str, scores: dict) -> dict:
        gathered = gather_objects(self.process, scores)
        if not self.process.is_main:
            return {}
        merged = {video: p for share in gathered for video, p in share.items()}
        videos = sorted(merged)
        if not videos:
            raise EvlCacheError(f"no {part} video could be decoded")
        labels = np.array([self.labels[part][v] for v in videos])
        return classification_metrics(np.stack([merged[v] for v in videos]), labels, len(self.names[part]))


@torch.no_grad()
def _video_scores(model: VideoCLIP, loader, batch: int, device: torch.device) -> dict:
    """{video: softmax averaged over its views} for this process's share of the loader's videos; several
    videos' views go through the towers together, `batch` clips or more at a time."""
    was_training = model.training
    model.eval()
    scores, pending = {}, []

    def score() -> None:
        clips = torch.cat([clips for _, clips in pending]).to(device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=device.type == "cuda"):
            probabilities = model(model.pixels(clips)).float().softmax(-1).cpu()
        start = 0
        for video, clips in pending:
            scores[video] = probabilities[start:start + len(clips)].mean(0).numpy()
            start += len(clips)
        pending.clear()

    for item in loader:
        if item.clips is None:
            log.warning("finetune: evaluation skips %s: %s", item.index, item.error)
            continue
        pending.append((item.index, item.clips))
        if sum(len(c) for _, c in pending) >= batch:
            score()
    if pending:
        score()
    model.train(was_training)
    return scores


def _evaluation(config: FinetuneConfig, videos, splits: VideoSplits, size: int, micro_batch: int,
                process: Process, device: torch.device) -> Evaluation:
    """Each process scores every world_size-th validation (and novel) video."""
    spec = evaluation_spec(config.frames, size, config.eval_views, config.seed)
    parts = {"val": (splits.val, splits.val_labels, splits.class_names)}
    if splits.novel_classes:
        parts["novel"] = (splits.novel, splits.novel_labels, splits.novel_classes)
    timeout = config.decode_timeout or None
    loaders = {part: evaluation_loader(videos, indices[process.rank::process.world_size], spec, config.workers,
                                       timeout) for part, (indices, _, _) in parts.items()}
    labels = {part: dict(zip(map(int, indices), map(int, scored))) for part, (indices, scored, _) in parts.items()}
    return Evaluation(loaders, labels, {part: names for part, (_, _, names) in parts.items()}, micro_batch,
                      process, device)


def _train_epoch(net: torch.nn.Module, model: VideoCLIP, loader, batches: EpochBatches, epoch: int, step: int,
                 opt: Optimisation, blending: Blending, config: FinetuneConfig, process: Process,
                 device: torch.device) -> tuple[int, dict]:
    """One epoch; returns (the step reached, the epoch's loss, accuracy on the unmixed labels, clips/s, data
    wait and failed clips). A step's loss is the mean over the step's whole global batch (a clip that failed
    to decode adds nothing), however it is split over processes and micro-batches."""
    batches.set_epoch(epoch)
    sizes = [len(b) for b in batches.global_batches]
    net.train()
    use_amp, accum = device.type == "cuda", opt.grad_accum
    started = fetch_start = time.perf_counter()
    wait, seen, failed = 0.0, 0, 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    progress = tqdm(total=len(batches), desc=f"finetune epoch {epoch + 1}/{opt.epochs}", unit="batch",
                    dynamic_ncols=True, leave=False, disable=not process.is_main)
    for i, batch in enumerate(loader):
        wait += time.perf_counter() - fetch_start
        for video, error in batch["failed"]:
            log.warning("finetune: training skips video %d this epoch: %s", video, error)
        failed += len(batch["failed"])
        group = slice(i - i % accum, i - i % accum + accum)
        ends_step = (i + 1) % accum == 0 or i + 1 == len(sizes)
        labels, decoded = batch["labels"].to(device, non_blocking=True), batch["decoded"].to(device)
        pixels, targets = blending(model.pixels(batch["clips"].to(device, non_blocking=True)), labels,
                                   batch_rng(config.seed, epoch, i, process.rank))
        sync = contextlib.nullcontext() if ends_step or process.world_size == 1 else net.no_sync()
        with sync:
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = net(pixels).float()
            loss = (F.cross_entropy(logits, targets, reduction="none") * decoded).sum()
            opt.scaler.scale(loss * process.world_size / sum(sizes[group])).backward()
        if ends_step:
            opt.scaler.step(opt.optimizer)
            opt.scaler.update()
            opt.optimizer.zero_grad(set_to_none=True)
            opt.schedule.step()
            step += 1
        loss_sum += loss.detach().double()
        correct += ((logits.argmax(1) == labels) & (decoded > 0)).sum()
        seen += int(batch["decoded"].sum())
        progress.update(1)
        if process.is_main and i % PROGRESS_LOSS_EVERY == 0:
            progress.set_postfix(loss=f"{float(loss_sum) / max(seen, 1):.4f}",
                                 clips_per_s=f"{seen / (time.perf_counter() - started):.2f}", refresh=False)
        fetch_start = time.perf_counter()
    progress.close()
    seconds = time.perf_counter() - started
    loss_sum, correct, seen, failed, wait = sum_across(process, [float(loss_sum), int(correct), seen, failed,
                                                                 wait / process.world_size])
    return step, {"train_loss": loss_sum / max(seen, 1), "train_top1": correct / max(seen, 1),
                  "train_clips_per_s": seen / seconds, "data_wait_share": wait / seconds,
                  "train_failed_clips": int(failed), "started": started}


def _metrics_record(evaluation: dict) -> dict:
    """An evaluation's figures for metrics.jsonl."""
    record = {"val_top1": evaluation["top1"], "val_top5": evaluation["top5"],
              "val_mean_class_accuracy": evaluation["mean_class_accuracy"]}
    if "novel" in evaluation:
        record.update(val_novel_top1=evaluation["novel"]["top1"], val_novel_top5=evaluation["novel"]["top5"],
                      val_harmonic_mean=evaluation["harmonic_mean"])
    return record


def _end_epoch(out: Path, model: VideoCLIP, evaluation: dict, epoch: int, step: int, stats: dict, best_top1: float,
               opt: Optimisation, rng_states: list, device: torch.device, events: EpochEvents | None) -> float:
    """On the main process: log the epoch, keep the best weights, checkpoint. Returns the best top-1 so far."""
    started = stats.pop("started")
    record = {"event": "epoch", "epoch": epoch, "step": step, "lr": opt.schedule.get_last_lr()[0], **stats,
              "epoch_seconds": time.perf_counter() - started, **_metrics_record(evaluation), "wall_time": time.time()}
    log_epoch(out, record, events)
    log.info("finetune epoch %d/%d: loss %.4f, train top-1 %.3f, val top-1 %.3f top-5 %.3f, lr %.2e, %.2f clips/s, "
             "data wait %.1f%%", epoch + 1, opt.epochs, record["train_loss"], record["train_top1"], record["val_top1"],
             record["val_top5"], record["lr"], record["train_clips_per_s"], 100 * record["data_wait_share"])
    if evaluation["top1"] > best_top1:
        best_top1 = evaluation["top1"]
        weights = saved_weights(model)
        atomic_save(lambda p: save_file(weights, p), out / "best.safetensors")
    save_checkpoint(out, model, {"epoch": epoch, "step": step, "best_top1": best_top1, "grad_accum": opt.grad_accum,
                                 "device": device.type, "optimizer": opt.optimizer.state_dict(),
                                 "schedule": opt.schedule.state_dict(), "scaler": opt.scaler.state_dict(),
                                 "rng": rng_states})
    return best_top1


def extract_flags(config: FinetuneConfig, towers: Path, size: int) -> str:
    """The flags that extract the written towers' features from the clips the run was evaluated on."""
    return (f"--model {config.model} --pretrained {towers}{f' --size {size}' if config.size else ''} --sampling vifi "
            f"--frames {config.frames} --eval-views {config.eval_views} --resize {vifi_short_side(size)} --mean "
            f"{config.mean} --std {config.std}")


def chosen_epoch(out: Path, weights: str) -> int:
    """The epoch whose weights `--weights` names: the last, or the first with the best validation top-1."""
    epochs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    epochs = [record for record in epochs if record.get("event") == "epoch"]
    if weights == "last":
        return epochs[-1]["epoch"]
    return max(epochs, key=lambda record: (record["val_top1"], -record["epoch"]))["epoch"]


def write_towers(out: Path, model: VideoCLIP, config: FinetuneConfig, backbone: dict) -> Path:
    """towers.pt: the chosen weights (`--weights`) as open_clip weights with ViFi-CLIP's record and prompts."""
    path = out / f"{config.weights}.safetensors"
    load_weights(model, load_file(path), path)
    record = {"format": "vifi-clip", "trained_by": "evl-cache finetune", "run": str(out.resolve()),
              "weights": config.weights, "epoch": chosen_epoch(out, config.weights), "model": config.model,
              "base": config.pretrained,
              "base_sha256": backbone["weights_sha256"], "tune": config.tune, "frames": config.frames,
              "mean": list(channel_values(config.mean, "mean")), "std": list(channel_values(config.std, "std"))}
    record.update(model.prompt_record())
    write_vifi_weights(out / TOWERS_FILE, model.open_clip_state(), record, model.block_prompts())
    return out / TOWERS_FILE


def _finish(out: Path, model: VideoCLIP, config: FinetuneConfig, splits: VideoSplits, backbone: dict,
            summary: FinetuneSummary) -> FinetuneSummary:
    """On the main process: the last evaluation's files, the curves, towers.pt, and the summary line."""
    write_evaluation(out, "val", summary.final, splits.class_names, splits.novel_classes or None)
    plot_curves(out / "curve.png", out / "metrics.jsonl")
    summary.towers = write_towers(out, model, config, backbone)
    log_epoch(out, {"event": "summary", "seconds": summary.seconds, "steps": summary.steps,
                    "best_val_top1": summary.best_top1, **_metrics_record(summary.final),
                    **({"start_val_top1": summary.start["top1"]} if summary.start else {}),
                    "towers": str(summary.towers)}, None)
    log.info(summary.line())
    return summary


def finetune(config: FinetuneConfig) -> FinetuneSummary:
    """Fine-tune (or prompt) CLIP's towers on videos, ViFi-CLIP's way; see FinetuneConfig for the options."""
    process = init_process(resolve_device(config.device))
    device = bind_device(process.device(resolve_device(config.device)))
    _check_options(config, process)
    with deterministic_kernels(device):
        return _finetune(config, process, device)


def _finetune(config: FinetuneConfig, process: Process, device: torch.device) -> FinetuneSummary:
    """`finetune` in this process: the run folder, the videos, the model, then epoch by epoch."""
    out = Path(config.out)
    on_main(process, lambda: check_run_folder(out, [], config.overwrite, config.resume))
    videos = dataset_of(input_config(config))
    base = read_class_names(config.base_classes) if config.base_classes is not None else None
    splits = video_splits(videos, base, config.shots, config.val_fraction, config.seed)
    model, backbone = build_model(config, splits.class_names)
    run_config = run_record(config, splits, splits_fingerprint(videos, splits), backbone, model)
    differ = "the videos, classes or base weights differ from the run's"
    on_main(process, lambda: prepare_run_folder(out, run_config, config.overwrite, config.resume, RESUMABLE_CHANGES,
                                                options="finetune", inputs=("inputs", differ)))
    resumed = latest_state(out) if config.resume else None
    model.to(device)
    net = distributed(model, process, device, config.seed)
    opt = _optimisation(config, model, len(splits.train), device)
    start_epoch, step, best_top1 = restore(resumed, out, model, opt, process, device, config.seed, "finetune")
    if config.resume and process.is_main:
        keep_finished_epochs(out / "metrics.jsonl", start_epoch - 1)
    events = EpochEvents(out) if config.tensorboard and process.is_main else None
    log.info("finetune: %d train / %d val videos%s, %d classes, tune %s, %d trained parameters, %d steps (%d epochs "
             "of %d), device %s, %d process(es)", len(splits.train), len(splits.val),
             f" / {len(splits.novel)} novel" if len(splits.novel) else "", len(splits.class_names), config.tune,
             run_config["trained_parameters"], opt.total_steps, opt.epochs, opt.steps_per_epoch, device,
             process.world_size)
    size = backbone["image_size"]
    evaluate = _evaluation(config, videos, splits, size, opt.micro_batch, process, device)
    start = _evaluate_first(config, out, model, evaluate, start_epoch, process)
    batches = EpochBatches(len(splits.train), opt.micro_batch, config.seed, process.rank, process.world_size)
    augmentation = Augmentation(config.flip, config.color_jitter, config.gray_scale)
    clips = TrainingClips(videos, splits.train, splits.train_labels, config.frames, size, config.seed, augmentation,
                          config.decode_timeout or None)
    loader = training_loader(clips, batches, config.workers)
    blending = Blending(len(splits.class_names), config.label_smoothing, config.mixup, config.cutmix,
                        config.mixup_switch_prob)
    started, final = time.perf_counter(), {}
    for epoch in range(start_epoch, opt.epochs):
        step, stats = _train_epoch(net, model, loader, batches, epoch, step, opt, blending, config, process, device)
        final = evaluate(model)
        rng_states = gather_objects(process, rng_state(device))
        if process.is_main:
            best_top1 = _end_epoch(out, model, final, epoch, step, stats, best_top1, opt, rng_states, device, events)
    if events is not None:
        events.close()
    if start_epoch >= opt.epochs:  # resumed a run that had already finished: evaluate its last weights
        final = evaluate(model)
    barrier(process)
    summary = FinetuneSummary(out, opt.epochs, step, time.perf_counter() - started, start, best_top1, final,
                              out / TOWERS_FILE, extract_flags(config, out / TOWERS_FILE, size))
    return _finish(out, model, config, splits, backbone, summary) if process.is_main else summary


def _evaluate_first(config: FinetuneConfig, out: Path, model: VideoCLIP, evaluate: Evaluation, start_epoch: int,
                    process: Process) -> dict:
    """The starting towers' evaluation (their zero-shot on the classes), logged as metrics.jsonl's `start`
    record; a resumed run reads it back instead."""
    if start_epoch > 0 or not config.evaluate_first:
        return _logged_start(out) if process.is_main else {}
    start = evaluate(model)
    if process.is_main:
        log_epoch(out, {"event": "start", "epoch": -1, **_metrics_record(start), "wall_time": time.time()}, None)
        log.info("finetune: before training, val top-1 %.3f top-5 %.3f", start["top1"], start["top5"])
    return start


def _logged_start(out: Path) -> dict:
    """The `start` record of a resumed run's metrics.jsonl, as an evaluation's top-1 and top-5 ({} if none)."""
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        record = json.loads(line)
        if record.get("event") == "start":
            return {"top1": record["val_top1"], "top5": record["val_top5"]}
    return {}
