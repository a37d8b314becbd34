"""Shared helpers of the benchmark scripts: the machine line, synthetic Kinetics-like videos, timing.

Not a benchmark itself (the scripts import it from their own folder).
"""
from __future__ import annotations

import json
import os
import platform
import time
import zlib
from pathlib import Path

import numpy as np
import torch

# ViT-B/16 at 224 px, 8 x 16 dense sampling, 4 cached blocks: the shapes every benchmark uses.
MODEL = "ViT-B-16"
FRAMES, STRIDE, BLOCKS = 8, 16, 4
WIDTH, GRID, HEADS = 768, (14, 14), 12
TOKENS, PATCHES = 1 + GRID[0] * GRID[1], GRID[0] * GRID[1]
SPAN = (FRAMES - 1) * STRIDE + 1  # 113 frames from the first sampled frame to the last

# Kinetics-like: 10 s at 25 fps, 340 px short side (the authors' 340p copies).
VIDEO_SECONDS, VIDEO_FPS, VIDEO_HEIGHT, VIDEO_WIDTH = 10, 25, 340, 456


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_model() -> str:
    """The first GPU's name and memory, or 'none'."""
    if not torch.cuda.is_available():
        return "none"
    properties = torch.cuda.get_device_properties(0)
    return f"{properties.name} ({properties.total_memory / 2**30:.0f} GiB) x {torch.cuda.device_count()}"


def machine() -> dict:
    """The machine a figure is measured on: platform, CPU model, cores, GPU, python, torch and its threads."""
    return {"platform": platform.platform(), "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu_model(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads()}


def machine_line() -> str:
    """Platform, CPU model, cores, torch version and threads, load average now."""
    m, load = machine(), os.getloadavg()
    return (f"machine: {m['platform']}, CPU {m['cpu']}, {m['cores']} cores, GPU {m['gpu']}, python {m['python']}, "
            f"torch {m['torch']} with {m['threads']} threads (interop {m['interop_threads']}); load average "
            f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at start")


def load_line(label: str = "after") -> str:
    load = os.getloadavg()
    return f"load average {label}: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def write_kinetics_like_videos(folder: Path, count: int, seconds: float = VIDEO_SECONDS,
                               fps: int = VIDEO_FPS, height: int = VIDEO_HEIGHT, width: int = VIDEO_WIDTH,
                               keyframe_interval: int | None = None, split: str = "val", first: int = 0) -> Path:
    """`folder/<split>/<class>/<name>.mp4`, libx264, `count` videos (numbered from `first`) over two
    classes (a moving square, a still circle); returns `folder`. Videos already there (same name) are
    kept, so a `--video-dir` can be reused between runs.
    """
    from evl_cache.video.synthetic import moving_shape_frames, write_video

    classes = (("slide_right", "square", (240, 200, 40), "right"), ("red_still", "circle", (220, 40, 40), "still"))
    frames = round(seconds * fps)
    for i in range(first, first + count):
        name, shape, color, direction = classes[i % len(classes)]
        suffix = "" if keyframe_interval is None else f"_gop{keyframe_interval}"
        path = folder / split / name / f"{name}_{i:03d}_{width}x{height}_{frames}f{suffix}.mp4"
        if path.exists():
            continue
        rng = np.random.default_rng([7, zlib.crc32(path.name.encode())])
        pixels = moving_shape_frames(frames, height, width, shape, color, direction, rng)
        write_video(path, pixels, fps=fps, codec="libx264", keyframe_interval=keyframe_interval)
    return folder


class Timer:
    """with Timer() as t: ...; t.seconds."""

    def __enter__(self) -> "Timer":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def decode_eval_clip(path: Path, split: str, index: int, size: int = 224) -> tuple[torch.Tensor, int, int, list[int]]:
    """One evaluation view (--eval-views 1) of a video as extraction makes it, from the same public steps
    (probe, plan, decode only the planned frames, centre crop): (uint8 [T, 3, S, S], frames in the
    video, frames the decoder produced, planned frame indices).
    """
    from evl_cache.video.decode import open_video
    from evl_cache.video.pixels import centre_crop
    from evl_cache.video.sampling import plan_views

    with open_video(path) as video:  # one open for the probe and the decoding, as extraction does
        probe = video.probe
        plan = plan_views(probe.num_frames, split, "dense", FRAMES, STRIDE, 1, 1, 0, index)[0]
        decoded = video.decode(list(plan.frame_indices), short_side=size)
    return (centre_crop(decoded.frames, size), probe.num_frames, probe.decoded_frames + decoded.decoded_count,
            list(plan.frame_indices))


def decoder_step(model, optimizer, tokens, maps_prev, maps_next, labels) -> float:
    """One training step as `evl_cache.decoder.train` takes it on CPU (forward, cross-entropy, backward, AdamW
    step, zero grad); returns the loss."""
    from torch.nn import functional as F

    logits = model(tokens, maps_prev, maps_next)
    loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def train_loader(dataset, batch: int, workers: int, seed: int = 0):
    """(sampler, loader) as `evl_cache.decoder.train` builds them: one loader for the whole run, `workers` reader
    threads, the sampler's `set_epoch` before each epoch."""
    from evl_cache.cache.dataset import CacheLoader, EpochBatches

    sampler = EpochBatches(len(dataset), batch, seed)
    return sampler, CacheLoader(dataset, sampler, workers)


def loader_epoch(sampler, loader, epoch: int, step) -> tuple[float, float]:
    """One epoch as `evl_cache.decoder.train` runs it, `step(batch)` per batch: (seconds, of which waiting for
    the next batch)."""
    sampler.set_epoch(epoch)
    start = fetch = time.perf_counter()
    wait = 0.0
    for batch in loader:
        wait += time.perf_counter() - fetch
        step(batch)
        fetch = time.perf_counter()
    return time.perf_counter() - start, wait


def b16_decoder(num_classes: int = 400, seed: int = 0, **options):
    """EVLModel with ViT-B/16 shapes (4 layers, 12 heads, 8 frames) and its AdamW (the authors' recipe).
    `options` are other DecoderConfig fields (an ablation: layers=2, temporal_conv=False, ...)."""
    from evl_cache.decoder.model import DecoderConfig, EVLModel

    torch.manual_seed(seed)
    model = EVLModel(DecoderConfig(**{"width": WIDTH, "grid": GRID, "frames": FRAMES, "num_classes": num_classes,
                                      "layers": BLOCKS, "heads": HEADS, **options}))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.05)
    return model, optimizer


def b16_backbone(blocks: int = BLOCKS):
    """A newly built frozen ViT-B/16 (open_clip, random weights) capturing the last `blocks` blocks,
    as extraction builds its own."""
    from evl_cache.towers.backbone import FrozenBackbone, load_clip

    clip_model, spec = load_clip(MODEL, "none", None, "cpu", seed=0)
    return FrozenBackbone(clip_model.visual, blocks, spec.mean, spec.std)


def _system_cpu_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as handle:
        fields = [float(v) for v in handle.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return (total - idle) / tick, total / tick


def _live_descendants_cpu_seconds() -> float:
    """CPU seconds so far of this process's descendants that are still running (persistent DataLoader
    workers, a forkserver), read from /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (float(fields[11]) + float(fields[12])) / tick  # utime, stime
    ours, frontier = set(), {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in ours}
        ours |= frontier
    return sum(cpu[pid] for pid in ours)


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants: finished ones (DataLoader workers, once
    joined) and running ones."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system + _live_descendants_cpu_seconds()


class OtherLoad:
    """Measures how much CPU other processes took while a block ran (shared machines).

    with OtherLoad() as other: ...; other.share is the fraction of the machine's CPU time that went to
    processes other than this one and its joined children. Above a few percent, timings are suspect.
    """

    def __enter__(self) -> "OtherLoad":
        self._busy, self._total = _system_cpu_seconds()
        self._own = _own_cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        busy, total = _system_cpu_seconds()
        own = _own_cpu_seconds()
        elapsed = max(total - self._total, 1e-9)
        self.share = max(0.0, (busy - self._busy) - (own - self._own)) / elapsed

    def note(self) -> str:
        flag = "  <-- other processes were busy: rerun on a quiet machine" if self.share > 0.05 else ""
        return f"other processes' CPU share {100 * self.share:.0f} %{flag}"


def quiet_check(seconds: float = 2.0) -> str:
    """How busy the machine is before we start (other processes only: we are idle while sampling)."""
    with OtherLoad() as other:
        time.sleep(seconds)
    return f"machine busy before start: {100 * other.share:.0f} % of CPU (others){' <-- busy' if other.share > 0.05 else ''}"


def wait_until_quiet(max_seconds: float, threshold: float = 0.03) -> str:
    """Wait (up to `max_seconds`) for a 3-second window in which other processes use under `threshold`
    of the CPU; returns a line saying how that went (for the output)."""
    deadline = time.monotonic() + max_seconds
    waited = 0.0
    while True:
        with OtherLoad() as other:
            time.sleep(3.0)
        if other.share < threshold or time.monotonic() >= deadline:
            state = "quiet" if other.share < threshold else "still busy"
            return (f"machine {state} before start: others used {100 * other.share:.0f} % of CPU "
                    f"(waited {waited:.0f} s for quiet)")
        time.sleep(5.0)
        waited += 8.0


def add_quiet_option(parser) -> None:
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="first wait up to SECONDS for other processes to leave the CPU idle")


def clean_run(fn, tries: int, wait_quiet: float, threshold: float = 0.05, prepare=None):
    """Run `fn()` until other processes took at most `threshold` of the CPU while it ran, at most
    `tries` times, each after waiting up to `wait_quiet` s for a quiet machine (and after `prepare()`,
    untimed, if given). Returns (fn's result, seconds, others' CPU share, attempts) of the cleanest
    attempt (least contaminated)."""
    best = None
    for attempt in range(1, max(tries, 1) + 1):
        if wait_quiet > 0:
            wait_until_quiet(wait_quiet)
        if prepare is not None:
            prepare()
        with OtherLoad() as other, Timer() as timer:
            result = fn()
        if best is None or other.share < best[2]:
            best = (result, timer.seconds, other.share, attempt)
        if other.share <= threshold:
            break
    return best


def add_clean_options(parser, tries: int = 2, wait: float = 30.0) -> None:
    parser.add_argument("--tries", type=int, default=tries,
                        help="re-run a timed phase (at most this many times) while other processes use "
                             "more than 5 %% of the CPU; the cleanest attempt is kept")
    parser.add_argument("--wait-quiet", type=float, default=wait, metavar="SECONDS",
                        help="before each timed phase, wait up to SECONDS for the CPU to be idle (0: don't)")


def share_note(share: float) -> str:
    return (f"others {100 * share:.0f} % CPU"
            + ("  <-- contaminated: other processes were busy" if share > 0.05 else ""))


RESULT_PREFIX = "result: "


def print_result(name: str, question: str, ours: float, baseline: float, unit: str, ratio_of: str, goal: str,
                 met: bool | None, others_share: float | None, settings: dict | None = None,
                 **details) -> dict:
    """Print a benchmark's headline figure as one `result: {json}` line, the line `run_all.py` collects
    into its summary table (a script may print several, one per figure). Returns the record.

    name: the script's short name ("epoch"); question: what the figure answers, with its setup;
    ours, baseline: the two measured figures in `unit`, both from this run; ratio_of: "ours/baseline"
    or "baseline/ours" (the ratio printed, computed here from the two); goal: the target in words
    ("<= 1.15", "ratio/limit >= 0.85: 0.82"; "" if none is set) and met: whether this run reached it
    (None: no goal); others_share: the worst CPU share other processes took in the timed phases
    (OtherLoad, clean_run), None if not measured; settings: the script's options (vars(args));
    details: any other figures, as JSON values.
    """
    if ratio_of not in ("ours/baseline", "baseline/ours"):
        raise ValueError(f"ratio_of must be 'ours/baseline' or 'baseline/ours', not {ratio_of!r}")
    ratio = ours / baseline if ratio_of == "ours/baseline" else baseline / ours
    record = {"name": name, "question": question, "ours": ours, "baseline": baseline, "unit": unit,
              "ratio": ratio, "ratio_of": ratio_of, "goal": goal, "met": met, "others_share": others_share,
              "contaminated": None if others_share is None else others_share > 0.05,
              "load_average": list(os.getloadavg()), "machine": machine(),
              "settings": settings or {}, "details": details}
    print(RESULT_PREFIX + json.dumps(record, default=str), flush=True)
    return record


def read_result(line: str) -> dict | None:
    """The record of a `print_result` line, None for any other output line."""
    return json.loads(line[len(RESULT_PREFIX):]) if line.startswith(RESULT_PREFIX) else None
