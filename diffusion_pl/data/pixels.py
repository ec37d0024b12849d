"""The pixel convention of the whole project: images are float in [-1, 1] inside, uint8 outside."""

from __future__ import annotations

import torch

__all__ = ["to_signed_unit", "to_uint8"]


def to_signed_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]: the one place where pixel values are scaled."""
    return images.to(torch.float32).div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, C, H, W) -> uint8 (B, 3, H, W), rounded and clamped; grey repeated to RGB."""
    # torchmetrics' normalize=True does (x * 255).byte(), which wraps out-of-range values around.
    u8 = ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return u8.expand(-1, 3, -1, -1) if u8.shape[1] == 1 else u8
