"""What does fine-tuning CLIP's towers (`evl-cache finetune`) cost against extracting once and training
heads from the cache, on this CPU, for a small tower?

The same videos, frames and epochs on both sides: the demo's synthetic videos (4 classes, `train/` and
`val/` splits), `--frames` frames per clip with ViFi-CLIP's segment sampling, `--epochs` epochs, batch
`--batch`, decoding in the training process (`--workers 0` by default, so a process's memory is all of its
work's).

- ours, fine-tuning: `finetune()` with ViFi-CLIP's recipe (`--tune both`: both towers and the logit
  scale; mixup/cutmix, its augmentation), an evaluation of the validation videos after every epoch, no
  evaluation before the first; its wall time, and its training clips/s (metrics.jsonl: decoding and
  augmentation included).
- baseline, the cache: `extract()` once (the same model, sampling vifi, the same frames, one view of each
  training and validation video, `--blocks` blocks), then `train()` for the same epochs with each
  `--heads` head (the EVL decoder `linear`; `text`: ViFi-CLIP's text side, learned prompts over the
  cached frame embeddings); wall time extract + train, and train's clips/s.
- peak memory: each call runs alone in a fresh process (spawned); the figure is that process's peak
  resident set size (`resource.getrusage().ru_maxrss`) after the call minus before it, i.e. how much the
  call raised the process's peak. The baseline's is the larger of its extraction's and its training's.

Both sides use random weights (`--pretrained none`): their accuracies are printed but say nothing of
what pretrained towers reach. The ratios are what this script is for.

Run: python benchmarks/bench_finetune.py [--model EVL-Small] [--frames 16] [--epochs 3] [--batch 8]
     [--videos-per-class 6] [--workers 0] [--heads linear,text] [--grad-checkpointing] [--threads N]
     [--wait-quiet SECONDS]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, add_quiet_option, load_line, machine_line, print_result, wait_until_quiet  # noqa: E402

from evl_cache.cache.extract import ExtractConfig, extract  # noqa: E402
from evl_cache.decoder.train import TrainConfig, train  # noqa: E402
from evl_cache.towers.backbone import load_clip  # noqa: E402
from evl_cache.tuning.finetune import FinetuneConfig, finetune  # noqa: E402
from evl_cache.video.pixels import vifi_short_side  # noqa: E402
from evl_cache.video.synthetic import make_sample_dataset  # noqa: E402

IMAGENET = {"mean": "0.485,0.456,0.406", "std": "0.229,0.224,0.225"}  # finetune's default normalisation


def measured(call: str, options: dict, threads: int | None) -> dict:
    """Run one of CALLS in this (fresh) process with `threads` torch threads (None: torch's own): its
    seconds, the rise of the peak RSS in MB, its figures."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    figures = CALLS[call](options)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
            **figures}


def epoch_figures(run: Path) -> dict:
    """A run folder's training clips/s and epoch seconds (training and evaluation), means over its epochs,
    and its last validation top-1."""
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [record for record in epochs if record["event"] == "epoch"]
    return {"clips_per_s": sum(r["train_clips_per_s"] for r in epochs) / len(epochs),
            "epoch_seconds": sum(r["epoch_seconds"] for r in epochs) / len(epochs), "top1": epochs[-1]["val_top1"]}


def run_finetune(options: dict) -> dict:
    finetune(FinetuneConfig(**options))
    return epoch_figures(Path(options["out"]))


def run_extract(options: dict) -> dict:
    summary = extract(ExtractConfig(**options))
    return {"clips": summary.clips}


def run_train(options: dict) -> dict:
    train(TrainConfig(**options))
    return epoch_figures(Path(options["out"]))


CALLS = {"finetune": run_finetune, "extract": run_extract, "train": run_train}


def in_fresh_process(call: str, options: dict, threads: int | None) -> dict:
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(measured, call, options, threads).result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="EVL-Small", help="open_clip model (random weights); EVL-Small: 64 px, "
                        "6 blocks of width 128")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (ViFi-CLIP: 16)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="clips per step on both sides")
    parser.add_argument("--videos-per-class", type=int, default=6, help="training videos per class (4 classes); "
                        "half as many validation videos")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes of finetune and extract (0: in "
                        "the measured process, so its memory is all of the work's)")
    parser.add_argument("--blocks", type=int, default=4, help="blocks the cache holds (the EVL decoder's layers)")
    parser.add_argument("--heads", default="linear,text", help="train's heads trained from the one cache")
    parser.add_argument("--grad-checkpointing", action="store_true", help="finetune with activation checkpointing")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of each measured process "
                        "[default: torch's own]; 1 is steadier on a machine other processes share")
    add_quiet_option(parser)
    args = parser.parse_args()
    print(machine_line())
    if args.wait_quiet:
        print(wait_until_quiet(args.wait_quiet))
    _, spec = load_clip(args.model, "none")
    with tempfile.TemporaryDirectory(prefix="bench_finetune_") as tmp:
        tmp = Path(tmp)
        videos = make_sample_dataset(tmp / "videos", videos_per_class={"train": args.videos_per_class,
                                                                       "val": max(args.videos_per_class // 2, 1)},
                                     num_frames=64, size=(96, 128))
        common = {"model": args.model, "pretrained": "none", "frames": args.frames, "workers": args.workers,
                  "device": "cpu", **IMAGENET}
        tuned = {**common, "videos": videos, "out": tmp / "finetune", "epochs": args.epochs, "batch_size": args.batch,
                 "lr": 1e-4, "warmup_epochs": 1, "evaluate_first": False, "grad_checkpointing": args.grad_checkpointing}
        cached = {**common, "videos": videos, "out": tmp / "cache.zarr", "sampling": "vifi", "blocks": args.blocks,
                  "train_views": 1, "eval_views": 1, "resize": vifi_short_side(spec.image_size),
                  "batch_size": args.batch}
        heads = args.heads.split(",")
        with OtherLoad() as other:
            ours = in_fresh_process("finetune", tuned, args.threads)
            extraction = in_fresh_process("extract", cached, args.threads)
            trained = {head: in_fresh_process("train", {"features": cached["out"], "out": tmp / f"train_{head}",
                                                        "head": head, "layers": args.blocks, "epochs": args.epochs,
                                                        "batch_size": args.batch, "workers": 0, "device": "cpu"},
                                              args.threads)
                       for head in heads}
    report(args, ours, extraction, trained, other)


def report(args: argparse.Namespace, ours: dict, extraction: dict, trained: dict, other: OtherLoad) -> None:
    """Print the figures and one result line per head: fine-tuning's wall time, clips/s and peak memory
    against extract once + train that head."""
    setup = (f"{args.model} {args.frames} frames, batch {args.batch}, {args.epochs} epochs, workers {args.workers}, "
             f"{args.threads or 'default'} torch threads")
    print(f"\nsetup: {setup}; {extraction['clips']} clips extracted (train + val)")
    tuned = f"--tune both{', grad checkpointing' if args.grad_checkpointing else ''}"
    print(f"finetune ({tuned}): {ours['seconds']:.1f} s, "
          f"{ours['clips_per_s']:.2f} training clips/s, {ours['epoch_seconds']:.2f} s per epoch (training and "
          f"evaluation), peak RSS +{ours['peak_rss_mb']:.0f} MB, last val top-1 {ours['top1']:.3f}")
    print(f"extract once: {extraction['seconds']:.1f} s ({extraction['clips'] / extraction['seconds']:.2f} clips/s), "
          f"peak RSS +{extraction['peak_rss_mb']:.0f} MB")
    for head, run in trained.items():
        total = extraction["seconds"] + run["seconds"]
        peak = max(extraction["peak_rss_mb"], run["peak_rss_mb"])
        memory = ours["peak_rss_mb"] / peak if peak > 0 else float("nan")
        print(f"train --head {head} from the cache: {run['seconds']:.1f} s, {run['clips_per_s']:.1f} training "
              f"clips/s, {run['epoch_seconds']:.2f} s per epoch, peak RSS +{run['peak_rss_mb']:.0f} MB, last val "
              f"top-1 {run['top1']:.3f}; extract + train {total:.1f} s: finetune takes {ours['seconds'] / total:.2f}x "
              f"the time and {memory:.2f}x the peak memory; a fine-tuning epoch costs "
              f"{ours['epoch_seconds'] / run['epoch_seconds']:.1f} epochs of this head from the cache, or "
              f"{ours['epoch_seconds'] / extraction['seconds']:.2f} extractions")
        print_result("finetune", f"finetune ({tuned}) {args.epochs} epochs vs extract once + train --head {head} "
                     f"{args.epochs} epochs ({setup})", ours["seconds"], total, "s", "ours/baseline", "", None,
                     other.share, vars(args), finetune_clips_per_s=ours["clips_per_s"],
                     head_clips_per_s=run["clips_per_s"], extract_seconds=extraction["seconds"],
                     train_seconds=run["seconds"], finetune_epoch_seconds=ours["epoch_seconds"],
                     head_epoch_seconds=run["epoch_seconds"], finetune_peak_rss_mb=ours["peak_rss_mb"],
                     baseline_peak_rss_mb=peak,
                     finetune_top1=ours["top1"], head_top1=run["top1"])
    print(f"while timing: {other.note()}")
    print(load_line())


if __name__ == "__main__":
    main()
