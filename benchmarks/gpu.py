"""What does a GPU give evl-cache, and is every command right on one? One run of under 10 minutes on
one GPU; each figure against a baseline from the same run.

- extraction: `extract()` clips/s on generated Kinetics-like videos (ViT-B/16 with random weights,
  8 x 16, 4 blocks, one clip per video, decode workers = cores) against the backbone-only forward
  (float16 autocast, as extraction runs it) of clips already in GPU memory;
- agreement: a few of those videos extracted on the CPU and on the GPU: the tokens' relative RMS
  difference against float16's unit roundoff (2^-11), the maps' largest difference against the 1e-3
  bound (constants, not measurements);
- training: `train()` clips/s from a cache of many short videos (its fastest epoch after the first)
  against the decoder's training step on one batch already in GPU memory;
- loader: `CacheLoader` GB/s with pinned buffers and the copies to the GPU, against reading the same
  cache files whole (both from the page cache);
- memory: a training step's peak GPU memory per clip (torch.cuda.max_memory_allocated at two
  micro-batches) against `evl_cache.decoder.memory`'s estimate;
- fine-tuning: `finetune`'s model (ViFi-CLIP's, `--tune both`: both towers, 16 frames, 400 class prompts
  through the text tower every step) taking AdamW steps on a batch of clips in GPU memory, without and
  with activation checkpointing: clips/s and peak GPU memory, against the frozen backbone's forward of
  the same clips (what extraction pays once per clip);
- torchrun: one-process extraction and training under torchrun (NCCL on a GPU) against the same in this
  process: equal caches and weights, and the seconds (torchrun's include its start).

`--device cpu --tiny` runs every phase at toy sizes (EVL-Tiny) on the CPU, a check of the script itself
(tests/test_gpu_benchmark.py) whose figures mean nothing; its memory phase prints the estimate alone.
The exit status is 1 when a result is wrong (caches or weights that differ where they must be equal),
not when a goal is missed.

Run: python benchmarks/gpu.py [--device cuda] [--tiny] [--work DIR]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

# cuBLAS reads it when it starts: set before this process's first matmul, so that the runs compared
# here (this process's and torchrun's) use the same deterministic kernels
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import (  # noqa: E402
    VIDEO_FPS,
    VIDEO_HEIGHT,
    VIDEO_SECONDS,
    VIDEO_WIDTH,
    Timer,
    load_line,
    machine_line,
    print_result,
    write_kinetics_like_videos,
)

from evl_cache.cache.dataset import CacheDataset, CacheLoader, EpochBatches, model_inputs, usable_videos  # noqa: E402
from evl_cache.cache.extract import ExtractConfig, extract  # noqa: E402
from evl_cache.cache.store import FeatureStore  # noqa: E402
from evl_cache.decoder.memory import step_memory  # noqa: E402
from evl_cache.decoder.run import build_model, load_run, run_selection  # noqa: E402
from evl_cache.decoder.train import TrainConfig, train  # noqa: E402
from evl_cache.towers.backbone import FrozenBackbone, load_clip  # noqa: E402
from evl_cache.tuning import finetune as tuning  # noqa: E402

FLOAT16_ROUNDOFF = 2.0**-11
MAP_BOUND = 1e-3


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What a run measures on: the backbone, the videos (height, width, seconds, fps), the batches."""
    model: str
    frames: int
    stride: int
    blocks: int
    videos: int
    video: tuple[int, int, float, int]
    agreement_videos: int
    train_videos: int
    train_video: tuple[int, int, float, int]
    extract_batch: int
    train_batch: int
    epochs: int
    steps: int
    memory_batches: tuple[int, int]
    finetune: tuple[int, int, int]  # fine-tuning's frames per clip, clips per step, classes


FULL = Sizes("ViT-B-16", 8, 16, 4, 192, (VIDEO_HEIGHT, VIDEO_WIDTH, VIDEO_SECONDS, VIDEO_FPS), 8, 512,
             (128, 170, 5.0, 25), 32, 64, 3, 20, (16, 48), (16, 8, 400))
TINY = Sizes("EVL-Tiny", 4, 3, 2, 6, (40, 52, 1.0, 24), 2, 12, (40, 52, 1.0, 24), 4, 4, 2, 3, (2, 4), (4, 2, 4))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.float16, enabled=device.type == "cuda")


def _write_chunk(job: tuple) -> None:
    folder, first, count, (height, width, seconds, fps) = job
    write_kinetics_like_videos(folder, count, seconds, fps, height, width, split="train", first=first)


def write_videos(folder: Path, count: int, shape: tuple) -> Path:
    """`count` videos of `shape` in folder/train/<class>/, written by one process per core."""
    workers = max(min(os.cpu_count() or 1, count), 1)
    bounds = np.linspace(0, count, workers + 1).astype(int)
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_chunk, [(folder, int(a), int(b - a), shape) for a, b in zip(bounds, bounds[1:])]))
    return folder


def extract_options(sizes: Sizes, device: str) -> dict:
    return dict(model=sizes.model, pretrained="none", frames=sizes.frames, stride=sizes.stride, blocks=sizes.blocks,
                train_views=1, eval_views=1, batch_size=sizes.extract_batch, workers=os.cpu_count() or 1,
                device=device)


def train_options(sizes: Sizes, device: str, epochs: int, workers: int) -> dict:
    return dict(layers=sizes.blocks, epochs=epochs, batch_size=sizes.train_batch, lr=1e-3, workers=workers,
                device=device)


def cli_args(options: dict) -> list[str]:
    return [part for name, value in options.items() for part in ("--" + name.replace("_", "-"), str(value))]


def backbone_clips_per_second(sizes: Sizes, device: torch.device, frames: int, batch: int) -> float:
    """The frozen backbone alone on a batch of `batch` clips of `frames` frames already on `device`, as
    extraction runs it."""
    clip, spec = load_clip(sizes.model, "none", None, "cpu", seed=0)
    backbone = FrozenBackbone(clip.visual, sizes.blocks, spec.mean, spec.std).to(device)
    clips = random_clips(batch, frames, spec.image_size, device)
    with autocast(device):
        backbone(clips)
        synchronize(device)
        with Timer() as timer:
            for _ in range(sizes.steps):
                backbone(clips)
            synchronize(device)
    return sizes.steps * batch / timer.seconds


def random_clips(batch: int, frames: int, size: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 256, (batch, frames, 3, size, size), dtype=torch.uint8, device=device)


def extraction_phase(sizes: Sizes, videos: Path, work: Path, device: torch.device, settings: dict) -> None:
    summary = extract(ExtractConfig(videos=videos, out=work / "extract.zarr", **extract_options(sizes, str(device))))
    baseline = backbone_clips_per_second(sizes, device, sizes.frames, sizes.extract_batch)
    print_result("gpu", f"extraction clips/s, {sizes.model} {sizes.frames}x{sizes.stride}, {summary.clips} Kinetics-"
                 f"like clips, {os.cpu_count()} decode workers, vs the backbone alone on clips in {device.type} memory",
                 summary.clips_per_second, baseline, "clips/s", "ours/baseline", "", None, None, settings)


def _feature_names(store: FeatureStore) -> list[str]:
    blocks = store.attrs["blocks"]
    return ([f"tokens/block_{b}" for b in blocks] + [f"maps/block_{b}/{d}" for b in blocks for d in ("prev", "next")]
            + ["embed"])


def cache_arrays(cache: Path) -> dict[str, np.ndarray]:
    with FeatureStore(cache) as store:
        arrays = {name: np.asarray(store.array(name)[...]) for name in _feature_names(store)}
        arrays["status"] = store.column("status")
    return arrays


def agreement_phase(sizes: Sizes, videos: Path, work: Path, device: torch.device, settings: dict) -> None:
    """A few videos (work/subset) extracted on the CPU and on `device` (work/agreement-<device>.zarr): the
    difference of the two caches."""
    subset = work / "subset"
    for path in sorted(videos.rglob("*.mp4"))[:sizes.agreement_videos]:
        (subset / path.relative_to(videos)).parent.mkdir(parents=True, exist_ok=True)
        (subset / path.relative_to(videos)).symlink_to(path)
    caches = {name: work / f"agreement-{name}.zarr" for name in ("cpu", device.type)}
    for name, out in caches.items():
        extract(ExtractConfig(videos=subset, out=out, **extract_options(sizes, name)))
    cpu, gpu = cache_arrays(caches["cpu"]), cache_arrays(caches[device.type])
    if not (cpu["status"] == gpu["status"]).all():
        raise SystemExit("agreement: the CPU and the device extraction did not finish the same videos")
    tokens = [n for n in cpu if n.startswith("tokens/")]
    squared = sum(float(((gpu[n].astype(np.float64) - cpu[n]) ** 2).sum()) for n in tokens)
    relative = (squared / sum(float((cpu[n].astype(np.float64) ** 2).sum()) for n in tokens)) ** 0.5
    maps = max(float(np.abs(gpu[n].astype(np.float32) - cpu[n]).max()) for n in cpu if n.startswith("maps/"))
    question = f"{device.type} cache vs the CPU's, {sizes.agreement_videos} videos"
    print_result("gpu", f"{question}: tokens' relative RMS difference vs float16's unit roundoff 2^-11", relative,
                 FLOAT16_ROUNDOFF, "", "ours/baseline", "<= 4", relative <= 4 * FLOAT16_ROUNDOFF, None, settings)
    print_result("gpu", f"{question}: maps' largest difference vs the bound 1e-3", maps, MAP_BOUND, "",
                 "ours/baseline", "<= 1", maps <= MAP_BOUND, None, settings)


def train_step(model, optimizer, scaler, inputs, labels, device: torch.device) -> None:
    """One step as `evl_cache.decoder.train` takes it: autocast forward, loss, scaled backward, AdamW."""
    with autocast(device):
        loss = F.cross_entropy(model(*inputs).float(), labels, reduction="sum")
    scaler.scale(loss / len(labels)).backward()
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def run_parts(run: Path, cache: Path, device: torch.device):
    """(model on `device` in training mode, AdamW, loss scaler, the run's dataset of the cache's videos)."""
    run_config = load_run(run)
    model = build_model(run_config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    with FeatureStore(cache) as store:
        attrs, videos = store.attrs, usable_videos(store, ("train",))
    return model, optimizer, scaler, CacheDataset(cache, videos, run_selection(attrs, run_config), views="first")


def first_batch(dataset: CacheDataset, size: int, device: torch.device) -> tuple[tuple, torch.Tensor]:
    batch = next(iter(CacheLoader.sequential(dataset, size)))
    return model_inputs(batch, device), batch["label"].to(device)


def decoder_clips_per_second(run: Path, cache: Path, sizes: Sizes, device: torch.device) -> float:
    model, optimizer, scaler, dataset = run_parts(run, cache, device)
    inputs, labels = first_batch(dataset, sizes.train_batch, device)
    train_step(model, optimizer, scaler, inputs, labels, device)
    synchronize(device)
    with Timer() as timer:
        for _ in range(sizes.steps):
            train_step(model, optimizer, scaler, inputs, labels, device)
        synchronize(device)
    return sizes.steps * len(labels) / timer.seconds


def training_phase(sizes: Sizes, work: Path, device: torch.device, settings: dict) -> tuple[Path, Path]:
    """(the training cache, the run) after timing `train` on it against the decoder alone."""
    videos = write_videos(work / "short", sizes.train_videos, sizes.train_video)
    cache, run = work / "train.zarr", work / "run"
    extract(ExtractConfig(videos=videos, out=cache, **extract_options(sizes, str(device))))
    train(TrainConfig(features=cache, out=run, **train_options(sizes, str(device), sizes.epochs, 4)))
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"epoch"' in line]
    best = max(epochs[1:] or epochs, key=lambda record: record["train_clips_per_s"])
    baseline = decoder_clips_per_second(run, cache, sizes, device)
    print_result("gpu", f"training clips/s from the cache ({sizes.train_batch} clips a step, {sizes.blocks} layers) "
                 f"vs the decoder's step on a batch in {device.type} memory", best["train_clips_per_s"], baseline,
                 "clips/s", "ours/baseline", "", None, None, settings, data_wait_share=best["data_wait_share"])
    return cache, run


def loader_phase(cache: Path, run: Path, sizes: Sizes, device: torch.device, settings: dict) -> None:
    _, _, _, dataset = run_parts(run, cache, device)
    sampler = EpochBatches(len(dataset), sizes.train_batch, seed=0)
    loader = CacheLoader(dataset, sampler, workers=4, pin_memory=device.type == "cuda")

    def epoch() -> int:
        total = 0
        for batch in loader:
            model_inputs(batch, device)
            total += sum(t.nbytes for key in ("tokens", "maps_prev", "maps_next") for t in batch.get(key) or [])
        synchronize(device)
        return total

    files = [p for name in dataset.array_names() for p in (cache / name).rglob("*") if p.is_file()
             and p.name != "zarr.json"]
    epoch()  # the cache's files into the page cache
    with Timer() as ours:
        read = epoch()
    with Timer() as raw:
        whole = sum(len(path.read_bytes()) for path in files)
    print_result("gpu", f"loader GB/s, pinned batches of {sizes.train_batch} and their copies to {device.type}, vs "
                 f"reading the cache files whole (page cache)", read / ours.seconds / 1e9, whole / raw.seconds / 1e9,
                 "GB/s", "ours/baseline", "", None, None, settings)


def memory_phase(cache: Path, run: Path, sizes: Sizes, device: torch.device, settings: dict) -> None:
    model, optimizer, scaler, dataset = run_parts(run, cache, device)
    estimate = step_memory(model, dataset, amp=device.type == "cuda")
    if device.type != "cuda":
        print(f"memory: not measured on a GPU (this run is on {device}); {estimate.describe()}")
        return
    small, large = sizes.memory_batches
    train_step(model, optimizer, scaler, *first_batch(dataset, small, device), device)  # AdamW's state made
    peaks = {}
    for size in (small, large):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        train_step(model, optimizer, scaler, *first_batch(dataset, size, device), device)
        torch.cuda.synchronize(device)
        peaks[size] = torch.cuda.max_memory_allocated(device)
    measured = (peaks[large] - peaks[small]) / (large - small)
    print_result("gpu", f"peak GPU memory per clip of a training step ({sizes.blocks} layers): the estimate vs "
                 f"torch.cuda.max_memory_allocated at {small} and {large} clips", estimate.per_clip / 1e6,
                 measured / 1e6, "MB/clip", "ours/baseline", "1 to 1.3 (at or a little above)",
                 1 <= estimate.per_clip / measured <= 1.3, None, settings, estimated_fixed_gb=estimate.fixed / 1e9,
                 measured_fixed_gb=(peaks[small] - small * measured) / 1e9)


def finetune_phase(sizes: Sizes, device: torch.device, settings: dict) -> None:
    """Fine-tuning steps of both towers on a batch in `device` memory, without and with activation
    checkpointing, against the frozen backbone's forward of the same clips."""
    frames, batch, classes = sizes.finetune
    baseline = backbone_clips_per_second(sizes, device, frames, batch)
    for checkpointing in (False, True):
        config = tuning.FinetuneConfig(model=sizes.model, pretrained="none", frames=frames, grad_checkpointing=checkpointing)
        model, backbone = tuning.build_model(config, [f"class {i}" for i in range(classes)])
        model = model.to(device).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        clips = random_clips(batch, frames, backbone["image_size"], device)
        inputs, labels = (model.pixels(clips),), torch.arange(batch, device=device) % classes
        train_step(model, optimizer, scaler, inputs, labels, device)  # AdamW's state made
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with Timer() as timer:
            for _ in range(sizes.steps):
                train_step(model, optimizer, scaler, inputs, labels, device)
            synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
        print(f"fine-tuning, activation checkpointing {'on' if checkpointing else 'off'}: peak {device.type} memory "
              + (f"{peak:.2f} GB" if peak is not None else f"not measured on a GPU (this run is on {device})"))
        print_result("gpu", f"fine-tuning clips/s ({sizes.model}, --tune both, {frames} frames, {batch} clips a step, "
                     f"{classes} classes{', activation checkpointing' if checkpointing else ''}) vs the frozen "
                     f"backbone's forward of the same clips", sizes.steps * batch / timer.seconds, baseline,
                     "clips/s", "ours/baseline", "", None, None, settings, peak_memory_gb=peak)
        del model, optimizer


def torchrun(work: Path, args: argparse.Namespace) -> float:
    """Seconds of this script's `--joined WORK` part under torchrun with one process; it must succeed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    flags = ["--device", args.device, "--joined", str(work)] + (["--tiny"] if args.tiny else [])
    with Timer() as timer:
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "1",
                                 "--master-port", str(port), str(Path(__file__).resolve()), *flags], env=env,
                                capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise SystemExit(f"the torchrun part failed:\n{result.stderr[-3000:]}")
    return timer.seconds


def joined_part(sizes: Sizes, work: Path, device: torch.device) -> None:
    """What `torchrun_phase` runs under torchrun: the subset's extraction, one epoch from its cache."""
    extract(ExtractConfig(videos=work / "subset", out=work / "torchrun.zarr", **extract_options(sizes, str(device))))
    train(TrainConfig(features=work / f"agreement-{device.type}.zarr", out=work / "torchrun-run",
                      **train_options(sizes, str(device), 1, 0)))


def torchrun_phase(sizes: Sizes, work: Path, device: torch.device, args: argparse.Namespace, settings: dict) -> bool:
    """Whether one-process torchrun runs give this process's cache and weights (their time reported)."""
    seconds = torchrun(work, args)
    a, b = cache_arrays(work / "torchrun.zarr"), cache_arrays(work / f"agreement-{device.type}.zarr")
    same_cache = a.keys() == b.keys() and all(np.array_equal(a[n], b[n]) for n in a)
    with Timer() as plain:
        train(TrainConfig(features=work / f"agreement-{device.type}.zarr", out=work / "plain-run",
                          **train_options(sizes, str(device), 1, 0)))
    from safetensors.torch import load_file
    x, y = (load_file(work / name / "last.safetensors") for name in ("plain-run", "torchrun-run"))
    same_weights = x.keys() == y.keys() and all(x[k].equal(y[k]) for k in x)
    backend = "nccl" if device.type == "cuda" else "gloo"
    print_result("gpu", f"one-process torchrun ({backend}) extract + train of {sizes.agreement_videos} videos vs the "
                 f"training in this process: seconds (torchrun's with its start and the extraction); the same cache "
                 f"and weights", seconds, plain.seconds, "s", "ours/baseline", "the same cache and weights",
                 same_cache and same_weights, None, settings, same_cache=same_cache, same_weights=same_weights)
    return same_cache and same_weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (cuda:N) or cpu")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (EVL-Tiny): a check of the script itself")
    parser.add_argument("--work", type=Path, default=None, help="folder for the videos, caches and runs "
                                                                "[default: a temporary folder, removed after]")
    parser.add_argument("--joined", type=Path, default=None, help=argparse.SUPPRESS)  # the torchrun part's folder
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here (--device cpu --tiny checks the script on a CPU)")
    sizes = TINY if args.tiny else FULL
    if args.joined is not None:
        joined_part(sizes, args.joined, device)
        return 0
    settings = {**vars(args), "work": str(args.work), **dataclasses.asdict(sizes)}
    print(machine_line())
    with tempfile.TemporaryDirectory(dir=args.work) as folder:
        work = Path(folder)
        videos = write_videos(work / "kinetics", sizes.videos, sizes.video)
        extraction_phase(sizes, videos, work, device, settings)
        agreement_phase(sizes, videos, work, device, settings)
        cache, run = training_phase(sizes, work, device, settings)
        loader_phase(cache, run, sizes, device, settings)
        memory_phase(cache, run, sizes, device, settings)
        finetune_phase(sizes, device, settings)
        right = torchrun_phase(sizes, work, device, args, settings)
    print(load_line())
    return 0 if right else 1


if __name__ == "__main__":
    sys.exit(main())
