"""What does a 5-run ablation study cost from one cache, against 5 runs of the authors' online way?

The paper's decoder ablations, read from `pipelines/k400_ablations.toml` (--runs; default: full,
no_temporal_conv, no_temporal_pos_embed, no_temporal_cross_attention, layers_2), each with that
recipe's decoder options; ViT-B-16 (open_clip, random weights), 8 x 16 dense sampling, 4 cached blocks
with maps, the EVL decoder with a 400-class head, AdamW. The same clips on both sides, built with
bench_epoch.py's pieces: Kinetics-like videos (10 s, 25 fps, 456x340, libx264) in a `train/` split,
one centre clip each.

- ours: one extraction of the clips (`extract()`, timed as the whole call, model build included), then
  for each run E epochs from that cache as `evl_cache.decoder.train` runs them (the run's one `CacheLoader`,
  --workers reader threads), each run reading only what its decoder needs (layers_2: the last 2
  blocks; no cross-attention: no maps).
- baseline, the authors' way: for each run, E epochs with the frozen backbone online (`FrozenBackbone`
  capturing the run's layers) on every batch's frames, then the same decoder step. The frames are
  decoded once before timing and held in memory, which favours the baseline (the authors decode every
  epoch); its backbone also computes the maps for no_temporal_cross_attention, which that run's
  decoder does not read.

Measured in this run: the extraction (once), and for each run one epoch from the cache and one online
epoch, --repeats times interleaved, each run's fastest kept (every timed phase is re-run, --tries,
while other processes take over 5 % of the CPU). Each run's model and optimizer serve both of its
epoch kinds (a step's cost does not depend on the weights' values). Multiplied, not run: a study of
E epochs per run costs

    ours     = extraction + sum over the runs of E x (its epoch from the cache)
    baseline =              sum over the runs of E x (its online epoch)

printed for each E in --epochs (the authors' K400 schedule is about 53 epochs: 50,000 steps of 256
clips over ~240k videos). Not counted on either side: evaluation, checkpoints, start-up (each run's
first cache epoch, which starts its loader, and one online step are untimed warm-up).

Run: python benchmarks/bench_study.py [--clips 6] [--batch 2] [--workers 2] [--repeats 2]
         [--epochs 1,10,50] [--runs full,...] [--recipe pipelines/k400_ablations.toml] [--video-dir DIR]
         [--tries 2] [--wait-quiet 30]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BLOCKS,
    FRAMES,
    MODEL,
    STRIDE,
    Timer,
    b16_backbone,
    b16_decoder,
    clean_run,
    load_line,
    machine_line,
    print_result,
    share_note,
)
from bench_epoch import (  # noqa: E402
    add_epoch_options,
    cache_config,
    cache_dataset,
    cache_epoch,
    decoded_batches,
    online_epoch,
    train_videos,
)

from evl_cache.apps.study import load_study  # noqa: E402
from evl_cache.cache.extract import extract  # noqa: E402
from evl_cache.config import to_dict  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RUNS = "full,no_temporal_conv,no_temporal_pos_embed,no_temporal_cross_attention,layers_2"
DECODER_OPTIONS = ("layers", "temporal_conv", "temporal_pos_embed", "temporal_cross_attention")


def ablations(recipe: Path, names: list[str]) -> dict[str, dict]:
    """The decoder options of the named runs of a study recipe; refuses runs that differ in anything
    else (frames, data, schedule), which this benchmark does not vary."""
    runs = load_study(recipe).runs
    missing = [n for n in names if n not in runs]
    if missing:
        raise SystemExit(f"{recipe}: no run(s) {missing}; it has {list(runs)}")

    def rest(name: str) -> dict:
        return {k: v for k, v in to_dict(runs[name]).items() if k not in DECODER_OPTIONS + ("out",)}

    for name in names:
        if rest(name) != rest(names[0]):
            differs = sorted(k for k, v in rest(name).items() if rest(names[0]).get(k) != v)
            raise SystemExit(f"{recipe}: run {name} differs from {names[0]} in {differs}, not only in the decoder")
    return {name: {k: getattr(runs[name], k) for k in DECODER_OPTIONS} for name in names}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_epoch_options(parser)  # --clips --batch --workers --repeats (per run) --video-dir --tries --wait-quiet
    parser.add_argument("--epochs", default="1,10,50", help="epochs per run E to cost the study at, comma-separated")
    parser.add_argument("--runs", default=RUNS, help="the recipe's runs, comma-separated")
    parser.add_argument("--recipe", type=Path, default=ROOT / "pipelines" / "k400_ablations.toml",
                        help="study recipe the runs' decoder options come from")
    args = parser.parse_args()
    epochs = [int(e) for e in args.epochs.split(",")]
    runs = ablations(args.recipe, args.runs.split(","))
    print(machine_line())
    print(f"setup: {MODEL} (random weights), {FRAMES} x {STRIDE}, {BLOCKS} cached blocks + maps, 400-class EVL "
          f"decoder, {args.clips} clips, batch {args.batch} ({-(-args.clips // args.batch)} steps/epoch), cache "
          f"loader workers {args.workers}, baseline frames decoded before timing, in memory")
    for name, options in runs.items():
        print(f"run {name}: {options}")

    with tempfile.TemporaryDirectory(prefix="bench_study_") as tmp:
        tmp = Path(tmp)
        with Timer() as timer:
            video_dir = train_videos(args.video_dir or tmp, args.clips)
        print(f"videos: {args.clips} written in {timer.seconds:.1f} s")
        config = cache_config(video_dir, tmp / "cache.zarr", args.batch)
        config.overwrite = True  # a re-run attempt extracts anew
        summary, extract_s, extract_share, attempts = clean_run(lambda: extract(config), args.tries,
                                                                args.wait_quiet)
        if summary.clips != args.clips or summary.failed:
            raise SystemExit(f"extraction did {summary.clips} clips ({summary.failed} failed), expected {args.clips}")
        print(f"ours, the study's one extraction: {extract_s:.2f} s (whole call; loop {summary.seconds:.2f} s), "
              f"{summary.clips} clips; {share_note(extract_share)} (attempt {attempts})", flush=True)

        frames = decoded_batches(video_dir, args.batch)
        backbones = {layers: b16_backbone(layers) for layers in sorted({o["layers"] for o in runs.values()})}
        datasets, models = {}, {}
        for name, options in runs.items():
            datasets[name] = cache_dataset(config.out, options["layers"], options["temporal_cross_attention"])
            models[name] = b16_decoder(**options)
            cache_epoch(datasets[name], args.batch, args.workers, 0, *models[name])  # warm-up: starts its loader
            online_epoch(frames[:1], backbones[options["layers"]], *models[name])  # warm-up: one step
            print(f"run {name}: {datasets[name].bytes_per_item() / 1e6:.1f} MB read per item from the cache")

        timed = {name: {"cache": [], "online": []} for name in runs}
        for repeat in range(args.repeats):
            for name, options in runs.items():
                kinds = {"cache": lambda: cache_epoch(datasets[name], args.batch, args.workers, repeat + 1,
                                                      *models[name]),
                         "online": lambda: online_epoch(frames, backbones[options["layers"]], *models[name])}
                for kind, run in kinds.items():
                    result, seconds, share, attempts = clean_run(run, args.tries, args.wait_quiet)
                    timed[name][kind].append((seconds, result, share))
                    detail = (f"waiting for data {result[1]:.2f} s" if kind == "cache"
                              else f"backbone {result[1]:.2f} s, decoder {result[2]:.2f} s")
                    print(f"repeat {repeat + 1}, {name}, {kind} epoch: {seconds:.2f} s ({detail}); "
                          f"{share_note(share)} (attempt {attempts})", flush=True)

    fastest = {name: {kind: min(epochs_, key=lambda r: r[0]) for kind, epochs_ in kinds_.items()}
               for name, kinds_ in timed.items()}
    print()
    for name, kinds_ in fastest.items():
        cache_s, (online_s, (_, backbone_s, decoder_s), _) = kinds_["cache"][0], kinds_["online"]
        print(f"run {name}: epoch from the cache {cache_s:.2f} s, online epoch {online_s:.2f} s (backbone "
              f"{backbone_s:.2f} s, decoder {decoder_s:.2f} s); ratio {online_s / cache_s:.2f}")
    cache_sum = sum(k["cache"][0] for k in fastest.values())
    online_sum = sum(k["online"][0] for k in fastest.values())
    worst = max([extract_share] + [k[kind][2] for k in fastest.values() for kind in k])
    print(f"measured: the extraction {extract_s:.2f} s; per epoch, summed over the {len(runs)} runs: from the cache "
          f"{cache_sum:.2f} s, online {online_sum:.2f} s. Multiplied: E x those sums")
    if online_sum > cache_sum:
        print(f"break-even: the cache pays for itself from E = {extract_s / (online_sum - cache_sum):.2f} epochs "
              f"per run")
    print(f"{'E':>4} {'ours: extraction + E x cache epochs (s)':>42} {'baseline: E x online epochs (s)':>34} "
          f"{'baseline/ours':>14}")
    for e in epochs:
        ours, baseline = extract_s + e * cache_sum, e * online_sum
        print(f"{e:>4} {ours:>42.1f} {baseline:>34.1f} {baseline / ours:>14.2f}")
    print(f"other processes' CPU share in the phases used: worst {100 * worst:.0f} %"
          f"{'  <-- contaminated: rerun on a quiet machine' if worst > 0.05 else ' (clean)'}")
    print(load_line())
    for e in epochs:
        print_result("study", f"{len(runs)}-run ablation study, E = {e}: extraction + {len(runs)} x E cache epochs vs "
                     f"{len(runs)} x E online epochs (B/16 {FRAMES}x{STRIDE}, {args.clips} clips)",
                     extract_s + e * cache_sum, e * online_sum, "s", "baseline/ours", "", None, worst, vars(args),
                     epochs_per_run=e, extraction_s=extract_s, cache_epochs_s=cache_sum, online_epochs_s=online_sum,
                     per_run={name: {"cache_epoch_s": k["cache"][0], "online_epoch_s": k["online"][0],
                                     "online_backbone_s": k["online"][1][1]} for name, k in fastest.items()})


if __name__ == "__main__":
    main()
