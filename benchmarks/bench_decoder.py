"""How much faster does `EVLModel` train than the authors' decoder, and which lever gives what?

ViT-B/16 shapes (C=768, 14x14 grid, L=197, T=8, 4 layers, 12 heads, 400 classes), training step =
forward + cross-entropy + backward, on identical inputs and identical weights. Three decoders:

- baseline (authors' way): temporal cross-attention maps computed inside the decoder from the
  backbone's q and k [B, T, L, H, D], and every one of the T*L tokens projected through W_k and W_v;
- baseline + precomputed maps: the same decoder reading cached maps (the first lever);
- ours (`EVLModel`): cached maps, single-query attention and the row-window relative-position mix.

Run: python benchmarks/bench_decoder.py [--batch 4] [--iters 4]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import OtherLoad, print_result  # noqa: E402

from evl_cache.decoder.model import DecoderConfig, EVLModel, LayerNorm, QuickGELU  # noqa: E402

WIDTH, GRID, FRAMES, LAYERS, HEADS, CLASSES = 768, (14, 14), 8, 4, 12, 400
BACKBONE_HEADS = 12


def adjacent_maps(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """Section 2: mean over heads of softmax(q_t . k_{t-/+1} / sqrt(D)), patch tokens only.

    q, k: [B, T, L, H, D] -> A_prev [B, T-1, P, P] (frames 1..T-1), A_next [B, T-1, P, P] (frames 0..T-2).
    """
    q, k = q[:, :, 1:], k[:, :, 1:]
    scale = q.shape[-1] ** -0.5

    def half(queries: Tensor, keys: Tensor) -> Tensor:
        logits = torch.einsum("ntqhd,ntkhd->ntqkh", queries * scale, keys)
        return logits.softmax(dim=-2).mean(dim=-1)

    return half(q[:, 1:], k[:, :-1]), half(q[:, :-1], k[:, 1:])


# ------------------------------------------------------------------------------------------------
# Baseline: the authors' decoder, re-implemented the way their release computes it. Same parameter
# names as EVLModel, so one state dict drives both.

class BaselineAttention(nn.Module):
    """Multi-head attention that projects every key and value token, as the authors' decoder does."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        n, lq, c = q.shape
        lk, h = k.shape[1], self.heads
        q = self.q_proj(q).view(n, lq, h, c // h)
        k = self.k_proj(k).view(n, lk, h, c // h)
        v = self.v_proj(v).view(n, lk, h, c // h)
        affinity = torch.einsum("nqhc,nkhc->nqkh", q / (c // h) ** 0.5, k).softmax(dim=-2)
        mix = torch.einsum("nqlh,nlhc->nqhc", affinity, v)
        return self.out_proj(mix.flatten(-2))


class BaselineDecoderLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = BaselineAttention(width, heads)
        self.mlp = nn.Sequential()
        self.mlp.add_module("fc1", nn.Linear(width, 4 * width))
        self.mlp.add_module("act", QuickGELU())
        self.mlp.add_module("dropout", nn.Dropout(0.5))
        self.mlp.add_module("fc2", nn.Linear(4 * width, width))
        self.norm1, self.norm2, self.norm3 = LayerNorm(width), LayerNorm(width), LayerNorm(width)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        y_norm = self.norm3(y)
        x = x + self.attn(self.norm1(x), y_norm, y_norm)
        return x + self.mlp(self.norm2(x))


class BaselineCrossAttention(nn.Module):
    """The authors' temporal cross-attention: maps from q and k, table unrolled to [P, P, C] per call."""

    def __init__(self, grid: tuple[int, int], width: int):
        super().__init__()
        h, w = grid
        self.w1 = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), width))
        self.w2 = nn.Parameter(torch.zeros((2 * h - 1) * (2 * w - 1), width))
        rows, cols = torch.arange(h * w) // w, torch.arange(h * w) % w
        index = (rows[:, None] - rows[None, :] + h - 1) * (2 * w - 1) + (cols[:, None] - cols[None, :] + w - 1)
        self.register_buffer("index", index, persistent=False)

    def mix(self, maps: Tensor, table: Tensor) -> Tensor:
        return torch.einsum("ntqk,qkc->ntqc", maps, table[self.index])

    def forward(self, q: Tensor | None, k: Tensor | None, maps_prev: Tensor | None = None,
                maps_next: Tensor | None = None) -> Tensor:
        if maps_prev is None:  # the authors' way: the maps are recomputed in every forward
            maps_prev, maps_next = adjacent_maps(q, k)
        n, t1, p, _ = maps_prev.shape
        out = maps_prev.new_zeros(n, t1 + 1, p + 1, self.w1.shape[1])
        out[:, 1:, 1:] += self.mix(maps_prev, self.w1)
        out[:, :-1, 1:] += self.mix(maps_next, self.w2)
        return out


class BaselineDecoder(nn.Module):
    def __init__(self, grid: tuple[int, int], width: int, frames: int, layers: int, heads: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(width))
        self.decoder_layers = nn.ModuleList(BaselineDecoderLayer(width, heads) for _ in range(layers))
        self.temporal_conv = nn.ModuleList(nn.Conv1d(width, width, 3, padding=1, groups=width)
                                           for _ in range(layers))
        self.temporal_pos_embed = nn.ParameterList(nn.Parameter(torch.zeros(frames, width))
                                                   for _ in range(layers))
        self.cross_attention = nn.ModuleList(BaselineCrossAttention(grid, width) for _ in range(layers))

    def forward(self, block_outputs, qs=None, ks=None, maps_prev=None, maps_next=None) -> Tensor:
        n, t, l, c = block_outputs[0].shape
        x = self.cls_token.view(1, 1, -1).repeat(n, 1, 1)
        for i, layer in enumerate(self.decoder_layers):
            features = block_outputs[i]
            by_token = features.permute(0, 2, 3, 1).contiguous().flatten(0, 1)  # N*L, C, T
            conv = self.temporal_conv[i](by_token).view(n, l, c, t).permute(0, 3, 1, 2).contiguous()
            features = features + conv + self.temporal_pos_embed[i].view(1, t, 1, c)
            if maps_prev is None:
                features = features + self.cross_attention[i](qs[i], ks[i])
            else:
                features = features + self.cross_attention[i](None, None, maps_prev[i], maps_next[i])
            x = layer(x, features.flatten(1, 2))
        return x


class BaselineModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.decoder = BaselineDecoder(GRID, WIDTH, FRAMES, LAYERS, HEADS)
        self.proj = nn.Sequential(LayerNorm(WIDTH), nn.Dropout(0.5), nn.Linear(WIDTH, CLASSES))

    def forward(self, block_outputs, qs=None, ks=None, maps_prev=None, maps_next=None) -> Tensor:
        return self.proj(self.decoder(block_outputs, qs, ks, maps_prev, maps_next)[:, 0])


# ------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="clips per step")
    parser.add_argument("--iters", type=int, default=4, help="timed steps per decoder, interleaved (after 1 warm-up)")
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"shapes: B={args.batch} T={FRAMES} L={1 + GRID[0] * GRID[1]} C={WIDTH} layers={LAYERS} "
          f"heads={HEADS} classes={CLASSES}")

    torch.manual_seed(0)
    ours = EVLModel(DecoderConfig(width=WIDTH, grid=GRID, frames=FRAMES, num_classes=CLASSES,
                                  layers=LAYERS, heads=HEADS))
    with torch.no_grad():  # zero-initialised parts made nonzero, so the comparison covers them
        for name, parameter in ours.named_parameters():
            if "temporal_pos_embed" in name or "cross_attention" in name:
                parameter.normal_(0.0, 0.02)
    baseline = BaselineModel()
    baseline.load_state_dict(ours.state_dict())

    b, t, l, h = args.batch, FRAMES, 1 + GRID[0] * GRID[1], BACKBONE_HEADS
    block_outputs = [torch.randn(b, t, l, WIDTH) for _ in range(LAYERS)]
    qs = [torch.randn(b, t, l, h, WIDTH // h) for _ in range(LAYERS)]
    ks = [torch.randn(b, t, l, h, WIDTH // h) for _ in range(LAYERS)]
    maps = [adjacent_maps(q, k) for q, k in zip(qs, ks)]  # what the cache holds
    maps_prev, maps_next = [m[0] for m in maps], [m[1] for m in maps]
    labels = torch.randint(0, CLASSES, (b,))

    baseline_name = "baseline (authors' way: maps from q/k, full K/V)"
    runs = {
        baseline_name: lambda: baseline(block_outputs, qs, ks),
        "baseline + precomputed maps": lambda: baseline(block_outputs, maps_prev=maps_prev, maps_next=maps_next),
        "ours (EVLModel)": lambda: ours(block_outputs, maps_prev, maps_next),
    }
    models = {name: ours if name.startswith("ours") else baseline for name in runs}

    ours.eval(), baseline.eval()
    with torch.no_grad():
        logits = {name: run() for name, run in runs.items()}
    for name, value in logits.items():
        difference = (value - logits[baseline_name]).abs().max().item()
        print(f"max |logits - baseline logits|  {name}: {difference:.2e}")
        if difference > 1e-3:
            raise SystemExit(f"{name} disagrees with the baseline")

    ours.train(), baseline.train()

    def step(name: str) -> float:
        start = time.perf_counter()
        models[name].zero_grad(set_to_none=True)
        F.cross_entropy(runs[name](), labels).backward()
        return time.perf_counter() - start

    for name in runs:
        step(name)  # warm-up
    # Interleaved and judged by the fastest step: other jobs on a shared machine only ever add time.
    seconds = {name: [] for name in runs}
    with OtherLoad() as other:
        for _ in range(args.iters):
            for name in runs:
                seconds[name].append(step(name))
    base = b / min(seconds[baseline_name])
    for name, times in seconds.items():
        best, median = b / min(times), b / statistics.median(times)
        print(f"training clips/s  {name}: {best:.2f} (median step: {median:.2f}), {best / base:.1f}x baseline")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(f"while timing: {other.note()}")
    ours_name = "ours (EVLModel)"
    ratio = min(seconds[baseline_name]) / min(seconds[ours_name])
    print_result("decoder", f"decoder training clips/s, EVLModel vs the authors' decoder (B/16, {FRAMES} frames, "
                 f"{LAYERS} layers, batch {b})", b / min(seconds[ours_name]), base,
                 "clips/s", "ours/baseline", ">= 4x", ratio >= 4, other.share, vars(args),
                 precomputed_maps_only=min(seconds[baseline_name]) / min(seconds["baseline + precomputed maps"]))


if __name__ == "__main__":
    main()
