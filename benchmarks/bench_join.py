"""What does reading an HDF5 cache joined from part files cost, against one file, as shards grow?

An HDF5 cache written by P processes is P part files and a main file of virtual datasets
(`evl_cache.cache.store`). The main file can map a part's rows with one strided selection per part (what
`FeatureStore.create` writes: at most P + 1 mappings per array) or with one mapping per shard (the
obvious way: N / shard-size mappings). For caches of --videos videos in shards of 8 over 8 parts,
made by `FeatureStore.create` with Kinetics' array set (4 blocks of tokens and maps, embed, the video
table: 21 arrays) and a small feature shape (what is timed does not depend on it), in the same run:

- baseline: the same cache as one HDF5 file (`parts=1`);
- ours: joined, one strided selection per part;
- the alternative: joined, one mapping per shard (the same writer with that mapping);
- and a joined cache's row read from the part file that holds it (`FeatureStore.for_shard`), which
  skips the virtual dataset.

Timed: writing the main file; opening the cache and reading one row of every array (what each
DataLoader worker does first); reading one (video, view) row of one array at random videos. The
features are never written, so a read finds no chunk and returns fill values without touching the
disk: what is timed is HDF5's own work per read, which is what a join adds to.

Run: python benchmarks/bench_join.py [--videos 2400,24000,240000] [--reads 300]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from unittest import mock

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, Timer, load_line, machine_line, print_result  # noqa: E402

import evl_cache.cache.store as store_module  # noqa: E402
from evl_cache.cache.store import CacheLayout, FeatureStore  # noqa: E402

SHARD, PARTS = 8, 8


def per_shard_rows(rows: int, shard_size: int, parts: int, part: int) -> list[tuple[int, int, int, int]]:
    """The alternative mapping: each shard of the part on its own (start, stride, count, block)."""
    return [(start, shard_size, 1, min(shard_size, rows - start))
            for start in range(part * shard_size, rows, parts * shard_size)]


def make_cache(path: Path, videos: int, parts: int) -> tuple[CacheLayout, float | None]:
    """A cache of `videos` videos at `path` in `parts` files: its layout, and the seconds it took to
    write its main file of virtual datasets (None for one file)."""
    layout = CacheLayout(num_videos=videos, views=3, frames=8, tokens=5, width=8, grid=(2, 2), embed_dim=8,
                         blocks=(8, 9, 10, 11), shard_size=SHARD)
    columns = {"path": np.array([f"video_{i}.mp4" for i in range(videos)], dtype=object)}
    write_join, timer = store_module._write_join, Timer()

    def timed_join(*args):
        with timer:
            write_join(*args)

    with mock.patch.object(store_module, "_write_join", timed_join):
        FeatureStore.create(path, layout, {}, columns, parts=parts).close()
    return layout, getattr(timer, "seconds", None)


def time_reads(path: Path, layout: CacheLayout, reads: int) -> tuple[float, float, float]:
    """(seconds to open the cache and read one row of every array, mean seconds per random row read,
    the same read from the part file that holds the row: `FeatureStore.for_shard`)."""
    with Timer() as opened:
        with FeatureStore(path) as store:
            for name, *_ in layout.all_arrays():
                store.array(name)[layout.num_videos // 2]
    rows = [int(row) for row in np.random.default_rng(0).integers(0, layout.num_videos, reads)]
    name = f"tokens/block_{layout.blocks[-1]}"
    with FeatureStore(path) as store:
        for shard in range(min(store.parts, -(-layout.num_videos // SHARD))):  # open every part first
            store.for_shard(shard).array(name)[0, 0]
        array = store.array(name)
        array[0, 0]
        with Timer() as through_join:
            for row in rows:
                array[row, 0]
        with Timer() as from_part:
            for row in rows:
                store.for_shard(row // SHARD).array(name)[row, 0]
    return opened.seconds, through_join.seconds / reads, from_part.seconds / reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", default="2400,24000,240000", help="cache sizes, comma-separated")
    parser.add_argument("--reads", type=int, default=300, help="random row reads per cache")
    args = parser.parse_args()
    print(machine_line())
    print(f"setup: shards of {SHARD} videos, {PARTS} part files; h5py {h5py.__version__} with HDF5 "
          f"{h5py.version.hdf5_version}")
    with tempfile.TemporaryDirectory(prefix="bench_join_") as tmp, OtherLoad() as other:
        for videos in (int(v) for v in args.videos.split(",")):
            results = {}
            for kind, parts, mapping in (("one file", 1, None), ("joined, strided", PARTS, None),
                                         ("joined, per shard", PARTS, per_shard_rows)):
                path = Path(tmp) / f"cache_{videos}.h5"
                with mock.patch.object(store_module, "_part_rows", mapping) if mapping else contextlib.nullcontext():
                    layout, join = make_cache(path, videos, parts)
                opened, per_read, part_read = time_reads(path, layout, args.reads)
                results[kind] = (opened, per_read)
                made = "" if join is None else (f"main file written in {join:.2f} s, "
                                                f"{path.stat().st_size / 1e6:.2f} MB; ")
                print(f"{videos} videos ({-(-videos // SHARD)} shards), {kind}: {made}open + one row of each of "
                      f"{len(layout.all_arrays())} arrays {1e3 * opened:.1f} ms; random row read {1e6 * per_read:.0f} us"
                      + (f" (from its part file: {1e6 * part_read:.0f} us)" if parts > 1 else ""), flush=True)
                for file in Path(tmp).iterdir():
                    file.unlink()
            base_open, base_read = results["one file"]
            for kind in ("joined, strided", "joined, per shard"):
                opened, per_read = results[kind]
                print(f"  {kind} / one file: open {opened / base_open:.1f}x, row read {per_read / base_read:.1f}x")
    print(other.note())
    (base_open, base_read), (opened, per_read) = results["one file"], results["joined, strided"]
    setup = f"{videos} videos, {-(-videos // SHARD)} shards, {PARTS} parts, as written"
    print_result("join", f"joined HDF5 cache / one file: open + one row of each array ({setup})", opened, base_open,
                 "s", "ours/baseline", "", None, other.share, vars(args))
    print_result("join", f"joined HDF5 cache / one file: a random row read through the virtual dataset ({setup})",
                 per_read, base_read, "s", "ours/baseline", "", None, other.share, vars(args))
    print(load_line())


if __name__ == "__main__":
    main()
