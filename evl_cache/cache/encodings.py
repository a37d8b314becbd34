"""How a cache stores its feature values: float16 as the backbone gives them, or fewer bytes in codes.

On a GPU, training from the cache is bound by reading it (about 14 MB per ViT-B/16 8-frame clip view
in float16), so bytes per clip are the main lever. The lossy encodings store one code per value, with
a scale per token (a block output's [C] values) or per query patch's row of a temporal map ([P]
probabilities). Trained towers have a few channels far larger than the rest in every token, and maps
whose rows put most of their weight on a few sink patches (towers/statistics.py), so the codes are
made for those (docs/storage.md has the measurements behind the choice):

- `fp16`: float16 values, no scale (lossless against the backbone's float16 output);
- `int8` / `int4` tokens ("channel"): each channel is first centred and scaled by the cache's own
  calibration (its mean and RMS on the first videos extracted, fixed for the whole cache), then coded
  round(x / s) in [-127, 127] / [-7, 7] with s = max|x| / 127 (or 7) per token, float32;
- `int8` / `int4` maps ("log"): code 0 is 0, codes 1..255 (1..15) are the row's max times equal
  ratios down to the row's least value (at least max / 2^24, or 2^12): every entry keeps the same
  relative error, not only the largest; the row's max and log step are stored, float16 [.., 2];
- `fp8`: float8 e4m3 codes of x / s with s = max|x| / 448 per token and per row, stored as bytes (a
  float code: relative precision at every magnitude, no calibration);
- `int4` packs two codes per byte (the even index in the low nibble).

Caches of format versions 1-3 hold `int8`/`int4` codes of an earlier kind ("token" and "linear": no
calibration, maps scaled to the row's max); they are read, and resumed, with those (`LEGACY`). The
per-frame CLIP embeddings (`embed`) always stay float16. Encoding runs on the backbone's device at
extraction; decoding on the training device (`decode`). A row of zeros decodes to zeros.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CacheError

_FP8 = getattr(torch, "float8_e4m3fn", None)
FP8_MAX = 448.0  # e4m3's largest value
LOG_RANGE = {8: 24, 4: 12}  # bits of a log-coded row's range: its least coded entry is at least max / 2^range


@dataclass(frozen=True)
class Encoding:
    """One storage encoding: how tokens and maps are coded (`tokens`: float16, channel, token or fp8;
    `maps`: float16, log, linear or fp8) in `bits` per value. `key` names it in the code (a legacy
    encoding's key differs from its name)."""
    name: str
    tokens: str
    maps: str
    bits: int
    key: str = ""

    @property
    def scaled(self) -> bool:
        return self.bits != 16

    @property
    def per_byte(self) -> int:
        return 2 if self.bits == 4 else 1

    def stored_dim(self, dim: int) -> int:
        """Stored elements along the last axis for `dim` values."""
        return -(-dim // self.per_byte)

    def stored_dtype(self, signed: bool) -> np.dtype:
        """The stored dtype of token codes (`signed`) or map codes."""
        if not self.scaled:
            return np.dtype(np.float16)
        return np.dtype(np.int8 if signed and self.bits == 8 and self.tokens != "fp8" else np.uint8)

    @property
    def signed_dtype(self) -> np.dtype:
        return self.stored_dtype(True)

    def scale_layout(self, signed: bool) -> tuple[tuple[int, ...], np.dtype]:
        """(trailing shape, dtype) of the scales of one token (`signed`) or one map row."""
        if not signed and self.maps == "log":
            return (2,), np.dtype(np.float16)  # the row's max and log step
        return (), np.dtype(np.float32)

    @property
    def calibrated(self) -> bool:
        """Whether its token codes need the cache's per-channel calibration."""
        return self.tokens == "channel"

    def record(self) -> dict:
        """How a cache records it (`storage` attribute, beside `compress`): a lossy encoding with its code
        kinds (which caches of format versions 1-3 did not record)."""
        return {"encoding": self.name, **({"tokens": self.tokens, "maps": self.maps} if self.scaled else {})}

    def levels(self, signed: bool) -> int:
        """The code of the largest value of an integer code: unsigned map codes use their sign bit too."""
        top = 127 if self.bits == 8 else 7
        return top if signed else 2 * top + 1


ENCODINGS = {  # what new caches use, by name
    "fp16": Encoding("fp16", "float16", "float16", 16, "fp16"),
    "int8": Encoding("int8", "channel", "log", 8, "int8"),
    "fp8": Encoding("fp8", "fp8", "fp8", 8, "fp8"),
    "int4": Encoding("int4", "channel", "log", 4, "int4"),
}
LEGACY = {  # what caches of format versions 1-3 hold, read and resumed as they are
    "int8": Encoding("int8", "token", "linear", 8, "int8-legacy"),
    "int4": Encoding("int4", "token", "linear", 4, "int4-legacy"),
}
_BY_KEY = {enc.key: enc for enc in [*ENCODINGS.values(), *LEGACY.values()]}


def encoding(name: str) -> Encoding:
    """The named encoding (a name, or a legacy encoding's key); fp8 needs a torch with float8 e4m3."""
    enc = ENCODINGS.get(name) or _BY_KEY.get(name)
    if enc is None:
        raise CacheError(f"unknown storage encoding {name!r}; choose from {', '.join(ENCODINGS)}")
    if enc.tokens == "fp8" and _FP8 is None:
        raise CacheError(f"--storage fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; "
                         f"use int8 (the same size) or upgrade torch")
    return enc


def stored_encoding(storage: dict) -> Encoding:
    """The encoding a cache's `storage` record describes: one without code kinds predates them (legacy)."""
    name = storage.get("encoding", "fp16")
    if "tokens" not in storage and name in LEGACY:
        return LEGACY[name]
    enc = encoding(name)
    if "tokens" in storage and (storage["tokens"], storage.get("maps")) != (enc.tokens, enc.maps):
        raise CacheError(f"the cache's {name} codes ({storage['tokens']}, {storage.get('maps')}) are not ones "
                         f"this evl-cache knows; upgrade evl-cache")
    return enc


Channels = tuple[torch.Tensor, torch.Tensor]  # a block's calibration: centre and scale per channel, float32 [C]


def encode(values: torch.Tensor, enc: Encoding, signed: bool,
           channels: Channels | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes in the stored dtype, scales: float32 per row, or the log maps' float16 [.., 2]) of float
    `values` [..., D]; `signed` for tokens (whose "channel" codes need the block's `channels`),
    unsigned (non-negative values) for maps."""
    if not enc.scaled:
        return values.to(torch.float16), None
    values = values.float()
    kind = enc.tokens if signed else enc.maps
    if kind == "fp8":
        return _fp8_codes(values)
    if kind == "log":
        codes, scale = _log_codes(values, enc.levels(False), LOG_RANGE[enc.bits])
    else:
        if kind == "channel":
            centre, spread = _channels_on(channels, values.device)
            values = (values - centre) / spread
        codes, scale = _linear_codes(values, enc.levels(signed), signed)
    return _packed(codes, enc, signed), scale


def _linear_codes(values: torch.Tensor, top: int, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """round(x / s), s = the row's max |x| / top (float32 codes, float32 scale per row)."""
    peak = values.abs().amax(-1) if signed else values.clamp(min=0).amax(-1)
    scale = peak / top
    scaled = values / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    return scaled.round().clamp(-top if signed else 0, top), scale


def _log_codes(values: torch.Tensor, top: int, range_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes 1..top of the non-negative rows in equal ratios from the row's least value (at least its max
    / 2^range_bits) to its max, 0 below; the (max, step) per row as float16, used as stored."""
    peak = values.amax(-1)
    floor = torch.maximum(values.amin(-1), peak * 2.0 ** -range_bits)
    step = torch.where(peak > 0, torch.log(peak / floor.clamp(min=torch.finfo(torch.float32).tiny)) / (top - 1), 0)
    rounded = step.to(torch.float16)  # rounded up, so that the codes reach the row's least value
    rounded = torch.where(rounded.float() < step, torch.nextafter(rounded, torch.full_like(rounded, math.inf)), rounded)
    scale = torch.stack((peak.to(torch.float16), rounded), -1)
    peak, step = scale[..., 0].float()[..., None], scale[..., 1].float()[..., None]
    ratio = torch.log(values / torch.where(peak > 0, peak, 1)) / torch.where(step > 0, step, 1)
    codes = torch.where(step > 0, (top + ratio).round(), torch.where(values > 0, top, 0))
    return codes.nan_to_num(0).clamp(0, top), scale


def _fp8_codes(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float8 e4m3 codes of x / s, s = the row's max |x| / 448, as bytes."""
    scale = values.abs().amax(-1) / FP8_MAX
    scaled = values / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    return scaled.to(_FP8).view(torch.uint8), scale


def _packed(codes: torch.Tensor, enc: Encoding, signed: bool) -> torch.Tensor:
    """Integer codes in their stored dtype: int8/uint8, or two 4-bit codes per byte."""
    if enc.per_byte == 1:
        return codes.to(torch.int8 if signed else torch.uint8)
    nibbles = (codes + (8 if signed else 0)).to(torch.uint8)  # int4: signed codes offset into 1..15
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=8 if signed else 0)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)


def decode(codes: torch.Tensor, scale: torch.Tensor | None, enc: Encoding, signed: bool, dim: int,
           dtype: torch.dtype = torch.float16, channels: Channels | None = None) -> torch.Tensor:
    """The values [..., dim] of `codes` with their `scale` (and a "channel" token code's `channels`), in
    `dtype` (on the codes' device).

    On a GPU the values are formed in `dtype`: codes are exact in it, and each in-place step with a
    float32 scale is computed in float32 value by value, with no float32 copy of the batch. On a CPU,
    whose float16 arithmetic is slow, they are formed in float32 and rounded to `dtype` once."""
    if not enc.scaled:
        return codes.to(dtype)
    kind = enc.tokens if signed else enc.maps
    work = torch.float32 if codes.device.type == "cpu" else dtype
    if kind == "fp8":  # a table's values in `dtype`: faster here too
        return _fp8_values(codes, dtype).mul_(scale.float()[..., None])
    values = _unpacked(codes, enc, signed, dim, work)
    if kind == "log":
        peak, step = scale[..., 0].float()[..., None], scale[..., 1].float()[..., None]
        zero = values == 0
        return values.sub_(enc.levels(False)).mul_(step).exp_().mul_(peak).masked_fill_(zero, 0).to(dtype)
    values.mul_(scale.float()[..., None])
    if kind == "channel":
        centre, spread = _channels_on(channels, values.device)
        values.mul_(spread).add_(centre)
    return values.to(dtype)


def _channels_on(channels: Channels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache's calibration (centre, scale) on `device`. The copies do not wait for the device's queued
    work (a blocking copy would, every batch): the calibration is fixed, never written while they run."""
    centre, spread = channels
    return centre.to(device, non_blocking=True), spread.to(device, non_blocking=True)


def _unpacked(codes: torch.Tensor, enc: Encoding, signed: bool, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Integer codes as values in `dtype` (a new tensor)."""
    if enc.per_byte == 1:
        return codes.to(dtype)
    nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)[..., :dim]
    return nibbles.to(dtype).sub_(8 if signed else 0)


def _fp8_values(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8 e4m3 codes as values in `dtype` (a new tensor): through a table on a CPU, faster there."""
    if codes.device.type == "cpu":
        return torch.index_select(_fp8_table(codes.device, dtype), 0, codes.int().flatten()).view(codes.shape)
    return codes.view(_FP8).to(dtype)


@functools.lru_cache(maxsize=None)
def _fp8_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The value of each float8 e4m3 code 0..255 in `dtype` (NaN for its two NaN codes)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(_FP8).to(dtype)


def as_stored(values: torch.Tensor, enc: Encoding, signed: bool, dtype: torch.dtype = torch.float16,
              channels: Channels | None = None) -> torch.Tensor:
    """`values` as a cache of encoding `enc` gives them back: encoded, then decoded (what training on
    such a cache saw, for features computed online)."""
    codes, scale = encode(values, enc, signed, channels)
    return decode(codes, scale, enc, signed, values.shape[-1], dtype, channels)


def log_step_bound(enc: Encoding) -> float:
    """The largest relative error of a log-coded map entry within its row's range: half a step of the
    widest range, exp(range * ln 2 / (2 (top - 1))) - 1 (plus float16's rounding of the stored max)."""
    top = enc.levels(False)
    return math.exp(LOG_RANGE[enc.bits] * math.log(2) / (2 * (top - 1))) - 1
