"""PooledPixels: a weight-free feature extractor for runs where the InceptionV3 weights cannot be had.

    diffusion-pl evaluate ... --feature_extractor diffusion_pl.evaluation.metrics.pixels.PooledPixels

Features are the images average-pooled to 8 x 8 (192 numbers for RGB, in [-1, 1]); the Frechet distance
in that space compares colour layout and coarse shape, nothing finer. It is not FID and not comparable
with any published number: a smoke test of the evaluation path (and of trends within one run, such as
the post-hoc EMA sweep) on machines without network access. Reports name the extractor.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.data.pixels import to_signed_unit

__all__ = ["PooledPixels"]


class PooledPixels(nn.Module):
    """uint8 images (B, 3, H, W) -> (B, 3 * size * size) average-pooled pixels in [-1, 1] (no logits: no IS)."""

    def __init__(self, size: int = 8) -> None:
        super().__init__()
        self.size = size
        self.fingerprint = f"{__name__}.PooledPixels(size={size})"  # the reference-statistics cache key

    def forward(self, images: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(to_signed_unit(images), self.size).flatten(1)
