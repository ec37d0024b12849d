"""Embeddings shared by the score networks: noise label, class label, 2-D patch positions.

The noise label is whatever scalar per sample the framework conditions on: 1000 * t
(0..1000), a DDPM step index (0..999) or EDM's c_noise = log(sigma) / 4 (about -1.6..1.1).
A sinusoidal embedding whose frequencies run from 1 down to 1 / max_positions resolves
both ranges (Karras et al. 2022 use it for c_noise unchanged), so no rescaling is needed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_pl.utils.errors import UserValueError

__all__ = [
    "PositionalEmbedding",
    "FourierEmbedding",
    "ClassEmbedding",
    "noise_embedding",
    "embedding_mlp",
    "sincos_2d",
    "batch_noise_label",
]


def batch_noise_label(noise_label: Tensor, batch_size: int) -> Tensor:
    """(B,) float32 noise labels; a 0-d label (one noise level for the batch) is broadcast."""
    # float32 even when x is bf16: 1000 * t in bf16 keeps only ~3 significant digits.
    return noise_label.to(torch.float32).reshape(-1).expand(batch_size)


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar (Vaswani et al. 2017, Sec. 3.5; DDPM, Ho et al. 2020)."""

    def __init__(self, num_channels: int, max_positions: float = 10000.0, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be a positive even number, got {num_channels}.")
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, noise_label: Tensor) -> Tensor:
        # noise_label: (B,) -> (B, num_channels), float32
        half = self.num_channels // 2
        # endpoint=True makes the last frequency exactly 1 / max_positions (DDPM, EDM's
        # DDPM++); endpoint=False stops one step short (Transformer, ADM, DiT).
        exponent = torch.arange(half, dtype=torch.float32, device=noise_label.device)
        exponent = exponent / (half - (1 if self.endpoint and half > 1 else 0))
        # Computed here rather than stored: net.to(bfloat16) would round a buffer by up to
        # 0.2%, which at a noise label of 1000 is up to 2 radians of phase.
        freqs = (1.0 / self.max_positions) ** exponent
        angle = noise_label.to(torch.float32)[:, None] * freqs[None, :]
        return torch.cat([angle.cos(), angle.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a scalar (Tancik et al. 2020; NCSN++, Song et al. 2021)."""

    def __init__(self, num_channels: int, scale: float = 16.0, seed: int = 0) -> None:
        super().__init__()
        if num_channels < 2 or num_channels % 2:
            raise ValueError(f"num_channels must be a positive even number, got {num_channels}.")
        # A fixed seed so two networks built with the same arguments embed identically; a
        # buffer rather than a frozen parameter, so every parameter receives a gradient.
        # (net.to(bfloat16) rounds these random frequencies: still random features, but keep
        # training and sampling in one dtype, or use autocast, which leaves buffers alone.)
        generator = torch.Generator().manual_seed(seed)
        freqs = torch.randn(num_channels // 2, generator=generator, device="cpu") * scale
        self.register_buffer("freqs", freqs.to(torch.get_default_device()))

    def forward(self, noise_label: Tensor) -> Tensor:
        # noise_label: (B,) -> (B, num_channels), float32
        angle = noise_label.to(torch.float32)[:, None] * (2 * math.pi * self.freqs[None, :].to(torch.float32))
        return torch.cat([angle.cos(), angle.sin()], dim=1)


def noise_embedding(
    kind: Literal["positional", "fourier"], num_channels: int, endpoint: bool = True, fourier_scale: float = 16.0
) -> nn.Module:
    """Sinusoidal (DDPM/ADM) or random Fourier (NCSN++) embedding of the noise label."""
    if kind == "positional":
        return PositionalEmbedding(num_channels, endpoint=endpoint)
    if kind == "fourier":
        return FourierEmbedding(num_channels, scale=fourier_scale)
    raise ValueError(f"embedding must be 'positional' or 'fourier', got {kind!r}.")


def embedding_mlp(in_features: int, out_features: int) -> nn.Sequential:
    """Linear-SiLU-Linear map from a raw embedding to the conditioning vector (DDPM, DiT)."""
    return nn.Sequential(nn.Linear(in_features, out_features), nn.SiLU(), nn.Linear(out_features, out_features))


class ClassEmbedding(nn.Module):
    """Class-label table with one extra "null" row for classifier-free guidance (Ho & Salimans 2022).

    null_row=False gives a plain num_classes-row table (ADM's nn.Embedding, openai/guided-diffusion
    guided_diffusion/unet.py:478); then `null_label` is None and labels are required.
    """

    def __init__(self, num_classes: int, num_channels: int, null_row: bool = True) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes}.")
        self.num_classes = num_classes
        self.null_label = num_classes if null_row else None
        self.table = nn.Embedding(num_classes + (1 if null_row else 0), num_channels)

    def forward(self, class_labels: Tensor | None, batch_size: int) -> Tensor:
        # class_labels: (B,) int64 in [0, num_classes] or None -> (B, num_channels)
        if class_labels is None and self.null_label is None:
            raise UserValueError(f"class_labels is None, but this {self.num_classes}-class embedding has no null "
                                 "label: expected (B,) labels in [0, num_classes)")
        if class_labels is None:
            # Index num_classes is the null label: the unconditional model of CFG.
            device = self.table.weight.device
            class_labels = torch.full((batch_size,), self.num_classes, dtype=torch.long, device=device)
        return self.table(class_labels.reshape(-1).long())


def sincos_2d(num_channels: int, grid_size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, num_channels) (MAE, He et al. 2022; DiT)."""
    if num_channels % 4:
        raise ValueError(f"hidden_size must be divisible by 4 for the 2-D sin-cos embedding, got {num_channels}.")
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_h, grid_w = torch.meshgrid(coords, coords, indexing="ij")
    # Each axis gets half the channels; frequencies 1 / 10000^(2i/d) as in the Transformer.
    omega = 1.0 / 10000 ** (torch.arange(num_channels // 4, dtype=torch.float64) / (num_channels / 4))

    def axis(pos: Tensor) -> Tensor:
        angle = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    # Width coordinate first, then height, matching DiT's get_2d_sincos_pos_embed.
    return torch.cat([axis(grid_w), axis(grid_h)], dim=1).to(torch.float32)

