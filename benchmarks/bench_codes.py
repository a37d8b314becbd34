"""Which lossy codes keep a trained tower's features? The alternatives for int8/int4 storage, measured.

Features: the tower's float32 output for clips of `MOTION_CLASSES` videos (the first --calibration clips
fit any calibration, the other --clips are measured), for EVL-Small with random weights (`plain`), the
same with a trained CLIP's statistics (`outliers`, towers/statistics.py) and, with --b16-clips, ViT-B/16
with those statistics (768 channels, 196 patches of which 4 are sinks). Each alternative encodes and
decodes them (float32); per alternative and tower:

- tokens: per channel the relative RMS error (median and p99 over the ordinary channels, the largest
  over the outlier channels: RMS above 20x the median channel's), the worst cached block;
- maps: the L1 error of each row (mean and p99), the worst block;
- bytes per ViT-B/16 8-frame clip view (4 blocks with maps, float16 embeddings), x fp16's.

Token alternatives: "token" (one scale per token: the codes of caches before format 4), "channel-rms"
(each channel divided by its RMS, then per token), "channel" (centred and divided by its RMS, then per
token: what int8/int4 use), "outliers-fp16" (the outlier channels, found on the calibration clips, kept
in float16 beside per-token codes of the rest), "group32" (int4: "channel", then a float16 scale per 32
channels of a token instead of one per token), "nf4" (int4: "channel", then 16 levels at a normal
distribution's quantiles), "fp8" (float8 e4m3 per token). Map alternatives: "linear" (scaled to the
row's max: before format 4), "fp8" (e4m3 per row), "log-fixed" (log codes over a fixed range below the
row's max: 2^-24 for 8 bits, 2^-12 for 4), "log" (the same over the row's own range, at most that: what
int8/int4 use; two float16 per row). The shipped codes come from `evl_cache.cache.encodings`; the others
are written here. Decoding speed is measured for the shipped encodings by bench_storage.py.

Run: python benchmarks/bench_codes.py [--clips 32] [--calibration 8] [--b16-clips 8]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import load_line, machine_line  # noqa: E402

from evl_cache.cache.calibration import fit_channels, map_errors, token_errors  # noqa: E402
from evl_cache.cache.encodings import LOG_RANGE, as_stored, encoding  # noqa: E402
from evl_cache.towers.backbone import FrozenBackbone, load_clip  # noqa: E402
from evl_cache.towers.statistics import OUTLIER_RATIO  # noqa: E402
from evl_cache.video.synthetic import MOTION_CLASSES, moving_shape_frames  # noqa: E402

FRAMES, BLOCKS = 8, 4
B16 = dict(tokens=197, width=768, patches=196)  # bytes are counted for ViT-B/16, 8 frames, 4 blocks
NF4 = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609, 0.2461,
                    0.3379, 0.4407, 0.5626, 0.7230, 1.0])  # QLoRA's normal-float levels


def clips(size: int, count: int) -> torch.Tensor:
    """uint8 clips [count, 8, 3, size, size] of the motion classes' squares, in turn."""
    rng = __import__("numpy").random.default_rng(0)
    made = []
    for i in range(count):
        shape = list(MOTION_CLASSES.values())[i % len(MOTION_CLASSES)]
        frames = moving_shape_frames(FRAMES, size, size, shape.shape, shape.color, shape.direction, rng,
                                     shape.travel_range, shape.side_range, shape.unbiased_start)
        made.append(torch.from_numpy(frames).permute(0, 3, 1, 2))
    return torch.stack(made)


def features(model: str, pretrained: str, count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(tokens per cached block [clips, 8, L, C], prev maps per block), float32, of the last 4 blocks."""
    clip, spec = load_clip(model, pretrained, seed=0)
    backbone = FrozenBackbone(clip.visual, BLOCKS, spec.mean, spec.std)
    with torch.no_grad():
        outputs = [backbone(batch) for batch in clips(spec.image_size, count).split(2)]
    return ([torch.cat([o.block_outputs[b] for o in outputs]) for b in range(BLOCKS)],
            [torch.cat([o.maps_prev[b] for o in outputs]) for b in range(BLOCKS)])


def per_token(x: torch.Tensor, top: int) -> torch.Tensor:
    """Linear codes of each row scaled to its max |x| (float32 round trip)."""
    scale = (x.abs().amax(-1, keepdim=True) / top).clamp(min=1e-30)
    return (x / scale).round().clamp(-top, top) * scale


def token_codes(bits: int, calibration: torch.Tensor) -> dict:
    """Name -> (round trip of tokens, extra bytes per token beyond one code per value and a float32 scale)."""
    top = 127 if bits == 8 else 7
    centre, scale = fit_channels(calibration)
    rms = calibration.reshape(-1, calibration.shape[-1]).pow(2).mean(0).sqrt()
    outliers = rms > OUTLIER_RATIO * rms.median()
    legacy, shipped = encoding(f"int{bits}-legacy"), encoding(f"int{bits}")

    def kept_outliers(x):
        rest = per_token(torch.where(outliers, 0.0, x), top)
        return torch.where(outliers, x.half().float(), rest)

    codes = {"token": (lambda x: as_stored(x, legacy, True, torch.float32), 0),
             "channel-rms": (lambda x: per_token(x / rms.clamp(min=1e-30), top) * rms, 0),
             "channel": (lambda x: as_stored(x, shipped, True, torch.float32, (centre, scale)), 0),
             "outliers-fp16": (kept_outliers, lambda width: 2 * int(outliers.sum()))}
    if bits == 8:
        codes["fp8"] = (lambda x: as_stored(x, encoding("fp8"), True, torch.float32), 0)
    else:
        codes["group32"] = (lambda x: _grouped((x - centre) / scale, 32, top) * scale + centre,
                            lambda width: 2 * (width // 32) - 4)
        codes["nf4"] = (lambda x: _nf4((x - centre) / scale) * scale + centre, 0)
    return codes


def _grouped(x: torch.Tensor, group: int, top: int) -> torch.Tensor:
    groups = x.unflatten(-1, (-1, group))
    scale = (groups.abs().amax(-1, keepdim=True) / top).half().float().clamp(min=1e-30)
    return ((groups / scale).round().clamp(-top, top) * scale).flatten(-2)


def _nf4(x: torch.Tensor) -> torch.Tensor:
    peak = x.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    levels = NF4.to(x.device)
    return levels[((x / peak).unsqueeze(-1) - levels).abs().argmin(-1)] * peak


def map_codes(bits: int) -> dict:
    """Name -> (round trip of map rows, extra bytes per row beyond one code per value and a float32 scale)."""
    top, range_bits = (255 if bits == 8 else 15), LOG_RANGE[bits]

    def log_fixed(a):
        peak = a.amax(-1, keepdim=True).clamp(min=1e-30)
        step = range_bits * math.log(2) / (top - 1)
        code = (top + torch.log(a.clamp(min=1e-38) / peak) / step).round()
        return torch.where(code >= 1, peak * torch.exp((code.clamp(max=top) - top) * step), 0.0)

    codes = {"linear": (lambda a: as_stored(a, encoding(f"int{bits}-legacy"), False, torch.float32), 0),
             "log-fixed": (log_fixed, 0),
             "log": (lambda a: as_stored(a, encoding(f"int{bits}"), False, torch.float32), 0)}
    if bits == 8:
        codes["fp8"] = (lambda a: as_stored(a, encoding("fp8"), False, torch.float32), 0)
    return codes


def b16_bytes(bits: int, token_extra: int, map_extra: int) -> int:
    """Bytes of one ViT-B/16 view with codes of `bits` and a float32 scale per token and per map row,
    plus the extra bytes per token and per row, and the float16 embeddings."""
    tokens, rows = BLOCKS * FRAMES * B16["tokens"], BLOCKS * 2 * (FRAMES - 1) * B16["patches"]
    return (tokens * (B16["width"] * bits // 8 + 4 + token_extra) + rows * (B16["patches"] * bits // 8 + 4 + map_extra)
            + FRAMES * 512 * 2)


def fp16_bytes() -> int:
    """Bytes of one ViT-B/16 view in float16."""
    return 2 * (BLOCKS * FRAMES * B16["tokens"] * B16["width"] + BLOCKS * 2 * (FRAMES - 1) * B16["patches"] ** 2
                + FRAMES * 512)


def measure(name: str, tokens: list[torch.Tensor], maps: list[torch.Tensor], calibration: int) -> None:
    """Print each alternative's errors on the clips after the first `calibration` ones, tokens then maps,
    each with the bytes of a ViT-B/16 view that stores it (and the other part as int8/int4 do)."""
    print(f"\n{name}: {tokens[0].shape[0] - calibration} clips measured, {calibration} calibrate; "
          f"{tokens[0].shape[-1]} channels, {maps[0].shape[-1]} patches")
    print(f"  {'bits':>4} {'tokens':<14} {'median':>8} {'p99':>8} {'outliers':>8} {'B/16 x fp16':>12}")
    for bits in (8, 4):
        for code, (round_trip, extra) in token_codes(bits, torch.cat([t[:calibration] for t in tokens])).items():
            errors = [token_errors(round_trip(t[calibration:]), t[calibration:]) for t in tokens]
            outliers = [e["outliers"] for e in errors if e["outliers"] is not None]
            extra = extra(B16["width"]) if callable(extra) else extra
            print(f"  {bits:>4} {code:<14} {max(e['median'] for e in errors):>8.4f} "
                  f"{max(e['p99'] for e in errors):>8.4f} {f'{max(outliers):.4f}' if outliers else '-':>8} "
                  f"{b16_bytes(bits, extra, 0) / fp16_bytes():>12.3f}")
    print(f"  {'bits':>4} {'maps':<14} {'L1 mean':>8} {'L1 p99':>8} {'':>8} {'B/16 x fp16':>12}")
    for bits in (8, 4):
        for code, (round_trip, extra) in map_codes(bits).items():
            errors = [map_errors(round_trip(m[calibration:]), m[calibration:]) for m in maps]
            print(f"  {bits:>4} {code:<14} {max(e['l1_mean'] for e in errors):>8.4f} "
                  f"{max(e['l1_p99'] for e in errors):>8.4f} {'':>8} {b16_bytes(bits, 0, extra) / fp16_bytes():>12.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=32, help="clips measured per EVL-Small tower")
    parser.add_argument("--calibration", type=int, default=8, help="clips before them that fit the calibration")
    parser.add_argument("--b16-clips", type=int, default=8, help="clips of the ViT-B/16 outlier tower (half "
                                                                 "calibrate, half are measured; 0: none)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    print(machine_line())
    for name, pretrained in (("EVL-Small plain", "none"), ("EVL-Small outliers", "none+outliers")):
        measure(name, *features("EVL-Small", pretrained, args.calibration + args.clips), args.calibration)
    if args.b16_clips:
        half = args.b16_clips // 2
        measure("ViT-B/16 outliers", *features("ViT-B-16", "none+outliers", args.b16_clips), half)
    print(f"time: {time.perf_counter() - started:.0f} s; {load_line()}")


if __name__ == "__main__":
    main()
