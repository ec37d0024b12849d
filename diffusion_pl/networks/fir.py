"""FIR resampling and NCSN++'s residual input pyramid (Song et al. 2021, App. H; StyleGAN2, Karras et al. 2020).

NCSN++ resamples with a separable low-pass FIR filter instead of nearest-neighbour / box filters,
and adds a progressively downsampled copy of the input to the encoder ("progressive_input =
residual"). Both follow score_sde_pytorch (yang-song/score_sde_pytorch models/up_or_down_sampling.py,
models/layerspp.py) and NVlabs/edm's SongUNet (training/networks.py:61-89, :306-307).

With filter taps k (even length L, symmetric), normalised so that sum(outer(k, k)) = 1:

- 2x down: depthwise 2-D convolution with outer(k, k), stride 2, zero padding (L - 2) / 2 on
  every side (score_sde `downsample_2d`: upfirdn2d with pad ((L-2+1)//2, (L-2)//2), down=2);
- 2x up: zero insertion then convolution with 4 outer(k, k), written as a depthwise transposed
  convolution with stride 2 and padding (L - 2) / 2 (score_sde `upsample_2d`, gain 1).

The taps (1, 1) give exactly nearest-neighbour up and 2x2 average-pool down.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["fir_filter", "FIRResample", "FIRDownConv", "ResidualInput"]


def fir_filter(taps: tuple[int | float, ...]) -> Tensor:
    """The 2-D filter outer(k, k) / sum(k)^2 of separable taps k, float32 (L, L) (score_sde `_setup_kernel`)."""
    taps = tuple(float(v) for v in taps)
    if len(taps) < 2 or len(taps) % 2 or taps != taps[::-1] or sum(taps) <= 0:
        raise ValueError(f"resample_filter must be a symmetric tuple of an even number of taps with a positive "
                         f"sum, e.g. (1, 3, 3, 1), got {taps}.")
    k = torch.tensor(taps, dtype=torch.float64, device="cpu")
    return (torch.outer(k, k) / k.sum() ** 2).to(torch.float32)  # (L, L)


class FIRResample(nn.Module):
    """Parameter-free 2x resampling with a separable FIR filter (StyleGAN2's upfirdn2d, score_sde NCSN++)."""

    def __init__(self, mode: Literal["none", "up", "down"], taps: tuple[int | float, ...] = (1, 3, 3, 1)) -> None:
        super().__init__()
        if mode not in ("none", "up", "down"):
            raise ValueError(f"mode must be 'none', 'up' or 'down', got {mode!r}.")
        self.mode = mode
        f = fir_filter(taps)
        self.pad = (f.shape[-1] - 2) // 2
        # Not persistent: the filter is a constant of the architecture, so state dicts stay free of it.
        self.register_buffer("filter", f[None, None].to(torch.get_default_device()), persistent=False)  # (1, 1, L, L)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, C, 2H, 2W), (B, C, H/2, W/2) or unchanged
        if self.mode == "none":
            return x
        C = x.shape[1]
        f = self.filter.to(x.dtype)
        if self.mode == "up":
            # 4 f keeps a constant image constant (gain 1 after inserting 3 zeros per pixel).
            return F.conv_transpose2d(x, (4 * f).expand(C, 1, -1, -1), stride=2, padding=self.pad, groups=C)
        return F.conv2d(x, f.expand(C, 1, -1, -1), stride=2, padding=self.pad, groups=C)


class FIRDownConv(nn.Module):
    """3x3 convolution fused with FIR 2x downsampling (score_sde `conv_downsample_2d`, StyleGAN2).

    Pads the input by L / 2 on every side, filters it with outer(k, k) at full resolution, then
    applies the 3x3 convolution with stride 2: (B, C_in, H, W) -> (B, C_out, H/2, W/2). The same
    map as EDM's `Conv2d(kernel=3, down=True, fused_resample=True)`, which convolves first.
    """

    def __init__(self, in_channels: int, out_channels: int, taps: tuple[int | float, ...] = (1, 3, 3, 1)) -> None:
        super().__init__()
        f = fir_filter(taps)
        self.pad = f.shape[-1] // 2  # p = (L - 2) + (3 - 1) = L in score_sde, split evenly
        self.register_buffer("filter", f[None, None].to(torch.get_default_device()), persistent=False)  # (1, 1, L, L)
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C_in, H, W) -> (B, C_out, H/2, W/2)
        C = x.shape[1]
        h = F.conv2d(x, self.filter.to(x.dtype).expand(C, 1, -1, -1), padding=self.pad, groups=C)  # (B, C_in, H+1, W+1)
        return self.conv(h)


class ResidualInput(nn.Module):
    """One level of NCSN++'s residual input pyramid (score_sde models/ncsnpp.py:294-301, progressive_input='residual').

    After each encoder downsampling, the previous pyramid level `aux` is downsampled by a fused
    FIR 3x3 convolution and added to the features: h <- (h + conv_down(aux)) * skip_scale; the
    sum is both the next pyramid level and the encoder's features (and skip connection).
    """

    def __init__(self, in_channels: int, out_channels: int, taps: tuple[int | float, ...], skip_scale: float) -> None:
        super().__init__()
        self.down = FIRDownConv(in_channels, out_channels, taps)
        self.skip_scale = skip_scale

    def forward(self, aux: Tensor, h: Tensor) -> Tensor:
        # aux: (B, C_aux, 2H, 2W) previous pyramid level, h: (B, C, H, W) -> (B, C, H, W)
        return (h + self.down(aux)) * self.skip_scale
