"""`evl-cache demo`: the whole product on a sample dataset it makes itself, in a few minutes on a CPU.

It writes synthetic videos (two classes told apart only by motion, two only by appearance), extracts
them with a small random-weight CLIP model, trains the EVL decoder from the cache, and trains an
ablation with the three temporal modules off from the same cache, to show what they buy.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ..cache.extract import ExtractConfig, extract
from ..config import option
from ..decoder.evaluate import EvalConfig, evaluate
from ..decoder.train import TrainConfig, train
from ..video.synthetic import make_sample_dataset

log = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Options of `evl-cache demo`."""
    out: Path = option(Path("evl-demo"), "folder for the sample videos, the cache and the runs")
    model: str = option("EVL-Small", "open_clip model (the shipped EVL-Small runs in minutes on a CPU)")
    train_videos: int = option(16, "training videos per class")
    val_videos: int = option(6, "validation videos per class")
    epochs: int = option(30, "training epochs")
    workers: int = option(2, "video-decoding processes of the extraction, cache-reading threads of training")
    device: str = option("auto", "cuda, cpu, or auto")


def run_demo(config: DemoConfig) -> dict:
    """Make the sample, extract, train the full model and a no-temporal ablation, evaluate; return top-1s."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    videos = out / "videos"
    if not videos.exists():
        make_sample_dataset(videos, videos_per_class={"train": config.train_videos, "val": config.val_videos})
        log.info("demo: wrote sample videos to %s", videos)
    cache = out / "feats.zarr"
    extract(ExtractConfig(out=cache, videos=videos, model=config.model, pretrained="none", frames=8, stride=4,
                          eval_views=3, workers=config.workers, device=config.device))
    common = dict(features=cache, layers=4, epochs=config.epochs, batch_size=16, lr=1e-3, mlp_dropout=0.0,
                  head_dropout=0.0, workers=config.workers, device=config.device, in_memory=True, resume=True)
    results = {}
    for name, ablation in (("evl", {}), ("no_temporal", dict(temporal_conv=False, temporal_pos_embed=False,
                                                           temporal_cross_attention=False))):
        run = out / "runs" / name
        train(TrainConfig(out=run, **common, **ablation))
        results[name] = evaluate(EvalConfig(run=run, workers=config.workers, device=config.device))
    for name, metrics in results.items():
        log.info("demo: %-12s val top-1 %.3f (per class: %s)", name, metrics["top1"],
                 ", ".join(f"{a:.2f}" for a in metrics["per_class_accuracy"]))
    log.info("demo: videos in %s, cache in %s, runs in %s", videos, cache, out / "runs")
    return {name: metrics["top1"] for name, metrics in results.items()}
