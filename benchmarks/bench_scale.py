"""Does extraction scale from 1 to 2 processes under torchrun, and how long does a killed run take to resume?

Stage one on Kinetics-like videos (10 s at 25 fps, 456x340, libx264, written here with
`evl_cache.video.synthetic`), open_clip ViT-B-16 with random weights, 8 x 16 dense sampling, 4 cached
blocks, one clip per video (a `val/` split with --eval-views 1), one video per shard (the unit of
resuming). Every run is the real command, `torchrun --standalone --nproc-per-node P -m evl_cache.cli
extract ...`, into a new cache; the machine's cores are split evenly over the processes
(OMP_NUM_THREADS = cores / P), and each process decodes in --workers DataLoader workers.

- baseline: 1 process; ours: 2 processes. Throughput is clips per second of the extraction's own
  loop (the `seconds` of its summary in `<cache>.extract.jsonl`: first decode to last shard written,
  all processes done; imports and model building excluded); the whole command's wall time and CPU
  seconds (all its processes) are printed too. The ratio ours / baseline is the speed-up.
- resume: the 2-process command killed (SIGKILL to the whole job) once --kill-at of the videos are
  written, then the same command again: its wall time against the uninterrupted 2-process run's
  (the baseline in the same run), and how much of it is more than the missing videos' share of the
  uninterrupted loop (start-up, model building, finding what is left).

Both the 2-process and the resumed cache are checked against the 1-process cache, array for array.
On a shared machine each timed command records the CPU share other processes took while it ran and
is re-run (--tries) while that share is above 5 %; the cleanest attempt is kept.

Run: python benchmarks/bench_scale.py [--videos 10] [--workers 1] [--format zarr|h5] [--kill-at 0.9]
         [--video-dir DIR] [--tries 2] [--wait-quiet 30]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BLOCKS,
    FRAMES,
    MODEL,
    STRIDE,
    VIDEO_FPS,
    VIDEO_HEIGHT,
    VIDEO_SECONDS,
    VIDEO_WIDTH,
    Timer,
    add_clean_options,
    clean_run,
    load_line,
    machine_line,
    print_result,
    share_note,
    write_kinetics_like_videos,
)

from evl_cache.cache.store import PENDING, FeatureStore, remove_store  # noqa: E402
from evl_cache.cache.verify import cache_layout_of  # noqa: E402


def extract_command(videos: Path, out: Path, processes: int, workers: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
            "-m", "evl_cache.cli", "extract", "--videos", str(videos), "--out", str(out), "--model", MODEL,
            "--pretrained", "none", "--blocks", str(BLOCKS), "--frames", str(FRAMES), "--stride", str(STRIDE),
            "--eval-views", "1", "--train-views", "1", "--shard-size", "1", "--batch-size", "1",
            "--workers", str(workers), "--device", "cpu"]


def environment(processes: int) -> dict[str, str]:
    """The machine's cores split evenly over the processes (as torchrun would for more than one)."""
    return {**os.environ, "OMP_NUM_THREADS": str(max(os.cpu_count() // processes, 1))}


def last_summary(out: Path) -> dict:
    """The summary the latest extraction into `out` appended to its `.extract.jsonl`."""
    lines = Path(f"{out}.extract.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if '"summary"' in line][-1]


def remove_cache(out: Path) -> None:
    """The cache at `out` (with its HDF5 part files) and its `.extract.jsonl` gone."""
    if out.exists():
        remove_store(out)
    Path(f"{out}.extract.jsonl").unlink(missing_ok=True)


def run_extract(videos: Path, out: Path, processes: int, workers: int) -> dict:
    """One extraction into a new cache at `out`; its summary."""
    remove_cache(out)
    return resume_extract(videos, out, processes, workers)


def resume_extract(videos: Path, out: Path, processes: int, workers: int) -> dict:
    """The same command again over whatever `out` holds; its summary, with the CPU seconds the whole
    command took (all its processes) as `cpu_seconds`."""
    before = os.times()
    result = subprocess.run(extract_command(videos, out, processes, workers), env=environment(processes),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    after = os.times()
    if result.returncode:
        raise SystemExit(f"extraction failed:\n{result.stderr[-3000:]}")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {**last_summary(out), "cpu_seconds": cpu}


def kill_when_written(videos: Path, out: Path, processes: int, workers: int, count: int) -> float:
    """Start a new extraction into `out` and SIGKILL the whole job once `count` videos are written;
    returns the seconds it ran."""
    remove_cache(out)
    process = subprocess.Popen(extract_command(videos, out, processes, workers), env=environment(processes),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = Path(f"{out}.extract.jsonl")
    with Timer() as timer:
        while process.poll() is None:
            if metrics.exists() and sum(json.loads(line).get("done", 0) for line in metrics.read_text().splitlines()
                                        if '"shard"' in line) >= count:
                with open(f"/proc/{process.pid}/task/{process.pid}/children") as handle:
                    workers = [int(pid) for pid in handle.read().split()]
                for pid in workers:  # torchrun starts each process in a session of its own
                    os.killpg(pid, signal.SIGKILL)
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        process.wait()
    return timer.seconds


def cache_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a cache, as numpy (per-video columns decoded)."""
    with FeatureStore(path) as store:
        layout = cache_layout_of(store, store.attrs)
        return {name: store.column(name.removeprefix("videos/")) if name.startswith("videos/")
                else np.asarray(store.array(name)[...]) for name, *_ in layout.all_arrays()}


def same_cache(a: Path, b: Path) -> str:
    x, y = cache_arrays(a), cache_arrays(b)
    differ = [name for name in x if not np.array_equal(x[name], y[name])]
    return "identical, array for array" if not differ else f"DIFFERENT: {differ}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=10, help="videos (one clip, one shard each)")
    parser.add_argument("--workers", type=int, default=1, help="decode workers per process")
    parser.add_argument("--format", choices=("zarr", "h5"), default="zarr",
                        help="cache format (h5: one part file per process, joined)")
    parser.add_argument("--kill-at", type=float, default=0.9, help="share of the videos written before the kill")
    parser.add_argument("--video-dir", type=Path, default=None,
                        help="write (or reuse) the videos here instead of a temporary folder")
    add_clean_options(parser)
    args = parser.parse_args()
    print(machine_line())
    print(f"setup: {MODEL} (random weights), {FRAMES} x {STRIDE} dense, {BLOCKS} cached blocks, {args.videos} videos "
          f"of {VIDEO_SECONDS} s at {VIDEO_FPS} fps {VIDEO_WIDTH}x{VIDEO_HEIGHT} libx264, 1 clip and 1 shard per "
          f"video, batch size 1, {args.workers} decode worker(s) per process, {args.format} cache; "
          f"torch threads per process: {environment(1)['OMP_NUM_THREADS']} with 1 process, "
          f"{environment(2)['OMP_NUM_THREADS']} with 2")

    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        videos = (args.video_dir or tmp) / f"videos_{args.videos}"
        with Timer() as timer:
            write_kinetics_like_videos(videos, args.videos)
        print(f"videos: {args.videos} ready in {timer.seconds:.1f} s")

        runs = {}
        for processes in (1, 2):
            out = tmp / f"p{processes}.{args.format}"
            summary, seconds, share, attempts = clean_run(
                lambda: run_extract(videos, out, processes, args.workers), args.tries, args.wait_quiet)
            if summary["done"] != args.videos:
                raise SystemExit(f"{processes} process(es): {summary['done']} of {args.videos} videos done")
            runs[processes] = (summary, seconds, share)
            print(f"{processes} process(es): loop {summary['seconds']:.1f} s for {summary['clips']} clips "
                  f"({summary['clips'] / summary['seconds']:.3f} clips/s); whole command {seconds:.1f} s, "
                  f"{summary['cpu_seconds']:.0f} CPU s ({summary['cpu_seconds'] / seconds:.2f} of "
                  f"{os.cpu_count()} cores); {share_note(share)} (attempt {attempts})", flush=True)
        print(f"check: 2-process cache against the 1-process cache: {same_cache(tmp / f'p2.{args.format}', tmp / f'p1.{args.format}')}")

        killed = tmp / f"killed.{args.format}"
        count = int(round(args.kill_at * args.videos))
        kill = {}

        def kill_at_count() -> None:  # untimed, before each attempt of the resume
            kill["ran"] = kill_when_written(videos, killed, 2, args.workers, count)
            with FeatureStore(killed) as store:
                kill["left"] = int((store.column("status") == PENDING).sum())

        (resumed, ran, left), resume_seconds, share, attempts = clean_run(
            lambda: (resume_extract(videos, killed, 2, args.workers), kill["ran"], kill["left"]), args.tries,
            args.wait_quiet, prepare=kill_at_count)
        print(f"killed: the 2-process job SIGKILLed after {ran:.1f} s with {args.videos - left} of "
              f"{args.videos} videos written ({left} left); resume: whole command {resume_seconds:.1f} s, loop "
              f"{resumed['seconds']:.1f} s for {resumed['done']} video(s), {resumed['skipped']} skipped; "
              f"{share_note(share)} (attempt {attempts})")
        print(f"check: resumed cache against the 1-process cache: {same_cache(killed, tmp / f'p1.{args.format}')}")
        if args.video_dir is None:
            shutil.rmtree(videos)

    one, two = runs[1][0], runs[2][0]
    speed_up = (two["clips"] / two["seconds"]) / (one["clips"] / one["seconds"])
    whole = runs[1][1] / runs[2][1]
    full = runs[2][1]
    missing = left / args.videos * two["seconds"]
    print()
    print(f"extraction throughput, 2 processes / 1 process = {speed_up:.2f} (loop clips/s); whole commands "
          f"{whole:.2f}; CPU seconds per clip {two['cpu_seconds'] / two['clips']:.1f} against "
          f"{one['cpu_seconds'] / one['clips']:.1f} (on a busy machine, more processes also take a larger "
          f"share of the cores from the others: compare the cores used)")
    print(f"resume after a kill at {100 * count / args.videos:.0f} %: {resume_seconds:.1f} s against {full:.1f} s "
          f"for the uninterrupted 2-process command = {resume_seconds / full:.2f}; the {left} missing video(s) "
          f"are {missing:.1f} s of its loop, so {resume_seconds - missing:.1f} s is start-up and finding the work")
    worst = max([r[2] for r in runs.values()] + [share])
    print(f"other processes' CPU share, worst timed phase: {100 * worst:.0f} %"
          f"{'  <-- contaminated: rerun on a quiet machine' if worst > 0.05 else ' (clean)'}")
    setup = f"B/16 8x16, {args.videos} videos, {args.format}"
    print_result("scale", f"extraction clips/s, 2 processes under torchrun / 1 process ({setup})",
                 two["clips"] / two["seconds"], one["clips"] / one["seconds"], "clips/s", "ours/baseline", "", None,
                 max(r[2] for r in runs.values()), vars(args),
                 cpu_seconds_per_clip={"1": one["cpu_seconds"] / one["clips"], "2": two["cpu_seconds"] / two["clips"]})
    print_result("scale", f"resume of a 2-process extraction killed at {100 * count / args.videos:.0f} % / the "
                          f"uninterrupted command ({setup})", resume_seconds, full, "s", "ours/baseline", "", None,
                 share, vars(args), missing_videos_seconds=missing)
    print(load_line())


if __name__ == "__main__":
    main()
