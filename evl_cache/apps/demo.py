"""`evl-cache demo`: the whole product on a sample dataset it makes itself, small enough for a CPU.

It writes the synthetic SAMPLE_CLASSES videos, extracts them with a small random-weight CLIP model,
trains the EVL decoder from the cache, and trains an ablation with its three temporal modules off
from the same cache, to show what they buy. slide_left and slide_right show the same frames in
opposite orders: the ablation sees a clip's frames as a set, so it can only guess between them,
while EVL tells them apart. red_still and blue_still differ in colour, which both see.
pipelines/sample.toml runs the same data and recipe with two more ablations.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..cache.extract import ExtractConfig, extract
from ..config import option, shared
from ..decoder.evaluate import load_run
from ..decoder.train import TrainConfig, train
from ..video.synthetic import SAMPLE_CLASSES, SAMPLE_SPLITS, frame_order_twins, make_sample_dataset

log = logging.getLogger(__name__)

# How the sample is cut and cached. Three training views (random starts) per video give the small
# training set some variety; no flip, which would turn a left-mover into a right-mover.
SAMPLING = dict(frames=8, stride=4, eval_views=1, train_views=3, flip=False, randaugment=False, blocks=4)
# How every run trains (the epochs are DemoConfig's). No dropout: with the authors' 0.5, EVL tells
# the twins apart less well in as many epochs.
RECIPE = dict(layers=4, batch_size=16, lr=1e-3, mlp_dropout=0.0, head_dropout=0.0, in_memory=True)
TEMPORAL_MODULES = ("temporal_conv", "temporal_pos_embed", "temporal_cross_attention")
ABLATIONS = {"evl": {}, "no_temporal": dict.fromkeys(TEMPORAL_MODULES, False)}


@dataclass
class DemoConfig:
    """Options of `evl-cache demo`."""
    out: Path = option(Path("evl-demo"), "folder for the sample videos, the cache and the runs")
    model: str = option("EVL-Small", "open_clip model (the shipped EVL-Small is small enough for a CPU)")
    train_videos: int = option(SAMPLE_SPLITS["train"], "training videos per class")
    val_videos: int = option(SAMPLE_SPLITS["val"], "validation videos per class")
    epochs: int = option(30, "training epochs")
    workers: int = option(2, "video-decoding processes of the extraction, cache-reading threads of training")
    device: str = shared("device")


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo, scored on its last weights (no choice made on the validation videos)."""
    temporal_modules: bool  # all three on (or all off)
    top1: float  # over every validation video
    twins_top1: float  # over the validation videos of the frame order twins


@dataclass(frozen=True)
class DemoResults(Mapping[str, float]):
    """What the demo measured, and what a model blind to frame order can expect; as a mapping, run
    name -> top-1 over every validation video."""
    runs: dict[str, DemoRun]
    twins: tuple[str, ...]  # the classes told apart only by the order of their frames
    videos: int  # validation videos
    twin_videos: int  # validation videos of the twins
    chance: float  # a guess among each video's twins: the best a model blind to frame order can expect there
    chance_sd: float  # one standard deviation of that guess's top-1 over `twin_videos`
    blind_top1: float  # over every video, a model blind to frame order that gets the other classes right

    def __getitem__(self, name: str) -> float:
        return self.runs[name].top1

    def __iter__(self) -> Iterator[str]:
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def table(self) -> list[str]:
        """The runs against what a model blind to frame order can expect, and a line that says what that is."""
        heads = ("run", "temporal modules", f"top-1, all {self.videos} val videos",
                 f"top-1, the {self.twin_videos} of {'/'.join(self.twins)}")
        rows = [(name, "on" if run.temporal_modules else "off", f"{run.top1:.3f}", f"{run.twins_top1:.3f}")
                for name, run in self.runs.items()]
        rows.append(("blind to frame order", "", f"{self.blind_top1:.3f} at best",
                     f"{self.chance:.3f} = chance (± {self.chance_sd:.3f})"))
        widths = [max(len(row[column]) for row in (heads, *rows)) for column in range(3)]
        lines = ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[3]])
                 for row in (heads, *rows)]
        lines.append(f"{' and '.join(self.twins)} show the same frames in opposite orders: a model blind to frame "
                     f"order can only guess between them (chance; ± one standard deviation over {self.twin_videos} "
                     f"videos), and at best get the other classes right")
        return lines


def run_demo(config: DemoConfig) -> DemoResults:
    """Make the sample, extract it, train EVL and the no-temporal ablation, score their last weights."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    videos = out / "videos"
    if not videos.exists():
        make_sample_dataset(videos, videos_per_class={"train": config.train_videos, "val": config.val_videos})
        log.info("demo: wrote sample videos to %s", videos)
    cache = out / "feats.zarr"
    extract(ExtractConfig(out=cache, videos=videos, model=config.model, pretrained="none", workers=config.workers,
                          device=config.device, **SAMPLING))
    metrics = {}
    for name, ablation in ABLATIONS.items():
        summary = train(TrainConfig(features=cache, out=out / "runs" / name, epochs=config.epochs,
                                    workers=config.workers, device=config.device, resume=True, **RECIPE, **ablation))
        metrics[name] = summary.final
    class_names = load_run(summary.run)["cache"]["class_names"]  # the order of the confusion matrices' rows
    results = _score(metrics, class_names)
    for line in results.table():
        log.info("demo: %s", line)
    log.info("demo: videos in %s, cache in %s, runs in %s", videos, cache, out / "runs")
    return results


def _score(metrics: dict[str, dict], class_names: list[str]) -> DemoResults:
    """Each run's top-1s from its confusion matrix, and the expectation of a model blind to frame order."""
    groups = frame_order_twins(SAMPLE_CLASSES)
    twins = tuple(name for group in groups for name in group)
    group_size = np.array([next((len(g) for g in groups if name in g), 1) for name in class_names])
    is_twin = np.array([name in twins for name in class_names])
    runs = {}
    for name, run_metrics in metrics.items():
        confusion = np.asarray(run_metrics["confusion"])
        on = all(ABLATIONS[name].get(module, True) for module in TEMPORAL_MODULES)
        runs[name] = DemoRun(on, float(run_metrics["top1"]),
                             float(np.diag(confusion)[is_twin].sum() / confusion[is_twin].sum()))
    counts = np.asarray(next(iter(metrics.values()))["confusion"]).sum(1)  # validation videos per class
    guess = 1 / group_size[is_twin]
    twin_counts = counts[is_twin]
    twin_videos, videos = int(twin_counts.sum()), int(counts.sum())
    chance = float((twin_counts * guess).sum() / twin_videos)
    chance_sd = math.sqrt(float((twin_counts * guess * (1 - guess)).sum())) / twin_videos
    blind_top1 = (videos - twin_videos + chance * twin_videos) / videos
    return DemoResults(runs, twins, videos, twin_videos, chance, chance_sd, blind_top1)
