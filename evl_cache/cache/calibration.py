"""A cache's calibration, and how much an encoding loses on a tower's features.

`int8` and `int4` code each token channel centred and scaled by the cache's calibration
(`encodings`): every channel's mean and RMS over the tokens of the first videos extracted, rounded to
float16 and stored in the cache's `storage` attribute. It is fitted once, before any shard is written,
and reused by every process and every resume, so the whole cache is encoded alike (and `predict`, which
reads it from the run, encodes online features as the cache did).

The same videos measure the chosen encoding's error (`measure_errors`): per channel, the relative RMS
error of its tokens (the median over the ordinary channels, the largest over the outlier channels,
`towers.statistics`), and per map row the L1 error. Each encoding has a bound (`BOUNDS`); `warning` says
in one line when the chosen one is above it, and which encoding would keep it.
"""
from __future__ import annotations

import torch

from ..towers.statistics import outlier_channels
from .encodings import ENCODINGS, Channels, Encoding, as_stored

# (tokens' median per-channel relative RMS error, maps' mean L1 error per row) each encoding should keep
BOUNDS = {"int8": (0.02, 0.01), "fp8": (0.04, 0.04), "int4": (0.15, 0.1)}


def fit_channels(tokens: torch.Tensor) -> Channels:
    """(centre, scale) per channel of one block's tokens [..., C]: mean and RMS about it, float16-rounded
    (as stored), a scale of 0 taken as 1."""
    tokens = tokens.reshape(-1, tokens.shape[-1]).double()
    centre = tokens.mean(0)
    scale = (tokens - centre).pow(2).mean(0).sqrt()
    scale = torch.where(scale.to(torch.float16) > 0, scale, 1.0)
    return centre.to(torch.float16).float(), scale.to(torch.float16).float()


def calibration_record(blocks: dict[int, torch.Tensor], videos: int) -> dict:
    """The `storage.calibration` attribute of a cache from each block's calibration tokens."""
    fitted = {str(b): fit_channels(tokens) for b, tokens in blocks.items()}
    return {"videos": videos, "blocks": {b: {"centre": _numbers(c), "scale": _numbers(s)}
                                         for b, (c, s) in fitted.items()}}


def _numbers(values: torch.Tensor) -> list[float]:
    """float16 values as the shortest decimals that give them back (a small JSON attribute)."""
    return [float(str(v)) for v in values.to(torch.float16).numpy()]


def block_channels(storage: dict, block: int) -> Channels | None:
    """A block's (centre, scale) from a cache's `storage` record, float32; None without calibration."""
    record = storage.get("calibration", {}).get("blocks", {}).get(str(block))
    if record is None:
        return None
    return tuple(torch.tensor(record[key], dtype=torch.float16).float() for key in ("centre", "scale"))


def token_errors(decoded: torch.Tensor, reference: torch.Tensor) -> dict:
    """Per-channel relative RMS error of tokens [..., C]: the median and p99 over the ordinary channels,
    the largest over the outlier channels (RMS above OUTLIER_RATIO x the median channel's)."""
    reference = reference.reshape(-1, reference.shape[-1]).double()
    error = decoded.reshape(reference.shape).double() - reference
    rms = reference.pow(2).mean(0).sqrt()
    relative = error.pow(2).mean(0).sqrt() / torch.where(rms > 0, rms, 1.0)
    outliers = outlier_channels(rms)
    ordinary = relative[~outliers]
    return {"median": float(ordinary.median()), "p99": float(ordinary.quantile(0.99)),
            "outliers": float(relative[outliers].max()) if outliers.any() else None}


def map_errors(decoded: torch.Tensor, reference: torch.Tensor) -> dict:
    """L1 error per map row [..., P]: mean and p99 over the rows."""
    l1 = (decoded.double() - reference.double()).abs().sum(-1).flatten()
    return {"l1_mean": float(l1.mean()), "l1_p99": float(l1.quantile(0.99))}


def measure_errors(enc: Encoding, tokens: dict[int, torch.Tensor], maps: list[torch.Tensor],
                   storage: dict) -> dict:
    """Errors of `enc` (with the cache's calibration in `storage`) on float tokens per block and maps:
    the worst block's token median and p99, map mean and p99 L1."""
    token_rows = [token_errors(as_stored(t, enc, True, torch.float32, block_channels(storage, b)), t)
                  for b, t in tokens.items()]
    map_rows = [map_errors(as_stored(m, enc, False, torch.float32), m) for m in maps]
    return {"tokens_median": max((r["median"] for r in token_rows), default=0.0),
            "tokens_p99": max((r["p99"] for r in token_rows), default=0.0),
            "maps_l1": max((r["l1_mean"] for r in map_rows), default=0.0),
            "maps_l1_p99": max((r["l1_p99"] for r in map_rows), default=0.0)}


def within(name: str, errors: dict, bound_of: str | None = None) -> bool:
    """Whether `errors` keep the bounds of encoding `bound_of` (default: `name`'s own; fp16 always)."""
    tokens, maps = BOUNDS.get(bound_of or name, (float("inf"), float("inf")))
    return errors["tokens_median"] <= tokens and errors["maps_l1"] <= maps


def warning(name: str, errors: dict[str, dict], videos: int) -> str | None:
    """One line when encoding `name`'s errors (measured on `videos` calibration videos; `errors` has
    each encoding's) are above its bounds, naming the fewest-bytes encoding that keeps them; else None."""
    if within(name, errors[name]):
        return None
    tokens, maps = BOUNDS[name]
    keeps = [other for other in sorted(errors, key=lambda o: ENCODINGS[o].bits)
             if other != name and within(other, errors[other], bound_of=name)]
    better = keeps[0] if keeps else "fp16"
    measured = errors[name]
    kept = (f"{better} keeps them at {errors[better]['tokens_median']:.2g} and {errors[better]['maps_l1']:.2g}"
            if better in errors else "fp16 keeps them")
    return (f"--storage {name} loses more than it should on this tower's features: tokens' median per-channel "
            f"error {measured['tokens_median']:.2g} (bound {tokens}), maps' mean L1 per row "
            f"{measured['maps_l1']:.2g} (bound {maps}) on the {videos} calibration videos; {kept} "
            f"(--storage {better})")
