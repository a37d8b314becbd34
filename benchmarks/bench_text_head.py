"""How much faster is a text-side (ViFi-CLIP / CoOp) training epoch from the cache than with the image tower online?

ViT-B-16 (open_clip, random weights), 8 frames per clip, the `--head text` model: learned prompt
context (16 tokens, CoOp) through CLIP's frozen text tower, scored against the frame-averaged CLIP
embedding of each clip; AdamW. The same clips on both sides: the demo's synthetic videos (4 classes)
in a `train/` split, one centre clip each.

- baseline, the image tower online: every step runs CLIP's image tower (no grad) on the batch's
  frames, then the text-side step (forward, cross-entropy, backward, AdamW). The frames are decoded
  once before timing and held in memory (this favours the baseline, which would decode every epoch).
- ours: the epoch `evl_cache.decoder.train` runs for `--head text`: the run's `CacheLoader` over `CacheDataset`
  reading only the cached per-frame embeddings (`embed`, 8 x 512 float16 = 8 KB per clip), then the
  same step. The cache is written first by `extract()` (not timed).
- the text-side step alone on batches already in memory, and the image tower alone (timed inside the
  baseline's epoch), give the limit of the ratio: (image tower + step) / step.

Both sides start from the same weights. Each epoch kind runs --repeats times, interleaved; medians,
and the fastest of each kind (the least disturbed on a shared machine).

Run: python benchmarks/bench_text_head.py [--clips 8] [--batch 4] [--workers 2] [--repeats 3] [--tune-text]
     [--threads N]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, load_line, loader_epoch, machine_line, print_result, train_loader  # noqa: E402

from evl_cache.cache.dataset import CacheDataset, CacheLoader, select_embeddings  # noqa: E402
from evl_cache.cache.extract import ExtractConfig, extract  # noqa: E402
from evl_cache.cache.store import FeatureStore  # noqa: E402
from evl_cache.decoder.model import TextHeadModel  # noqa: E402
from evl_cache.towers.backbone import load_clip  # noqa: E402
from evl_cache.towers.text import ClassPrompts, load_text_tower  # noqa: E402
from evl_cache.video.clips import ClipSpec, read_video_clips  # noqa: E402
from evl_cache.video.synthetic import make_sample_dataset  # noqa: E402

MODEL, FRAMES, STRIDE, PROMPT_TOKENS = "ViT-B-16", 8, 4, 16


def text_step(model: TextHeadModel, optimizer, embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """One training step as `evl_cache.decoder.train` takes it on CPU for `--head text`."""
    loss = F.cross_entropy(model(embeddings).float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def online_epoch(batches, visual, mean, std, model, optimizer) -> tuple[float, float]:
    """(seconds, of which image tower) with CLIP's image tower run on every batch's frames."""
    image_s, start = 0.0, time.perf_counter()
    for clips, labels in batches:
        t0 = time.perf_counter()
        with torch.no_grad():
            pixels = (clips.flatten(0, 1).float() / 255 - mean) / std
            embeddings = visual(pixels).view(clips.shape[0], clips.shape[1], -1)
        image_s += time.perf_counter() - t0
        text_step(model, optimizer, embeddings.half().float(), labels)  # float16 as the cache holds them
    return time.perf_counter() - start, image_s


def step_only_epoch(batches, model, optimizer) -> float:
    start = time.perf_counter()
    for batch in batches:
        text_step(model, optimizer, batch["embed"], batch["label"])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=8, help="training videos, one clip each (a multiple of 4)")
    parser.add_argument("--batch", type=int, default=4, help="clips per step")
    parser.add_argument("--workers", type=int, default=2, help="cache reader threads")
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs of each kind, interleaved")
    parser.add_argument("--tune-text", action="store_true", help="train the whole text tower too (--tune text)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads [default: torch's own]; 1 is "
                        "steadier on a machine other processes share")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line())
    with tempfile.TemporaryDirectory(prefix="bench_text_head_") as tmp:
        tmp = Path(tmp)
        videos = make_sample_dataset(tmp / "videos", videos_per_class={"train": max(args.clips // 4, 1)},
                                     num_frames=40, size=(120, 160))
        cache = tmp / "cache.zarr"
        summary = extract(ExtractConfig(videos=videos, out=cache, model=MODEL, pretrained="none", blocks=1,
                                        frames=FRAMES, stride=STRIDE, eval_views=1, train_views=1,
                                        batch_size=args.batch, workers=2, device="cpu"))
        with FeatureStore(cache) as store:
            attrs = store.check_version()
            paths, labels = store.column("path"), store.column("label")
        clip_count = len(paths)
        dataset = CacheDataset(cache, list(range(clip_count)), select_embeddings(attrs, None, 1), views="random")
        print(f"setup: {MODEL} (random weights), {FRAMES} frames per clip, {len(attrs['class_names'])} classes, "
              f"--head text with {PROMPT_TOKENS} prompt tokens, text tower "
              f"{'trained (--tune text)' if args.tune_text else 'frozen'}; {clip_count} clips, batch {args.batch} "
              f"({-(-clip_count // args.batch)} steps/epoch), cache loader workers {args.workers}; cache extracted in "
              f"{summary.seconds:.1f} s (not timed); cache read per clip: {dataset.bytes_per_item()} bytes")

        tower, tokenizer = load_text_tower(attrs["backbone"], attrs["sampling"]["seed"])
        torch.manual_seed(0)
        template = TextHeadModel(ClassPrompts(tower, tokenizer, attrs["class_names"], context_tokens=PROMPT_TOKENS,
                                              tune_tower=args.tune_text))

        def fresh():
            model = copy.deepcopy(template).train()
            trained = [p for p in model.parameters() if p.requires_grad]
            return model, torch.optim.AdamW(trained, lr=2e-3, weight_decay=0.05)

        models = {name: fresh() for name in ("cache", "step only", "online")}
        print(f"trained parameters: {sum(p.numel() for p in models['cache'][0].parameters() if p.requires_grad)}")

        clip, spec = load_clip(MODEL, "none", None, "cpu", seed=0)
        visual = clip.visual.eval()
        mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)
        clip_spec = ClipSpec.from_cache(attrs)
        decoded = [read_video_clips(videos / paths[i], "train", i, clip_spec).clips[0] for i in range(clip_count)]
        frame_batches = [(torch.stack(decoded[i:i + args.batch]), torch.tensor(labels[i:i + args.batch]).long())
                         for i in range(0, clip_count, args.batch)]
        cached_batches = list(CacheLoader.sequential(dataset, args.batch))
        sampler, loader = train_loader(dataset, args.batch, args.workers)
        # warm-up (untimed)
        step_only_epoch(cached_batches[:1], *models["step only"])
        step_only_epoch(cached_batches[:1], *models["cache"])
        online_epoch(frame_batches[:1], visual, mean, std, *models["online"])

        cache_s, wait_s, step_s, online_s, image_s = [], [], [], [], []
        with OtherLoad() as other:
            for repeat in range(args.repeats):
                model, optimizer = models["cache"]
                seconds, wait = loader_epoch(sampler, loader, repeat + 1,
                                             lambda b: text_step(model, optimizer, b["embed"], b["label"]))
                cache_s.append(seconds)
                wait_s.append(wait)
                step_s.append(step_only_epoch(cached_batches, *models["step only"]))
                total, in_image = online_epoch(frame_batches, visual, mean, std, *models["online"])
                online_s.append(total)
                image_s.append(in_image)
                print(f"repeat {repeat + 1}: cache epoch {seconds:.2f} s (waiting for data {wait:.2f} s), step only "
                      f"{step_s[-1]:.2f} s, online epoch {total:.2f} s (image tower {in_image:.2f} s)", flush=True)

    med = statistics.median
    print()
    print(f"baseline, image tower online: {med(online_s):.2f} s/epoch ({med(online_s) / clip_count:.3f} s/clip; "
          f"image tower {med(image_s):.2f} s of it)")
    print(f"ours, from the cache: {med(cache_s):.2f} s/epoch ({med(cache_s) / clip_count:.3f} s/clip; data wait "
          f"{100 * med(wait_s) / med(cache_s):.1f} %)")
    print(f"text-side step alone: {med(step_s):.2f} s/epoch")
    print(f"ratio online/cache = {med(online_s) / med(cache_s):.1f}; limit (image tower + step)/step = "
          f"{(med(image_s) + med(step_s)) / med(step_s):.1f}")
    print(f"fastest epochs (less disturbed by other processes): online {min(online_s):.2f} s, cache "
          f"{min(cache_s):.2f} s, ratio {min(online_s) / min(cache_s):.1f}; step alone {min(step_s):.2f} s, "
          f"image tower {min(image_s):.2f} s, limit {(min(image_s) + min(step_s)) / min(step_s):.1f}")
    print(f"while timing: {other.note()}")
    print(load_line())
    print_result("text_head", f"--head text epoch from the cache vs the image tower online (B/16, {clip_count} clips, "
                 f"{'--tune text' if args.tune_text else 'text tower frozen'}, medians)",
                 med(cache_s), med(online_s), "s/epoch", "baseline/ours", "", None, other.share, vars(args),
                 limit=(med(image_s) + med(step_s)) / med(step_s), data_wait_share=med(wait_s) / med(cache_s))


if __name__ == "__main__":
    main()
