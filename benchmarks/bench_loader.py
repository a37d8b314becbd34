"""Does the cache loader keep up with the disk, and with the decoder?

A ViT-B/16-shaped cache (T=8, L=197, C=768, 4 blocks with maps, 14.0 MB read per clip) is written
with `FeatureStore.create` and filled with random float16 (faster than a real extraction; the store
is uncompressed, so the values do not change the bytes or the reading cost). In the same run:

- baseline: a raw read of the same bytes, the zarr shard files of the arrays a 4-layer run reads,
  each with plain `open(path, 'rb').read()`; and, between the two, numpy from the zarr arrays
  without the dataset machinery (`np.asarray(array[video, 0])`, one video at a time);
- ours: `CacheLoader` over `CacheDataset`, as `evl_cache.decoder.train` reads (0, 2 and 4 reader threads,
  batches of --batch, two read ahead), counting the bytes the batches hold; and, for comparison, the
  same dataset through torch's `DataLoader` with 2 worker processes and its default collate (the
  batches then pass through shared memory to this process).

Both "warm" (the files in the page cache: the cache was just written) and "cold" (this cache's
files evicted from the page cache with posix_fadvise(DONTNEED) before each read: other files are
untouched) are measured.

Then the data-wait share of training: the EVL decoder (B/16 shapes, 400 classes, AdamW) trained
for an epoch from this cache with --train-workers reader threads, as `evl_cache.decoder.train` runs it; time
spent waiting for the next batch / epoch time (the `data_wait_share` `evl_cache.decoder.train` logs).
Target: under 5 %. The same steps on batches already
in memory give the loader's whole cost (waiting, plus its workers taking CPU from the steps).

Run: python benchmarks/bench_loader.py [--videos 48] [--batch 8] [--repeats 3] [--train-batch 4]
         [--tries 2] [--wait-quiet 30]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BLOCKS,
    FRAMES,
    GRID,
    HEADS,
    PATCHES,
    STRIDE,
    TOKENS,
    WIDTH,
    Timer,
    add_clean_options,
    b16_decoder,
    clean_run,
    decoder_step,
    load_line,
    machine_line,
    print_result,
    share_note,
)

from evl_cache.cache.dataset import CacheDataset, CacheLoader, EpochBatches, select_features  # noqa: E402
from evl_cache.cache.store import CacheLayout, FeatureStore  # noqa: E402

B16_LAYERS = 12
EMBED = 512


def write_cache(path: Path, videos: int, shard_size: int) -> FeatureStore:
    """A B/16-shaped cache of random float16, every video done, one view each."""
    blocks = tuple(range(B16_LAYERS - BLOCKS, B16_LAYERS))
    layout = CacheLayout(num_videos=videos, views=1, frames=FRAMES, tokens=TOKENS, width=WIDTH, grid=GRID,
                         embed_dim=EMBED, blocks=blocks, shard_size=shard_size)
    attrs = {"backbone": {"model": "ViT-B-16", "pretrained": "none", "image_size": 224, "patch_grid": list(GRID),
                          "width": WIDTH, "heads": HEADS, "layers": B16_LAYERS, "embed_dim": EMBED},
             "blocks": list(blocks),
             "sampling": {"mode": "dense", "frames": FRAMES, "stride": STRIDE, "eval_views": 1, "train_views": 1,
                          "views": 1, "seed": 0},
             "class_names": ["a", "b"], "shard_size": shard_size, "note": "benchmark: random float16"}
    columns = {"path": np.array([f"v{i:05d}.mp4" for i in range(videos)], dtype=object),
               "label": (np.arange(videos) % 2).astype(np.int32),
               "split": np.array(["train"] * videos, dtype=object)}
    store = FeatureStore.create(path, layout, attrs, columns)
    rng = np.random.default_rng(0)
    for start in range(0, videos, shard_size):
        count = min(shard_size, videos - start)
        for name, (shape, _, _) in layout.feature_arrays().items():
            values = rng.standard_normal((count,) + shape[1:], dtype=np.float32)
            if name.startswith("maps/"):
                values = np.abs(values) / PATCHES  # map-like: small and non-negative
            store.write_block(name, start, values.astype(np.float16))
    store.write_rows("views", 0, np.ones(videos, np.int16))
    store.write_rows("frames", 0, np.full(videos, 250, np.int32))
    store.write_rows("status", 0, np.ones(videos, np.uint8))
    return store


def array_files(cache: Path, names: list[str]) -> list[Path]:
    """The chunk/shard files of the named zarr arrays (their metadata excluded)."""
    files = []
    for name in names:
        files += sorted(p for p in (cache / name).rglob("*") if p.is_file() and p.name != "zarr.json")
    return files


def evict(files: list[Path]) -> None:
    """Drop these files' pages from the page cache (only these files)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def chunk_table(cache: Path, names: list[str], videos: int, shard_size: int) -> dict[str, list[tuple[Path, int, int]]]:
    """(shard file, offset, bytes) of each video's chunk, view 0, per array, from the zarr v3 shard
    indexes (at the end of each shard file: (offset, nbytes) uint64 pairs per inner chunk, then a
    crc32c). Chunks here are uncompressed little-endian float16."""
    table = {}
    for name in names:
        ndim = len(json.loads((cache / name / "zarr.json").read_text())["shape"])
        rows, indexes = [], {}
        for video in range(videos):
            shard = video // shard_size
            path = cache / name / "c" / str(shard) / Path(*["0"] * (ndim - 1))
            if shard not in indexes:
                with open(path, "rb") as handle:
                    handle.seek(-(16 * shard_size + 4), os.SEEK_END)
                    indexes[shard] = np.frombuffer(handle.read(16 * shard_size), "<u8").reshape(shard_size, 2)
            offset, nbytes = indexes[shard][video % shard_size]
            rows.append((path, int(offset), int(nbytes)))
        table[name] = rows
    return table


def pread_read(table: dict[str, list[tuple[Path, int, int]]], shapes: dict[str, tuple[int, ...]], batch: int,
               videos: int, epoch: int) -> int:
    """Each batch's chunks read with os.preadv straight into one preallocated [B, ...] array per
    array name: no zarr, no dataset, no collate (the floor a loader could reach in one process)."""
    order = np.random.default_rng(epoch).permutation(videos)
    fds: dict[Path, int] = {}
    total = 0
    try:
        for start in range(0, videos, batch):
            chunk = order[start:start + batch]
            for name, rows in table.items():
                out = np.empty((len(chunk),) + shapes[name], np.float16)
                for i, video in enumerate(chunk):
                    path, offset, nbytes = rows[video]
                    if path not in fds:
                        fds[path] = os.open(path, os.O_RDONLY)
                    total += os.preadv(fds[path], [memoryview(out[i]).cast("B")], offset)
    finally:
        for fd in fds.values():
            os.close(fd)
    return total


def raw_read(files: list[Path]) -> int:
    total = 0
    for path in files:
        with open(path, "rb") as handle:
            total += len(handle.read())
    return total


def zarr_read(cache: Path, names: list[str], videos: int) -> int:
    total = 0
    with FeatureStore(cache) as store:
        arrays = [store.array(n) for n in names]
        for video in range(videos):
            for array in arrays:
                total += np.asarray(array[video, 0]).nbytes
    return total


def batch_bytes(batch: dict) -> int:
    return sum(t.nbytes for t in batch["tokens"] + batch["maps_prev"] + batch["maps_next"])


def loader_read(dataset: CacheDataset, batch: int, workers: int, epoch: int) -> int:
    """One shuffled epoch through `CacheLoader` with `workers` reader threads."""
    sampler = EpochBatches(len(dataset), batch, seed=0)
    sampler.set_epoch(epoch)
    return sum(batch_bytes(b) for b in CacheLoader(dataset, sampler, workers))


def torch_loader_read(dataset: CacheDataset, batch: int, workers: int, epoch: int) -> int:
    """The same epoch through torch's DataLoader, worker processes and default collate."""
    loader = DataLoader(dataset, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(epoch),
                        num_workers=workers, prefetch_factor=2 if workers else None)
    return sum(batch_bytes(b) for b in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=48, help="videos in the cache (one clip each)")
    parser.add_argument("--batch", type=int, default=8, help="clips per loader batch (bytes/s part)")
    parser.add_argument("--repeats", type=int, default=3, help="reads of each kind, interleaved (best and median)")
    parser.add_argument("--train-batch", type=int, default=4, help="clips per training step (data-wait part)")
    parser.add_argument("--train-workers", type=int, default=2, help="reader threads in the data-wait part")
    parser.add_argument("--dir", type=Path, default=None, help="folder for the cache [default: a temporary one]")
    add_clean_options(parser)
    args = parser.parse_args()
    print(machine_line())

    with tempfile.TemporaryDirectory(prefix="bench_loader_", dir=args.dir) as tmp:
        cache = Path(tmp) / "b16.zarr"
        with Timer() as timer:
            write_cache(cache, args.videos, shard_size=8)
        with FeatureStore(cache) as store:
            attrs = store.check_version()
        selection = select_features(attrs, BLOCKS, None, 1, True)
        dataset = CacheDataset(cache, np.arange(args.videos), selection, views="random", seed=0)
        names = dataset.array_names()
        files = array_files(cache, names)
        table = chunk_table(cache, names, args.videos, shard_size=8)
        with FeatureStore(cache) as store:
            shapes = {name: tuple(store.array(name).shape[2:]) for name in names}
        payload = sum(nbytes for rows in table.values() for _, _, nbytes in rows)  # the items' bytes
        file_bytes = sum(p.stat().st_size for p in files)
        print(f"cache: {args.videos} videos of B/16 shapes written in {timer.seconds:.1f} s; a 4-layer run reads "
              f"{len(names)} arrays, {payload / len(dataset) / 1e6:.2f} MB per clip, {payload / 1e6:.0f} MB per epoch "
              f"({len(files)} shard files, {file_bytes / 1e6:.0f} MB with their indexes)")

        raw_kind = "raw open().read() of the shard files"
        kinds = {raw_kind: lambda r: raw_read(files),
                 "raw os.preadv of each batch's chunks (offsets from the shard index)":
                     lambda r: pread_read(table, shapes, args.batch, args.videos, r),
                 "zarr arrays to numpy, no dataset": lambda r: zarr_read(cache, names, args.videos),
                 "CacheLoader, workers=0 (read in this thread)": lambda r: loader_read(dataset, args.batch, 0, r),
                 "CacheLoader, 2 reader threads": lambda r: loader_read(dataset, args.batch, 2, r),
                 "CacheLoader, 4 reader threads": lambda r: loader_read(dataset, args.batch, 4, r),
                 "torch DataLoader, 2 worker processes, default collate":
                     lambda r: torch_loader_read(dataset, args.batch, 2, r)}
        def read_all(mode: str) -> dict[str, list[float]]:
            seconds = {k: [] for k in kinds}
            for repeat in range(args.repeats):
                for kind, read in kinds.items():
                    if mode == "cold":
                        evict(files)
                    else:
                        raw_read(files)  # make sure every file is in the page cache
                    with Timer() as timer:
                        count = read(repeat)
                    expected = file_bytes if kind == raw_kind else payload
                    if count != expected:
                        raise SystemExit(f"{kind} read {count} bytes, expected {expected}")
                    seconds[kind].append(timer.seconds)
            return seconds

        loader_kind = "CacheLoader, 2 reader threads"  # train's default --workers
        headline = {}
        for mode in ("warm", "cold"):
            seconds, _, share, attempts = clean_run(lambda: read_all(mode), args.tries, args.wait_quiet)
            headline[mode] = (payload / min(seconds[loader_kind]), file_bytes / min(seconds[raw_kind]), share)
            print(f"\n{mode} ({'page cache' if mode == 'warm' else 'files evicted before each read'}), "
                  f"{args.repeats} reads each, interleaved; {share_note(share)} (attempt {attempts})")
            base = file_bytes / min(seconds[raw_kind])
            for kind, times in seconds.items():
                count = file_bytes if kind == raw_kind else payload
                best, median = count / min(times), count / statistics.median(times)
                print(f"  {kind}: {best / 1e9:.2f} GB/s best, {median / 1e9:.2f} GB/s median; "
                      f"{best / base:.2f}x the raw read")

        # Data-wait share of training with the decoder.
        model, optimizer = b16_decoder()
        batches = list(CacheLoader.sequential(dataset, args.train_batch))  # the reference's batches, in memory
        decoder_step(model, optimizer, batches[0]["tokens"], batches[0]["maps_prev"], batches[0]["maps_next"],
                     batches[0]["label"])  # warm-up
        sampler = EpochBatches(len(dataset), args.train_batch, seed=1)
        loader = CacheLoader(dataset, sampler, args.train_workers)

        def training_epoch() -> tuple[float, list[float]]:
            raw_read(files)  # warm, as in the bytes/s part
            start = time.perf_counter()
            waits = []
            fetch = time.perf_counter()
            for batch in loader:
                waits.append(time.perf_counter() - fetch)
                decoder_step(model, optimizer, batch["tokens"], batch["maps_prev"], batch["maps_next"], batch["label"])
                fetch = time.perf_counter()
            return time.perf_counter() - start, waits

        (epoch, waits), _, share, attempts = clean_run(training_epoch, args.tries, args.wait_quiet)

        # Reference: the same steps on batches already in memory (no loader running beside them).
        def decoder_alone() -> None:
            for batch in batches:
                decoder_step(model, optimizer, batch["tokens"], batch["maps_prev"], batch["maps_next"], batch["label"])

        _, alone, alone_share, alone_attempts = clean_run(decoder_alone, args.tries, args.wait_quiet)
        steps = len(waits)
        print(f"\ntraining epoch from the cache (warm), decoder B/16 4 layers, batch {args.train_batch}, "
              f"workers {args.train_workers}: {epoch:.2f} s, {steps} steps, {epoch / steps:.3f} s/step; "
              f"{share_note(share)} (attempt {attempts})")
        print(f"  data wait: {sum(waits):.3f} s = {100 * sum(waits) / epoch:.1f} % of the epoch (target < 5 %); "
              f"first batch {waits[0]:.3f} s, the other {steps - 1} steps "
              f"{100 * sum(waits[1:]) / max(epoch - waits[0], 1e-9):.1f} % of their time")
        print(f"  the same steps on batches in memory, no loader: {alone:.2f} s; epoch / that = {epoch / alone:.3f} "
              f"(the loader's whole cost, waits plus its threads slowing the steps); {share_note(alone_share)} "
              f"(attempt {alone_attempts})")
    print(load_line())
    for mode, (ours, raw, mode_share) in headline.items():
        print_result("loader", f"loader bytes/s / raw read of the same files, {mode} (B/16, {args.videos} videos, "
                     f"batch {args.batch}, 2 threads)", ours / 1e9, raw / 1e9, "GB/s",
                     "ours/baseline", "", None, mode_share, vars(args))
    wait_share = sum(waits) / epoch
    print_result("loader", f"training epoch from the cache / the same steps on batches in memory (B/16, "
                 f"batch {args.train_batch}, {args.train_workers} threads)", epoch, alone, "s/epoch",
                 "ours/baseline", f"data wait < 5 %: {100 * wait_share:.1f} %", wait_share < 0.05,
                 max(share, alone_share), vars(args), data_wait_share=wait_share)


if __name__ == "__main__":
    main()
