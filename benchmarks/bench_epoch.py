"""How much faster is a training epoch from the cache than the authors' way, and how close to the limit?

ViT-B-16 (open_clip, random weights), 8 x 16 dense sampling, 4 cached blocks with maps, the EVL
decoder with a 400-class head, AdamW. The same clips on both sides: Kinetics-like videos (10 s,
25 fps, 456x340, libx264, from `evl_cache.video.synthetic`) in a `train/` split, one clip each
(--train-views 1: the centre clip).

- baseline, the authors' way: every step runs the frozen backbone (`FrozenBackbone`, no grad) on the
  batch's decoded frames, then the decoder step. By default the frames are decoded once before timing
  and held in memory (this favours the baseline: the authors also decode every epoch);
  --online-decode decodes them during the epoch in 2 DataLoader workers instead.
- ours: the epoch `evl_cache.decoder.train` runs: the run's one `CacheLoader` over `CacheDataset` (shuffled
  by `EpochBatches`, --workers reader threads, two batches read ahead), then per batch forward,
  cross-entropy, backward, AdamW step. The cache is written first by `extract()` (not timed).
- the decoder step alone on batches already in memory, and the backbone alone (timed inside the
  baseline's epoch), give the limit of the ratio: (backbone + decoder) / decoder, the ratio a cache
  that cost nothing to read would reach. Goal: ratio / limit >= 0.85.

Each epoch kind is run --repeats times, interleaved, and judged by its fastest epoch (other jobs on a
shared machine only ever add time). Every timed epoch also records the CPU share other processes took
while it ran and is re-run (--tries) while that share is above 5 %.

Run: python benchmarks/bench_epoch.py [--clips 6] [--batch 2] [--workers 2] [--repeats 2] [--online-decode]
         [--tries 2] [--wait-quiet 30]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BLOCKS,
    FRAMES,
    MODEL,
    STRIDE,
    Timer,
    add_clean_options,
    b16_backbone,
    b16_decoder,
    clean_run,
    decode_eval_clip,
    decoder_step,
    load_line,
    loader_epoch,
    machine_line,
    print_result,
    share_note,
    train_loader,
    write_kinetics_like_videos,
)

from evl_cache.cache.dataset import CacheDataset, CacheLoader, model_inputs, select_features  # noqa: E402
from evl_cache.cache.extract import ExtractConfig, extract  # noqa: E402
from evl_cache.cache.store import FeatureStore  # noqa: E402
from evl_cache.towers.backbone import FrozenBackbone  # noqa: E402
from evl_cache.video.find import find_videos  # noqa: E402

CPU = torch.device("cpu")


class DecodedClips(Dataset):
    """The baseline's data when --online-decode: one decoded clip per video, decoded on demand."""

    def __init__(self, root: Path, entries):
        self.root, self.entries = root, entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        entry = self.entries[i]
        clip = decode_eval_clip(self.root / entry.path, entry.split, i)[0]
        return clip, entry.label


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)


def train_videos(root: Path, clips: int) -> Path:
    """`clips` Kinetics-like videos in a `train/` split under `root` (reused if already there)."""
    return write_kinetics_like_videos(root / f"videos_train_{clips}", clips, split="train")


def cache_config(videos: Path, out: Path, batch: int) -> ExtractConfig:
    """The extraction of the benchmark's cache: one centre clip per training video, B/16 8 x 16, 4 blocks."""
    return ExtractConfig(videos=videos, out=out, model=MODEL, pretrained="none", blocks=BLOCKS, frames=FRAMES,
                         stride=STRIDE, eval_views=1, train_views=1, batch_size=batch, workers=2, device="cpu")


def cache_dataset(cache: Path, layers: int = BLOCKS, cross_attention: bool = True) -> CacheDataset:
    """The training dataset a decoder of `layers` layers reads from the cache (maps only with
    cross-attention), as `evl_cache.decoder.train` selects it."""
    with FeatureStore(cache) as store:
        attrs = store.check_version()
        videos = [i for i, s in enumerate(store.column("status")) if s == 1]
    return CacheDataset(cache, videos, select_features(attrs, layers, None, 1, cross_attention), views="random",
                        seed=0)


def decoded_batches(videos: Path, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same clips as the cache's, decoded here (one process) into (uint8 [B, T, 3, S, S], labels)."""
    entries = find_videos(videos, None, None, None, None).entries
    decoded = [(decode_eval_clip(videos / e.path, e.split, i)[0], e.label) for i, e in enumerate(entries)]
    return [(torch.stack([clip for clip, _ in decoded[i:i + batch]]),
             torch.tensor([label for _, label in decoded[i:i + batch]])) for i in range(0, len(decoded), batch)]


def cache_step(model, optimizer):
    """`step(batch)` for a cache batch: the model's inputs as `evl_cache.decoder.train` takes them, then the step."""
    return lambda b: decoder_step(model, optimizer, *model_inputs(b, CPU), b["label"])


_LOADERS: dict = {}


def cache_epoch(dataset: CacheDataset, batch: int, workers: int, epoch: int, model, optimizer) -> tuple[float, float]:
    """An epoch as `evl_cache.decoder.train` runs it: (seconds, seconds spent waiting for batches)."""
    key = (id(dataset), batch, workers)
    if key not in _LOADERS:  # train() keeps one loader for the whole run
        _LOADERS[key] = train_loader(dataset, batch, workers)
    return loader_epoch(*_LOADERS[key], epoch, cache_step(model, optimizer))


def decoder_only_epoch(batches: list[dict], model, optimizer) -> float:
    step = cache_step(model, optimizer)
    with Timer() as timer:
        for batch in batches:
            step(batch)
    return timer.seconds


def online_epoch(batches, backbone: FrozenBackbone, model, optimizer) -> tuple[float, float, float]:
    """The authors' way: (epoch seconds, of which backbone seconds, of which decoder seconds).

    `batches` yields (uint8 clips [B, T, 3, S, S], labels)."""
    backbone_s = decoder_s = 0.0
    start = time.perf_counter()
    for clips, labels in batches:
        t0 = time.perf_counter()
        out = backbone(clips)
        t1 = time.perf_counter()
        decoder_step(model, optimizer, out.block_outputs, out.maps_prev, out.maps_next, labels)
        t2 = time.perf_counter()
        backbone_s += t1 - t0
        decoder_s += t2 - t1
    return time.perf_counter() - start, backbone_s, decoder_s


def add_epoch_options(parser) -> None:
    """The options of the epoch comparison's setup (clips, batch, loader, repeats, videos, clean runs)."""
    parser.add_argument("--clips", type=int, default=6, help="videos, one clip each")
    parser.add_argument("--batch", type=int, default=2, help="clips per step (both sides)")
    parser.add_argument("--workers", type=int, default=2, help="cache reader threads")
    parser.add_argument("--repeats", type=int, default=2, help="timed epochs of each kind, interleaved")
    parser.add_argument("--video-dir", type=Path, default=None, help="write (or reuse) the videos here")
    add_clean_options(parser)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_epoch_options(parser)
    parser.add_argument("--online-decode", action="store_true",
                        help="baseline decodes its frames during the epoch (2 workers) instead of from memory")
    args = parser.parse_args()
    print(machine_line())
    print(f"setup: {MODEL} (random weights), {FRAMES} x {STRIDE}, {BLOCKS} blocks + maps, 400-class EVL decoder, "
          f"{args.clips} clips, batch {args.batch} ({-(-args.clips // args.batch)} steps/epoch), cache loader "
          f"workers {args.workers}, baseline frames {'decoded in the epoch (2 workers)' if args.online_decode else 'decoded before timing, in memory'}")

    with tempfile.TemporaryDirectory(prefix="bench_epoch_") as tmp:
        tmp = Path(tmp)
        with Timer() as timer:
            video_dir = train_videos(args.video_dir or tmp, args.clips)
        print(f"videos: {args.clips} written in {timer.seconds:.1f} s")
        cache = tmp / "cache.zarr"
        summary = extract(cache_config(video_dir, cache, args.batch))
        print(f"cache: {summary.clips} clips extracted in {summary.seconds:.1f} s (not part of the comparison)")

        dataset = cache_dataset(cache)
        print(f"cache dataset: {len(dataset)} items, {dataset.bytes_per_item() / 1e6:.1f} MB read per item")

        entries = find_videos(video_dir, None, None, None, None).entries
        backbone = b16_backbone()
        with Timer() as timer:
            memory_batches = decoded_batches(video_dir, args.batch)
        print(f"decode: {timer.seconds / len(entries):.3f} s/clip (one process)")

        def online_batches():
            if not args.online_decode:
                return memory_batches
            return DataLoader(DecodedClips(video_dir, entries), batch_size=args.batch, num_workers=2,
                              worker_init_fn=_one_thread, prefetch_factor=4)

        # The same decoder weights and optimizer on each side; the cache's batches kept in memory for
        # the decoder-only epochs.
        models = {name: b16_decoder() for name in ("cache", "cache, workers=0", "decoder only", "online")}
        cached_batches = list(CacheLoader.sequential(dataset, args.batch))
        # Warm-up (untimed): one step of each, one backbone batch.
        decoder_only_epoch(cached_batches[:1], *models["decoder only"])
        decoder_only_epoch(cached_batches[:1], *models["cache"])
        decoder_only_epoch(cached_batches[:1], *models["cache, workers=0"])
        online_epoch(memory_batches[:1], backbone, *models["online"])

        runs = {"cache": [], "cache, workers=0": [], "decoder only": [], "online": []}
        for repeat in range(args.repeats):
            kinds = {"cache": lambda: cache_epoch(dataset, args.batch, args.workers, repeat + 1, *models["cache"]),
                     # diagnostic: the same epoch with each batch read when it is asked for
                     "cache, workers=0": lambda: cache_epoch(dataset, args.batch, 0, repeat + 1,
                                                             *models["cache, workers=0"]),
                     "decoder only": lambda: decoder_only_epoch(cached_batches, *models["decoder only"]),
                     "online": lambda: online_epoch(online_batches(), backbone, *models["online"])}
            for kind, run in kinds.items():
                result, seconds, share, attempts = clean_run(run, args.tries, args.wait_quiet)
                runs[kind].append((seconds, result, share))
                detail = {"cache": lambda r: f" (waiting for data {r[1]:.2f} s)",
                          "cache, workers=0": lambda r: f" (reading items {r[1]:.2f} s)", "decoder only": lambda r: "",
                          "online": lambda r: f" (backbone {r[1]:.2f} s, decoder {r[2]:.2f} s)"}[kind](result)
                print(f"repeat {repeat + 1}, {kind} epoch: {seconds:.2f} s{detail}; {share_note(share)} "
                      f"(attempt {attempts})", flush=True)

    fastest = {kind: min(rs, key=lambda r: r[0]) for kind, rs in runs.items()}
    cache_s, (_, cache_wait) = fastest["cache"][0], fastest["cache"][1]
    decoder_s = fastest["decoder only"][0]
    online_s, (_, online_backbone, online_decoder) = fastest["online"][0], fastest["online"][1]
    ratio = online_s / cache_s
    limit = (online_backbone + decoder_s) / decoder_s
    n = len(entries)
    print()
    print(f"cache epoch: {cache_s:.2f} s ({cache_s / n:.3f} s/clip; data wait {100 * cache_wait / cache_s:.1f} % of it)")
    zero_s, (_, zero_wait) = fastest["cache, workers=0"][0], fastest["cache, workers=0"][1]
    print(f"  diagnostic, the same cache epoch with workers=0: {zero_s:.2f} s (reading items {zero_wait:.2f} s); "
          f"ratio online/cache would be {online_s / zero_s:.2f}, {online_s / zero_s / limit:.3f} of the limit")
    print(f"online epoch (authors' way): {online_s:.2f} s ({online_s / n:.3f} s/clip)")
    print(f"backbone: {online_backbone:.2f} s/epoch (inside that online epoch); decoder step alone: {decoder_s:.2f} s/epoch "
          f"(the decoder inside that online epoch: {online_decoder:.2f} s)")
    print(f"ratio online/cache = {ratio:.2f}; limit (backbone + decoder)/decoder = {limit:.2f}; "
          f"ratio/limit = {ratio / limit:.3f} (goal >= 0.85)")
    worst = max(fastest[k][2] for k in fastest)
    print(f"other processes' CPU share in the epochs used: worst {100 * worst:.0f} %"
          f"{'  <-- contaminated: rerun on a quiet machine' if worst > 0.05 else ' (clean)'}")
    print(load_line())
    print_result("epoch", f"epoch from the cache vs the online frozen-backbone epoch (B/16 {FRAMES}x{STRIDE}, {n} clips, "
                 f"batch {args.batch}, {args.workers} workers)",
                 cache_s, online_s, "s/epoch", "baseline/ours", f"ratio/limit >= 0.85: {ratio / limit:.2f}",
                 ratio / limit >= 0.85, worst, vars(args), limit=limit, ratio_to_limit=ratio / limit,
                 data_wait_share=cache_wait / cache_s, backbone_s=online_backbone, decoder_only_s=decoder_s,
                 workers0_ratio=online_s / zero_s)


if __name__ == "__main__":
    main()
