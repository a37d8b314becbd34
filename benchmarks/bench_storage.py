"""What does each storage option cost in bytes, in loader speed and in accuracy?

Two generated datasets: the demo's sample (`SAMPLE_CLASSES`: 4 classes, two told apart by motion,
two by colour) and a harder one (`MOTION_CLASSES`: 8 classes of one small square told apart only by
direction x speed, its start drawn alike for both directions of an axis). Each is extracted once per
storage option (fp16, int8, fp8, int4, and fp16, int8 and int4 with --compress zstd) by `extract()`, from
the same videos with the same backbone (the shipped EVL-Small, random weights of seed 0) and
sampling (8 frames x stride 4). Then, from each cache:

- bytes per clip view: the cache's feature files on disk over the views they hold (shard indexes
  included), and `plan`'s figure (exact for uncompressed caches; zstd is not predicted);
- loader clips/s: epochs of `CacheLoader` reads of the training videos (what a 4-layer run reads:
  tokens, maps and their scales; --workers reader threads, batches of 16, as `train` reads), warm
  (files in the page cache, one untimed epoch first), interleaved over the options, the fastest of
  --repeats timings. EVL-Small's clips are small, so the same is measured on a ViT-B/16-shaped cache
  of each option: bench_loader's `write_cache` (random float16, 8 frames, 4 blocks with maps), stored
  in each encoding by extraction's own encoder (`stored_features`); there also reads + decoding on
  this CPU (`model_inputs`, which runs on the training device). Random values hardly compress, so
  its zstd rows show the cost of the zstd path, not its savings;
- top-1 accuracy: the full EVL decoder (4 layers, temporal modules on) trained by `train()` with
  each of --seeds seeds (the same seeds, hence the same initial weights and data order, on every
  cache) with one recipe (the demo's, with the authors' dropout), evaluated by `evaluate()` on the
  last weights (no selection on the validation videos).

Verdict per option and dataset: "within noise" when |mean top-1 - fp16's mean top-1| <= the larger
of the two standard deviations over seeds, else "measured loss" (or "measured gain"). An option is
recommended only when it is within noise on every dataset.

What these figures are not: accuracy of a pretrained CLIP on real videos (random weights, synthetic
data), or a GPU's loader speed (this CPU; other processes' CPU share is printed with each timing).

Run: python benchmarks/bench_storage.py [--seeds 3] [--epochs 30] [--options fp16,int8,...]
         [--datasets sample,motion] [--train-videos N] [--val-videos N] [--b16-videos 32] [--repeats 3]
         [--workers 2] [--threads N] [--tries 2] [--wait-quiet 30] [--dir DIR]
The defaults took 43 minutes on 2 CPU cores that other processes shared (35-63 % of the CPU), most
of it training (36 runs); `--seeds 2 --epochs 1 --train-videos 1 --val-videos 1 --b16-videos 8
--repeats 1 --tries 1 --wait-quiet 0` checks that it runs in about 2 minutes.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BLOCKS,
    OtherLoad,
    Timer,
    add_clean_options,
    clean_run,
    load_line,
    loader_epoch,
    machine_line,
    print_result,
    share_note,
    train_loader,
)
from bench_loader import array_files, write_cache  # noqa: E402

from evl_cache.apps.demo import DemoConfig  # noqa: E402
from evl_cache.cache.dataset import CacheDataset, model_inputs, select_features, usable_videos  # noqa: E402
from evl_cache.cache.extract import ExtractConfig, extract  # noqa: E402
from evl_cache.cache.plan import plan  # noqa: E402
from evl_cache.cache.store import DONE, FeatureStore  # noqa: E402
from evl_cache.cache.verify import cache_layout_of  # noqa: E402
from evl_cache.cache.writer import stored_features  # noqa: E402
from evl_cache.decoder.evaluate import EvalConfig, evaluate  # noqa: E402
from evl_cache.decoder.train import TrainConfig, train  # noqa: E402
from evl_cache.video.synthetic import MOTION_CLASSES, MOTION_SPLITS, SAMPLE_CLASSES, ShapeClass, make_sample_dataset  # noqa: E402

OPTIONS = {"fp16": ("fp16", "none"), "fp16+zstd": ("fp16", "zstd"), "int8": ("int8", "none"),
           "int8+zstd": ("int8", "zstd"), "fp8": ("fp8", "none"), "int4": ("int4", "none"),
           "int4+zstd": ("int4", "zstd")}  # (storage, compress)
BASELINE = "fp16"
DEMO = DemoConfig()
FRAMES, STRIDE = 8, 4  # the demo's sampling
BATCH = 16  # clips per loader batch and per training step (the demo's)
# One recipe for every cache: the demo's (4 layers, temporal modules on, lr 1e-3, batch 16, in memory) with
# the authors' dropout (0.5, the default), not the demo's 0: in a trial on the motion set (24 train / 12 val videos
# per class, fp16), 3 seeds without dropout ended at top-1 0.93, 0.68 and 0.83, with it at 0.80, 0.73 and 0.80.
RECIPE = dict(layers=BLOCKS, batch_size=BATCH, lr=1e-3, in_memory=True)
B16_MODEL, B16_BATCH = "ViT-B-16", 8


@dataclass(frozen=True)
class Benchmark:
    """A generated dataset and how its clips are cut."""
    classes: Mapping[str, ShapeClass]
    videos_per_class: Mapping[str, int]
    video_frames: int
    eval_views: int
    about: str


DATASETS = {
    "sample": Benchmark(SAMPLE_CLASSES, {"train": DEMO.train_videos, "val": DEMO.val_videos}, 48, 3,
                        "the demo's sample: 2 classes by motion, 2 by colour"),
    # 32-frame videos: the 29-frame clip covers almost all of each motion (so its views would coincide).
    "motion": Benchmark(MOTION_CLASSES, MOTION_SPLITS, 32, 1,
                        "direction x speed of one small square, starts alike for both directions of an axis"),
}


def extract_config(videos: Path, out: Path, bench: Benchmark, option: str) -> ExtractConfig:
    storage, compress = OPTIONS[option]
    return ExtractConfig(videos=videos, out=out, model=DEMO.model, pretrained="none", seed=0, frames=FRAMES,
                         stride=STRIDE, eval_views=bench.eval_views, train_views=1, storage=storage,
                         compress=compress, workers=2, device="cpu")


def disk_bytes_per_view(cache: Path) -> float:
    """The feature files' bytes (chunks and shard indexes) over the clip views the cache holds."""
    with FeatureStore(cache) as store:
        layout = cache_layout_of(store, store.check_version())
        views = int(store.column("views")[store.column("status") == DONE].sum())
    return sum(path.stat().st_size for path in array_files(cache, list(layout.feature_arrays()))) / views


def training_reads(cache: Path) -> CacheDataset:
    """The training videos' items as a 4-layer run with cross-attention reads them."""
    with FeatureStore(cache) as store:
        attrs = store.check_version()
        videos = usable_videos(store, ("train",))
    return CacheDataset(cache, videos, select_features(attrs, BLOCKS, None, 1, True), views="random")


def loader_rates(datasets: dict[str, CacheDataset], step, batch: int, workers: int, repeats: int,
                 min_seconds: float = 1.0) -> dict[str, float]:
    """Clips/s of training epochs through `CacheLoader` (`step(batch)` on each batch) per dataset: one
    untimed epoch each, then `repeats` timings interleaved over the datasets, each of as many epochs
    as take `min_seconds`; the fastest timing counts (other processes only ever add time)."""
    loaders = {name: train_loader(dataset, batch, workers) for name, dataset in datasets.items()}
    for sampler, loader in loaders.values():
        loader_epoch(sampler, loader, 0, step)
    rates = {name: 0.0 for name in datasets}
    for _ in range(repeats):
        for name, (sampler, loader) in loaders.items():
            clips, seconds, epoch = 0, 0.0, 1
            while seconds < min_seconds:
                seconds += loader_epoch(sampler, loader, epoch, step)[0]
                clips += len(datasets[name])
                epoch += 1
            rates[name] = max(rates[name], clips / seconds)
    return rates


def reencode(source: Path, out: Path, option: str) -> Path:
    """A copy of the float16 cache `source` in another storage option, encoded by extraction's own
    encoder shard by shard."""
    storage, compress = OPTIONS[option]
    with FeatureStore(source) as cache:
        attrs = cache.check_version()
        layout = dataclasses.replace(cache_layout_of(cache, attrs), encoding=storage, compress=compress)
        columns = {name: cache.column(name) for name in ("path", "label", "split")}
        with FeatureStore.create(out, layout, {**attrs, "storage": {"encoding": storage, "compress": compress}},
                                 columns) as target:
            for start in range(0, layout.num_videos, layout.shard_size):
                def rows(name: str) -> torch.Tensor:
                    return torch.from_numpy(np.asarray(cache.array(name)[start:start + layout.shard_size]))

                output = SimpleNamespace(block_outputs=[rows(f"tokens/block_{b}") for b in layout.blocks],
                                         maps_prev=[rows(f"maps/block_{b}/prev") for b in layout.blocks],
                                         maps_next=[rows(f"maps/block_{b}/next") for b in layout.blocks],
                                         embeddings=rows("embed"))
                for name, values in stored_features(output, layout).items():
                    target.write_block(name, start, values)
            for name in ("views", "frames", "status"):
                target.write_rows(name, 0, cache.column(name))
    return out


def verdict(accuracies: list[float], baseline: list[float]) -> tuple[float, str]:
    """(mean top-1 difference to the baseline, the rule's verdict)."""
    delta = statistics.mean(accuracies) - statistics.mean(baseline)
    if min(len(accuracies), len(baseline)) < 2:
        return delta, "no noise estimate (1 seed)"
    if abs(delta) <= max(statistics.stdev(accuracies), statistics.stdev(baseline)):
        return delta, "within noise"
    return delta, "measured loss" if delta < 0 else "measured gain"


def mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per cache (0, 1, ...)")
    parser.add_argument("--epochs", type=int, default=DEMO.epochs, help="training epochs per run")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"storage options, fp16 first; of {list(OPTIONS)}")
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"of {list(DATASETS)}")
    parser.add_argument("--train-videos", type=int, default=None,
                        help="training videos per class [default: each dataset's]")
    parser.add_argument("--val-videos", type=int, default=None,
                        help="validation videos per class [default: each dataset's]")
    parser.add_argument("--b16-videos", type=int, default=32,
                        help="videos (one clip each) of the ViT-B/16-shaped caches")
    parser.add_argument("--repeats", type=int, default=3, help="loader timings per cache, interleaved (fastest kept)")
    parser.add_argument("--workers", type=int, default=2, help="cache reader threads (loader timings and training)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's own); 1 is faster and steadier on a machine other processes "
                             "share (5 training epochs here: 13-20 s with 1 thread, 27-130 s with 2)")
    parser.add_argument("--device", default="cpu", help="device of training and evaluation")
    parser.add_argument("--dir", type=Path, default=None,
                        help="folder for videos and caches [default: a temporary one]")
    add_clean_options(parser)
    args = parser.parse_args()
    options = args.options.split(",")
    names = args.datasets.split(",")
    if options[0] != BASELINE or any(o not in OPTIONS for o in options) or any(n not in DATASETS for n in names):
        parser.error(f"--options: {BASELINE} first, then any of {list(OPTIONS)}; --datasets: any of {list(DATASETS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(machine_line())
    print(f"setup: {DEMO.model} (random weights, seed 0), {FRAMES} frames x stride {STRIDE}, {BLOCKS} blocks with "
          f"maps; EVL decoder {RECIPE['layers']} layers, batch {BATCH}, lr {RECIPE['lr']}, dropout 0.5, "
          f"{args.epochs} epochs, seeds 0..{args.seeds - 1}; loader: {args.workers} reader threads, batch {BATCH}; "
          f"torch threads {torch.get_num_threads()}", flush=True)

    with tempfile.TemporaryDirectory(prefix="bench_storage_", dir=args.dir) as tmp:
        tmp = Path(tmp)
        caches: dict[str, dict[str, Path]] = {}
        plans, benches = {}, {}
        for name in names:
            bench = DATASETS[name]
            counts = {"train": args.train_videos or bench.videos_per_class["train"],
                      "val": args.val_videos or bench.videos_per_class["val"]}
            benches[name] = dataclasses.replace(bench, videos_per_class=counts)
            with Timer() as timer:
                videos = make_sample_dataset(tmp / name / "videos", bench.classes, counts,
                                             num_frames=bench.video_frames)
            print(f"{name}: {len(bench.classes)} classes, {counts['train']} train / {counts['val']} val videos per "
                  f"class, {bench.video_frames} frames of 64x80 ({bench.about}); written in {timer.seconds:.0f} s",
                  flush=True)
            caches[name] = {}
            for option in options:
                out = tmp / name / f"{option}.zarr"
                summary = extract(extract_config(videos, out, bench, option))
                caches[name][option] = out
                print(f"  extract {option}: {summary.done} videos, {summary.clips} clips in {summary.seconds:.1f} s",
                      flush=True)
            plans[name] = plan(dataclasses.replace(extract_config(videos, tmp / name / "plan.zarr", bench, BASELINE),
                                                   probe_mb=0))
            with FeatureStore(caches[name][BASELINE]) as store:
                backbone = store.attrs["backbone"]
            for option, cache in caches[name].items():  # the same weights behind every cache
                with FeatureStore(cache) as store:
                    if store.attrs["backbone"] != backbone:
                        raise SystemExit(f"{cache}: another backbone than the {BASELINE} cache's")
        extracted = time.perf_counter()

        # Loader speed, warm, interleaved over every cache of a dataset (and then the B/16-shaped ones).
        reads = {(name, option): training_reads(cache) for name in names for option, cache in caches[name].items()}
        keyed = {f"{name}/{option}": dataset for (name, option), dataset in reads.items()}
        rates, _, loader_share, loader_try = clean_run(
            lambda: loader_rates(keyed, lambda batch: None, BATCH, args.workers, args.repeats), args.tries,
            args.wait_quiet)
        b16_folder = tmp / "b16"
        b16_folder.mkdir()
        with Timer() as timer:
            b16 = {BASELINE: b16_folder / f"{BASELINE}.zarr"}
            write_cache(b16[BASELINE], args.b16_videos, shard_size=8)
            for option in options[1:]:
                b16[option] = reencode(b16[BASELINE], b16_folder / f"{option}.zarr", option)
        print(f"ViT-B/16-shaped caches: {args.b16_videos} videos x {len(options)} options written in "
              f"{timer.seconds:.0f} s", flush=True)
        b16_reads = {option: training_reads(cache) for option, cache in b16.items()}
        cpu = torch.device("cpu")
        b16_rates, _, b16_share, b16_try = clean_run(
            lambda: loader_rates(b16_reads, lambda batch: None, B16_BATCH, args.workers, args.repeats), args.tries,
            args.wait_quiet)
        b16_decoded, _, decode_share, decode_try = clean_run(
            lambda: loader_rates(b16_reads, lambda batch: model_inputs(batch, cpu), B16_BATCH, args.workers,
                                 args.repeats), args.tries, args.wait_quiet)
        b16_plan = plan(dataclasses.replace(extract_config(tmp / names[0] / "videos", b16_folder / "plan.zarr",
                                                           benches[names[0]], BASELINE),
                                            model=B16_MODEL, blocks=BLOCKS, eval_views=1, probe_mb=0))
        timed = time.perf_counter()

        # Accuracy: the same recipe and seeds on every cache.
        top1: dict[tuple[str, str], list[float]] = {}
        with OtherLoad() as train_load:
            for name in names:
                for option, cache in caches[name].items():
                    top1[name, option] = []
                    for seed in range(args.seeds):
                        run = tmp / name / "runs" / f"{option}_seed{seed}"
                        train(TrainConfig(features=cache, out=run, seed=seed, epochs=args.epochs, workers=args.workers,
                                          device=args.device, overwrite=True, **RECIPE))
                        metrics = evaluate(EvalConfig(run=run, weights="last", workers=args.workers,
                                                      device=args.device))
                        top1[name, option].append(metrics["top1"])
                    print(f"  trained {name} {option}: top-1 {', '.join(f'{a:.3f}' for a in top1[name, option])}",
                          flush=True)
        trained = time.perf_counter()

        # The tables.
        print(f"\nverdict rule: 'within noise' when |mean top-1 - {BASELINE}'s| <= max(std over seeds of "
              f"{BASELINE}, of the option) (sample std, {args.seeds} seeds: 0..{args.seeds - 1}, the same on every "
              f"cache); else 'measured loss' (or gain)")
        print(f"loader clips/s: the fastest of {args.repeats} warm timings (each >= 1 s of epochs), {args.workers} "
              f"reader threads; {share_note(loader_share)} (attempt {loader_try})")
        verdicts: dict[tuple[str, str], str] = {}
        for name in names:
            bench, cache_plan = benches[name], plans[name]
            base_disk = disk_bytes_per_view(caches[name][BASELINE])
            print(f"\n{name} ({len(bench.classes)} classes; {bench.videos_per_class['train']} train / "
                  f"{bench.videos_per_class['val']} val videos per class, {bench.eval_views} eval view(s); "
                  f"{args.epochs} epochs; chance {1 / len(bench.classes):.3f})")
            print(f"  {'option':<10} {'plan kB/view':>12} {'disk kB/view':>12} {'x fp16':>7} {'read kB/clip':>12} "
                  f"{'clips/s':>8} {'x fp16':>7} {'top-1 mean ± std':>17} {'Δ fp16':>7}  verdict          per seed")
            for option in options:
                storage, compress = OPTIONS[option]
                disk = disk_bytes_per_view(caches[name][option])
                planned = f"{cache_plan.bytes_per_view[storage] / 1e3:.1f}" if compress == "none" else "-"
                delta, verdicts[name, option] = verdict(top1[name, option], top1[name, BASELINE])
                rate, base_rate = rates[f"{name}/{option}"], rates[f"{name}/{BASELINE}"]
                print(f"  {option:<10} {planned:>12} {disk / 1e3:>12.1f} {disk / base_disk:>7.3f} "
                      f"{reads[name, option].bytes_per_item() / 1e3:>12.1f} {rate:>8.0f} {rate / base_rate:>7.2f} "
                      f"{mean_std(top1[name, option]):>17} {delta:>+7.3f}  {verdicts[name, option]:<16} "
                      f"{' '.join(f'{a:.3f}' for a in top1[name, option])}")

        base_disk = disk_bytes_per_view(b16[BASELINE])
        print(f"\nViT-B/16-shaped caches ({args.b16_videos} videos, one view each; random float16 values re-encoded: "
              f"their sizes match real ones uncompressed; zstd finds little to compress in random values)")
        print(f"  reads: {share_note(b16_share)} (attempt {b16_try}); reads + decode: {share_note(decode_share)} "
              f"(attempt {decode_try})")
        print(f"  {'option':<10} {'plan MB/view':>12} {'disk MB/view':>12} {'x fp16':>7} {'read MB/clip':>12} "
              f"{'clips/s':>8} {'x fp16':>7} {'+decode':>8} {'x fp16':>7}")
        for option in options:
            storage, compress = OPTIONS[option]
            disk = disk_bytes_per_view(b16[option])
            planned = f"{b16_plan.bytes_per_view[storage] / 1e6:.2f}" if compress == "none" else "-"
            print(f"  {option:<10} {planned:>12} {disk / 1e6:>12.2f} {disk / base_disk:>7.3f} "
                  f"{b16_reads[option].bytes_per_item() / 1e6:>12.2f} {b16_rates[option]:>8.0f} "
                  f"{b16_rates[option] / b16_rates[BASELINE]:>7.2f} {b16_decoded[option]:>8.0f} "
                  f"{b16_decoded[option] / b16_decoded[BASELINE]:>7.2f}")

        def bytes_note(option: str) -> str:
            ratios = [f"{n} {disk_bytes_per_view(caches[n][option]) / disk_bytes_per_view(caches[n][BASELINE]):.2f}"
                      for n in names]
            storage, compress = OPTIONS[option]
            planned = (f", ViT-B/16 {b16_plan.bytes_per_view[storage] / b16_plan.bytes_per_view[BASELINE]:.2f}"
                       if compress == "none" else "")
            return f"{option} (bytes x fp16: {', '.join(ratios)}{planned})"

        recommended = [o for o in options[1:] if all(verdicts[n, o] == "within noise" for n in names)]
        print(f"\nrecommended (within noise on {', '.join(names)}): "
              + (", ".join(bytes_note(o) for o in recommended) or "none"))
        losses = [f"{o} on {n} ({statistics.mean(top1[n, o]) - statistics.mean(top1[n, BASELINE]):+.3f})"
                  for o in options[1:] for n in names if verdicts[n, o] == "measured loss"]
        print(f"measured losses: {', '.join(losses) or 'none'}")
        for name in names:
            base = statistics.mean(top1[name, BASELINE])
            for option in options[1:]:
                ratio = disk_bytes_per_view(caches[name][option]) / disk_bytes_per_view(caches[name][BASELINE])
                print_result("storage", f"{option} vs {BASELINE}: top-1 on {name}, mean over {args.seeds} seeds "
                                        f"(bytes per view {ratio:.3f}x on disk)",
                             statistics.mean(top1[name, option]), base, "top-1", "ours/baseline",
                             "within seed noise", verdicts[name, option] == "within noise", train_load.share,
                             vars(args), verdict=verdicts[name, option], seeds=top1[name, option],
                             bytes_ratio=ratio)
    print(f"time: videos and extraction {extracted - started:.0f} s, loader timings {timed - extracted:.0f} s, "
          f"training and evaluation {trained - timed:.0f} s ({train_load.note()}); total "
          f"{time.perf_counter() - started:.0f} s")
    print(load_line())


if __name__ == "__main__":
    main()
