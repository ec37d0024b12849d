"""Building blocks and weight initialisations of the U-Net in `diffusion_pl.networks.unet`.

Each block cites the reference implementation it reproduces:
DDPM (hojonathanho/diffusion diffusion_tf/models/unet.py, nn.py), ADM (openai/guided-diffusion
guided_diffusion/unet.py, nn.py) and EDM's DDPM++ (NVlabs/edm training/networks.py).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from diffusion_pl.networks.fir import FIRResample

__all__ = ["group_norm", "Resample", "ConvResample", "SpatialAttention", "ResBlock", "SwapHalves", "init_unet"]


def group_norm(channels: int, eps: float = 1e-6, groups: int | None = None) -> nn.GroupNorm:
    """GroupNorm with `groups` groups; None: 32, fewer for narrow layers so each group keeps >= 4 channels (EDM).

    eps: 1e-6 in DDPM (tf.contrib group_norm's default) and EDM's SongUNet (networks.py:263);
    1e-5 in ADM (torch's default in GroupNorm32, guided_diffusion/nn.py:17, 100).
    groups: one count for every layer, as diffusers' UNet2DModel `norm_num_groups` (models/unets/unet_2d.py);
    it must divide `channels`.
    """
    if groups is None:
        groups = min(32, max(1, channels // 4))
        while channels % groups:
            groups -= 1
    elif channels % groups:
        raise ValueError(f"norm_groups={groups} does not divide a GroupNorm of {channels} channels: expected a "
                         "divisor of every block's channels (and of each decoder block's input, skip included).")
    return nn.GroupNorm(groups, channels, eps=eps)


class SwapHalves(nn.Module):
    """Swaps the two halves of an embedding: [cos, sin] -> [sin, cos] (EDM networks.py:323)."""

    def forward(self, emb: Tensor) -> Tensor:
        # emb: (B, 2K) -> (B, 2K)
        return torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)


class Resample(nn.Module):
    """Parameter-free 2x resampling: nearest-neighbour up, 2x2 average-pool down (ADM, EDM's [1,1] filter)."""

    def __init__(self, mode: Literal["none", "up", "down"]) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.mode == "down":
            return F.avg_pool2d(x, kernel_size=2)
        return x


class ConvResample(nn.Module):
    """DDPM's resampling: strided 3x3 conv down, nearest up then 3x3 conv (Ho et al. 2020).

    padding="same" is TensorFlow's 'SAME' for a stride-2 3x3 conv on even sizes: one row and
    column of zeros at the bottom and right only (diffusion_tf/nn.py:76, 83; diffusers'
    Downsample2D with padding=0 pads (0, 1, 0, 1)); "symmetric" pads 1 on every side (ADM's
    Downsample, guided_diffusion/unet.py:131-133).
    """

    def __init__(self, channels: int, mode: Literal["up", "down"],
                 padding: Literal["symmetric", "same"] = "symmetric") -> None:
        super().__init__()
        if padding not in ("symmetric", "same"):
            raise ValueError(f"downsample_padding must be 'symmetric' or 'same', got {padding!r}.")
        self.up = Resample("up") if mode == "up" else nn.Identity()
        self.pad = (0, 1, 0, 1) if mode == "down" and padding == "same" else None
        stride = 2 if mode == "down" else 1
        self.conv = nn.Conv2d(channels, channels, 3, stride=stride, padding=0 if self.pad else 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, C, 2H, 2W) or (B, C, H/2, W/2); emb unused (same call as ResBlock)
        x = self.up(x)
        if self.pad is not None:
            x = F.pad(x, self.pad)  # (B, C, H + 1, W + 1)
        return self.conv(x)


class SpatialAttention(nn.Module):
    """Self-attention over all pixels (Ho et al. 2020, App. B) using timm's fused Attention.

    timm's qkv rows are [q; k; v], each split into heads: DDPM's separate q, k, v layers
    (diffusion_tf/models/unet.py:70-72) concatenate into it; ADM's legacy layout (heads first,
    then q, k, v per head, guided_diffusion/unet.py:347) is a row permutation of it.
    """

    def __init__(self, channels: int, num_heads: int, skip_scale: float, eps: float = 1e-6,
                 groups: int | None = None) -> None:
        super().__init__()
        self.norm = group_norm(channels, eps, groups)
        self.attn = Attention(channels, num_heads=num_heads, qkv_bias=True)
        # Always F.scaled_dot_product_attention; timm would fall back to an explicit softmax
        # only for ONNX export or TIMM_FUSED_ATTN=0, neither of which applies here.
        self.attn.fused_attn = True
        self.attn.proj.zero_init = True  # last layer of the residual branch
        self.skip_scale = skip_scale

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C) tokens
        h = self.attn(h)  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return (x + h) * self.skip_scale


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding, optionally resampling (BigGAN, Brock et al. 2019) and attending.

    DDPM resnet_block (diffusion_tf/models/unet.py:37-63), ADM ResBlock (guided_diffusion/unet.py:
    236-256) and EDM UNetBlock (training/networks.py:166-187) all compute
    skip(x) + conv1(dropout(silu(norm1(conv0(silu(norm0(x))), emb)))), attention after the sum.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        dropout: float,
        skip_scale: float,
        scale_shift: bool,
        resample: Literal["none", "up", "down"] = "none",
        resample_proj: bool = True,
        attn_heads: int = 0,
        resample_filter: tuple[int, ...] = (1, 1),
        eps: float = 1e-6,
        groups: int | None = None,
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.skip_scale = skip_scale
        # (1, 1) is the box filter: nearest up / 2x2 average down; longer taps are NCSN++'s FIR.
        box = tuple(resample_filter) == (1, 1)
        self.resample = Resample(resample) if box else FIRResample(resample, resample_filter)
        self.norm0 = group_norm(in_channels, eps, groups)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # The embedding enters as a per-channel bias (DDPM) or as a scale and shift of the
        # normalised features (ADM's AdaGN, Dhariwal & Nichol 2021, Sec. 3).
        self.affine = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.norm1 = group_norm(out_channels, eps, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv1.zero_init = True  # last layer of the residual branch
        project = in_channels != out_channels or (resample != "none" and resample_proj)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if project else nn.Identity()
        self.attn = SpatialAttention(out_channels, attn_heads, skip_scale, eps, groups) if attn_heads else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: (B, C_in, H, W), emb: (B, E) -> (B, C_out, H', W') with H' = 2H, H/2 or H
        h = self.conv0(self.resample(F.silu(self.norm0(x))))  # (B, C_out, H', W')
        params = self.affine(emb)[:, :, None, None].to(h.dtype)  # (B, C_out or 2 C_out, 1, 1)
        if self.scale_shift:
            scale, shift = params.chunk(2, dim=1)
            h = self.norm1(h) * (1 + scale) + shift
        else:
            h = self.norm1(h + params)
        h = self.conv1(self.dropout(F.silu(h)))  # (B, C_out, H', W')
        # skip_scale = 1/sqrt(2) keeps the variance of the sum at that of one branch (NCSN++/DDPM++).
        x = (self.skip(self.resample(x)) + h) * self.skip_scale
        return self.attn(x)


INIT_SCHEMES = ("ddpm", "score_sde", "edm", "adm")


@torch.no_grad()
def init_unet(net: nn.Module, scheme: Literal["ddpm", "score_sde", "edm", "adm"]) -> None:
    """Initialise a U-Net's weights as one of the reference codes does.

    Layers marked `zero_init` (last conv of each residual branch, attention output, output conv)
    start at zero in "ddpm" and "adm", so the network starts at F = 0:

    - "ddpm": xavier-uniform weights, zero biases (DDPM's variance_scaling(1, fan_avg, uniform),
      diffusion_tf/nn.py:10-11); attention q, k, v each as its own C x C layer (models/unet.py:70-72).
      DDPM's init_scale=0 layers are variance_scaling(1e-10), i.e. 1e-5 x xavier, a stand-in for 0
      in TensorFlow (nn.py:11): here exact zeros.
    - "score_sde": as "ddpm", with score_sde's attention q, k, v at variance scale 0.1 (each a C x C
      `NIN` with init_scale=0.1: yang-song/score_sde_pytorch models/layerspp.py AttnBlockpp,
      models/layers.py NIN and default_init), the init of its DDPM++ and NCSN++.
    - "edm": EDM's SongUNet (training/networks.py:259-261): xavier-uniform, zero biases; fused qkv
      xavier x sqrt(0.2) (init_attn); zero_init layers xavier x 1e-5 (init_zero); class embedding as
      EDM's map_label, Linear(one_hot * sqrt(L)) with zero bias (networks.py:270, 328).
    - "adm": PyTorch's default init of every layer (guided-diffusion builds plain nn.Conv/Linear/
      Embedding), zero_init layers zeroed (zero_module, guided_diffusion/nn.py:68-74, unet.py:210,
      294, 615); augmentation map zero (EDM's DhariwalUNet, networks.py:397).
    """
    if scheme not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {', '.join(map(repr, INIT_SCHEMES))}, got {scheme!r}.")
    for module in net.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "adm":
            module.reset_parameters()
        else:
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        if getattr(module, "zero_init", False):
            if scheme == "edm":
                module.weight.mul_(1e-5)
            else:
                nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
    for module in net.modules():
        if isinstance(module, SpatialAttention):
            qkv = module.attn.qkv.weight  # (3C, C)
            if scheme in ("ddpm", "score_sde"):
                gain = math.sqrt(0.1) if scheme == "score_sde" else 1.0  # variance scale 0.1: sqrt in the bound
                for w in qkv.chunk(3, dim=0):  # three C x C layers: fan_in = fan_out = C
                    nn.init.xavier_uniform_(w, gain=gain)
            elif scheme == "edm":
                qkv.mul_(math.sqrt(0.2))
    if net.map_label is not None:
        table = net.map_label.table
        if scheme == "edm":
            # Row k = sqrt(L) W[:, k] + b with W (C, L) xavier and b = 0; the null label is EDM's
            # all-zero label vector, whose embedding is the bias.
            rows, C = table.weight.shape
            L = net.num_classes
            bound = math.sqrt(6.0 / (L + C))
            table.weight[:L].uniform_(-bound, bound).mul_(math.sqrt(L))
            table.weight[L:].zero_()
        else:
            table.reset_parameters()  # N(0, 1), ADM's nn.Embedding (guided_diffusion/unet.py:478)
    if net.map_augment is not None and scheme == "adm":
        nn.init.zeros_(net.map_augment.weight)
