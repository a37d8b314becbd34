"""How a cache stores its feature values: float16 as the backbone gives them, or fewer bytes with a scale.

On a GPU, training from the cache is bound by reading it (about 14 MB per ViT-B/16 8-frame clip view
in float16), so bytes per clip are the main lever. The lossy encodings store one code per value and a
float32 scale per row vector, a token of a block output ([C] values) or a query patch's row of a
temporal map ([P] values, non-negative: maps are probabilities):

- `fp16`: float16 values, no scale (lossless against the backbone's float16 output);
- `int8`: tokens round(x / s) in [-127, 127] with s = max|x| / 127; maps round(x / s) in [0, 255]
  with s = max x / 255 (unsigned: every code is used for the non-negative values);
- `fp8`: float8 e4m3 codes of x / s with s = max|x| / 448 (e4m3's largest value), stored as bytes;
- `int4`: tokens in [-7, 7], maps in [0, 15], two codes per byte (the even index in the low nibble).

The per-frame CLIP embeddings (`embed`, 8 KB per clip) always stay float16. Encoding runs on the
backbone's device at extraction; decoding runs on the training device (`decode`), so a GPU also
receives the smaller codes. A row of zeros has scale 0 and decodes to zeros.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CacheError


@dataclass(frozen=True)
class Encoding:
    """One storage encoding: the stored dtype of tokens and maps, and how they are coded."""
    name: str
    signed_dtype: np.dtype    # stored dtype of token codes
    unsigned_dtype: np.dtype  # stored dtype of map codes
    levels: float             # the code of the largest magnitude (0: values stored as they are)
    per_byte: int = 1         # codes per stored element along the last axis

    @property
    def scaled(self) -> bool:
        return self.name != "fp16"

    def stored_dim(self, dim: int) -> int:
        """Stored elements along the last axis for `dim` values."""
        return -(-dim // self.per_byte)

    def stored_dtype(self, signed: bool) -> np.dtype:
        return self.signed_dtype if signed else self.unsigned_dtype


ENCODINGS = {
    "fp16": Encoding("fp16", np.dtype(np.float16), np.dtype(np.float16), 0),
    "int8": Encoding("int8", np.dtype(np.int8), np.dtype(np.uint8), 127),
    "fp8": Encoding("fp8", np.dtype(np.uint8), np.dtype(np.uint8), 448),
    "int4": Encoding("int4", np.dtype(np.uint8), np.dtype(np.uint8), 7, per_byte=2),
}
_FP8 = getattr(torch, "float8_e4m3fn", None)


def encoding(name: str) -> Encoding:
    """The named encoding; fp8 needs a torch with float8 e4m3."""
    if name not in ENCODINGS:
        raise CacheError(f"unknown storage encoding {name!r}; choose from {', '.join(ENCODINGS)}")
    if name == "fp8" and _FP8 is None:
        raise CacheError(f"--storage fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; "
                         f"use int8 (the same size) or upgrade torch")
    return ENCODINGS[name]


def _levels(enc: Encoding, signed: bool) -> float:
    """The code of the largest magnitude: unsigned integer codes use their sign bit too."""
    if enc.name == "fp8":
        return enc.levels
    return enc.levels if signed else 2 * enc.levels + 1


def encode(values: torch.Tensor, enc: Encoding, signed: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes in the stored dtype, float32 scale per row vector [..., 1 dropped]) of float `values`
    [..., D]; `signed` for tokens, unsigned (non-negative values) for maps."""
    if not enc.scaled:
        return values.to(torch.float16), None
    values = values.float()
    peak = values.abs().amax(-1) if signed else values.clamp(min=0).amax(-1)
    scale = peak / _levels(enc, signed)
    scaled = values / torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
    if enc.name == "fp8":
        return scaled.to(_FP8).view(torch.uint8), scale
    top = _levels(enc, signed)
    codes = scaled.round().clamp(-top if signed else 0, top)
    if enc.per_byte == 1:
        return codes.to(torch.int8 if signed else torch.uint8), scale
    nibbles = (codes + (8 if signed else 0)).to(torch.uint8)  # int4: signed codes offset into 1..15
    if nibbles.shape[-1] % 2:
        nibbles = torch.nn.functional.pad(nibbles, (0, 1), value=8 if signed else 0)
    return nibbles[..., 0::2] | (nibbles[..., 1::2] << 4), scale


def decode(codes: torch.Tensor, scale: torch.Tensor | None, enc: Encoding, signed: bool, dim: int,
           dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The values [..., dim] of `codes` with their `scale`, in `dtype` (on the codes' device).

    Every code is exact in `dtype`, and the in-place product with the float32 scale is formed in float32
    value by value: the same values as a float32 decode rounded to `dtype`, without a float32 copy of
    the batch on a GPU (a CPU's kernels still stage one)."""
    if not enc.scaled:
        return codes.to(dtype)
    if enc.name == "fp8" and codes.device.type == "cpu":  # a table of the 256 codes: faster than the cast here
        values = torch.index_select(_fp8_values(codes.device, dtype), 0, codes.int().flatten()).view(codes.shape)
    elif enc.name == "fp8":
        values = codes.view(_FP8).to(dtype)
    elif enc.per_byte == 1:
        values = codes.to(dtype)
    else:
        nibbles = torch.stack((codes & 15, codes >> 4), dim=-1).flatten(-2)[..., :dim]
        values = nibbles.to(dtype).sub_(8 if signed else 0)
    return values.mul_(scale.float()[..., None])  # `values` is a new tensor in every branch


@functools.lru_cache(maxsize=None)
def _fp8_values(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The value of each float8 e4m3 code 0..255 in `dtype` (NaN for its two NaN codes)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(_FP8).to(dtype)


def as_stored(values: torch.Tensor, enc: Encoding, signed: bool, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """`values` as a cache of encoding `enc` gives them back: encoded, then decoded (what training on
    such a cache saw, for features computed online)."""
    codes, scale = encode(values, enc, signed)
    return decode(codes, scale, enc, signed, values.shape[-1], dtype)
