"""ViFi-CLIP's mixup and cutmix on clips (its loader's CutmixMixupBlending, from X-CLIP), with label smoothing.

Targets are smoothed one-hot vectors (1 - s + s/K on the class, s/K elsewhere). A batch is then either
cut-mixed (probability `switch_prob`): a box whose area is 1 - lam of the frame, lam ~ Beta(cutmix,
cutmix), pasted from another clip of the batch at the same place in every frame, the targets mixed by
the pasted area; or mixed up: lam ~ Beta(mixup, mixup), every frame of a clip blended with the same
lam. An alpha of 0 switches that kind off. Every draw comes from the caller's generator, so a batch's
mix is the same however the run is split or resumed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Blending:
    """How a batch's clips and targets are mixed (alphas of 0: no mixing of that kind)."""
    classes: int
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    switch_prob: float = 0.5

    def targets(self, labels: Tensor) -> Tensor:
        """Smoothed one-hot targets [B, K] of class indices [B]."""
        off = self.label_smoothing / self.classes
        targets = torch.full((len(labels), self.classes), off, device=labels.device)
        return targets.scatter_(1, labels.view(-1, 1), 1 - self.label_smoothing + off)

    def __call__(self, pixels: Tensor, labels: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        """(mixed pixels [B, T, C, H, W], mixed targets [B, K]) of a batch; the input pixels are not changed."""
        targets = self.targets(labels)
        if not (self.mixup or self.cutmix):
            return pixels, targets
        order = torch.from_numpy(rng.permutation(len(labels))).to(labels.device)
        use_cutmix = self.cutmix > 0 and (self.mixup == 0 or rng.random() < self.switch_prob)
        if use_cutmix:
            pixels, lam = cut_mixed(pixels, order, float(rng.beta(self.cutmix, self.cutmix)), rng)
        else:
            lam = float(rng.beta(self.mixup, self.mixup))
            pixels = lam * pixels + (1 - lam) * pixels[order]
        return pixels, lam * targets + (1 - lam) * targets[order]


def cut_box(height: int, width: int, lam: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """X-CLIP's cutmix box (y1, y2, x1, x2): sides sqrt(1 - lam) of the frame's, centred at a uniform
    pixel, clipped to the frame."""
    ratio = np.sqrt(1.0 - lam)
    cut_w, cut_h = int(width * ratio), int(height * ratio)
    cx, cy = int(rng.integers(width)), int(rng.integers(height))
    x1, x2 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    y1, y2 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    return int(y1), int(y2), int(x1), int(x2)


def cut_mixed(pixels: Tensor, order: Tensor, lam: float, rng: np.random.Generator) -> tuple[Tensor, float]:
    """(pixels with `cut_box` pasted from pixels[order] in every frame, the share of each clip's own pixels)."""
    height, width = pixels.shape[-2:]
    y1, y2, x1, x2 = cut_box(height, width, lam, rng)
    mixed = pixels.clone()
    mixed[..., y1:y2, x1:x2] = pixels[order, ..., y1:y2, x1:x2]
    return mixed, 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
