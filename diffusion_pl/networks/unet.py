"""U-Net score network: DDPM (Ho et al. 2020), DDPM++ (Song et al. 2021; Karras et al. 2022) and
ADM (Dhariwal & Nichol 2021).

One implementation; the three published families differ only in the options below:

| option              | DDPM          | DDPM++ (EDM)   | ADM           |
|---------------------|---------------|----------------|---------------|
| resample            | conv          | resblock       | resblock      |
| resample_proj       | -             | True           | False         |
| scale_shift         | False         | False          | True          |
| skip_rescale        | False         | True           | False         |
| decoder_attention   | every_block   | last_block     | every_block   |
| attention heads     | 1             | 1              | 64 ch / head  |
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import Attention
from torch import Tensor, nn

from diffusion_pl.networks.embeddings import (ClassEmbedding, batch_noise_label, data_shape, embedding_mlp,
                                              noise_embedding)

__all__ = ["UNet", "unet_ddpm_cifar10", "unet_ddpmpp_cifar10", "unet_adm_cifar10", "unet_tiny"]


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, fewer for narrow layers so each group keeps >= 4 channels (EDM)."""
    groups = min(32, max(1, channels // 4))
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels, eps=1e-6)


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
    """DDPM's resampling: strided 3x3 conv down, nearest up then 3x3 conv (Ho et al. 2020)."""

    def __init__(self, channels: int, mode: Literal["up", "down"]) -> None:
        super().__init__()
        self.up = Resample("up") if mode == "up" else nn.Identity()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if mode == "down" else 1, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # x: (B, C, H, W) -> (B, C, 2H, 2W) or (B, C, H/2, W/2); emb unused (same call as ResBlock)
        return self.conv(self.up(x))


class SpatialAttention(nn.Module):
    """Self-attention over all pixels (Ho et al. 2020, App. B) using timm's fused Attention."""

    def __init__(self, channels: int, num_heads: int, skip_scale: float) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, num_heads=num_heads, qkv_bias=True)
        # Always F.scaled_dot_product_attention; timm would fall back to an explicit softmax
        # only for ONNX export or TIMM_FUSED_ATTN=0, neither of which applies here.
        self.attn.fused_attn = True
        self.skip_scale = skip_scale

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C) tokens
        h = self.attn(h)  # (B, H*W, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return (x + h) * self.skip_scale


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding, optionally resampling (BigGAN, Brock et al. 2019) and attending."""

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
    ) -> None:
        super().__init__()
        self.scale_shift = scale_shift
        self.skip_scale = skip_scale
        self.resample = Resample(resample)
        self.norm0 = group_norm(in_channels)
        self.conv0 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        # The embedding enters as a per-channel bias (DDPM) or as a scale and shift of the
        # normalised features (ADM's AdaGN, Dhariwal & Nichol 2021, Sec. 3).
        self.affine = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        project = in_channels != out_channels or (resample != "none" and resample_proj)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if project else nn.Identity()
        self.attn = SpatialAttention(out_channels, attn_heads, skip_scale) if attn_heads else nn.Identity()

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


class UNet(nn.Module):
    """U-Net score network with the options of DDPM, DDPM++ and ADM (see the module table).

    Args:
        img_resolution: input height and width (required; `diffusion-pl fit` fills it from the data when
            a recipe leaves it out).
        in_channels: image channels; None: 3, or the data's channels under `diffusion-pl fit`.
        out_channels: output channels; None means in_channels.
        num_classes: None for unconditional; else labels 0..num_classes-1 plus the null label num_classes.
        model_channels: channels at the first resolution (and of the noise embedding).
        channel_mult: per-resolution channel multipliers; len - 1 halvings of the resolution.
        num_res_blocks: residual blocks per resolution in the encoder (decoder has one more).
        attn_resolutions: resolutions with self-attention (the lowest always has it, in the middle).
        attn_heads: attention heads, used when attn_head_channels is None.
        attn_head_channels: channels per head (ADM uses 64); overrides attn_heads.
        dropout: dropout before the second convolution of each residual block.
        resample: strided/upsampling convolutions (DDPM) or BigGAN-style resampling residual blocks.
        resample_proj: 1x1 convolution on the skip path of resampling residual blocks (DDPM++).
        scale_shift: adaptive GroupNorm, embedding gives scale and shift (ADM); else an added bias.
        skip_rescale: multiply every residual sum by 1/sqrt(2) (DDPM++).
        decoder_attention: attention after every decoder block or only the last of each resolution.
        embedding: sinusoidal positional (DDPM, DDPM++, ADM) or random Fourier (NCSN++) noise embedding.
        fourier_scale: standard deviation of the Fourier frequencies.
        emb_mult: conditioning-vector width as a multiple of model_channels.
    """

    def __init__(
        self,
        img_resolution: int | None = None,
        in_channels: int | None = None,
        out_channels: int | None = None,
        num_classes: int | None = None,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        attn_heads: int = 1,
        attn_head_channels: int | None = None,
        dropout: float = 0.1,
        resample: Literal["conv", "resblock"] = "conv",
        resample_proj: bool = True,
        scale_shift: bool = False,
        skip_rescale: bool = False,
        decoder_attention: Literal["every_block", "last_block"] = "every_block",
        embedding: Literal["positional", "fourier"] = "positional",
        fourier_scale: float = 16.0,
        emb_mult: int = 4,
    ) -> None:
        super().__init__()
        img_resolution, in_channels = data_shape("UNet", img_resolution, in_channels)
        levels = len(channel_mult)
        resolutions = tuple(img_resolution >> level for level in range(levels))
        _check_args(img_resolution, in_channels, model_channels, channel_mult, num_res_blocks, attn_resolutions,
                    resolutions, dropout)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.num_classes = num_classes
        emb_channels = model_channels * emb_mult
        skip_scale = math.sqrt(0.5) if skip_rescale else 1.0

        def heads(channels: int, res: int) -> int:
            if attn_head_channels is None:
                if channels % attn_heads:
                    raise ValueError(f"attn_heads={attn_heads} must divide the {channels} channels at {res}x{res}.")
                return attn_heads
            if channels % attn_head_channels:
                raise ValueError(
                    f"attn_head_channels={attn_head_channels} must divide the {channels} channels at {res}x{res}."
                )
            return channels // attn_head_channels

        def block(cin: int, cout: int, res: int, attn: bool = False, mode: str = "none") -> ResBlock:
            num_heads = heads(cout, res) if attn else 0
            return ResBlock(cin, cout, emb_channels, dropout, skip_scale, scale_shift, mode, resample_proj, num_heads)

        def resampler(ch: int, res: int, mode: Literal["up", "down"]) -> nn.Module:
            return block(ch, ch, res, mode=mode) if resample == "resblock" else ConvResample(ch, mode)

        # Mapping network: noise label (+ class) -> conditioning vector (DDPM, Sec. B).
        self.map_noise = noise_embedding(embedding, model_channels, endpoint=True, fourier_scale=fourier_scale)
        self.map_label = ClassEmbedding(num_classes, model_channels) if num_classes is not None else None
        self.map_emb = embedding_mlp(model_channels, emb_channels)

        # Encoder: every module's output is kept as a skip connection.
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        ch, skips = model_channels, [model_channels]
        self.downsample, self.enc = nn.ModuleList(), nn.ModuleList()
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            if level > 0:
                self.downsample.append(resampler(ch, res * 2, "down"))
                skips.append(ch)
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(block(ch, model_channels * mult, res, attn=res in attn_resolutions))
                ch = model_channels * mult
                skips.append(ch)
            self.enc.append(blocks)

        # Middle: residual block with attention, residual block (all three families).
        self.mid = nn.ModuleList([block(ch, ch, resolutions[-1], attn=True), block(ch, ch, resolutions[-1])])

        # Decoder, lowest resolution first: each block consumes one skip.
        self.upsample, self.dec = nn.ModuleList(), nn.ModuleList()
        for level in reversed(range(levels)):
            mult, res = channel_mult[level], resolutions[level]
            if level < levels - 1:
                self.upsample.append(resampler(ch, res // 2, "up"))
            blocks = nn.ModuleList()
            for i in range(num_res_blocks + 1):
                attn = res in attn_resolutions and (decoder_attention == "every_block" or i == num_res_blocks)
                blocks.append(block(ch + skips.pop(), model_channels * mult, res, attn=attn))
                ch = model_channels * mult
            self.dec.append(blocks)

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Xavier-uniform weights and zero biases, as DDPM's variance_scaling(1, fan_avg, uniform)."""
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        # Zero the last layer of every residual branch and the output layer, so each block
        # starts as the identity and the network starts at F = 0 (DDPM init_scale=0, ADM zero_module).
        zeroed = [self.conv_out]
        for module in self.modules():
            if isinstance(module, ResBlock):
                zeroed.append(module.conv1)
            if isinstance(module, SpatialAttention):
                zeroed.append(module.attn.proj)
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, noise_label: Tensor, class_labels: Tensor | None = None) -> Tensor:
        # x: (B, C_in, H, W), noise_label: (B,), class_labels: (B,) int64 or None -> (B, C_out, H, W)
        B = x.shape[0]
        emb = self.map_noise(batch_noise_label(noise_label, B)).to(x.dtype)  # (B, model_channels)
        if self.map_label is not None:
            emb = emb + self.map_label(class_labels, B).to(x.dtype)  # None -> null label
        emb = self.map_emb(emb)  # (B, E)

        h = self.conv_in(x)  # (B, model_channels, H, W)
        skips = [h]
        for level, blocks in enumerate(self.enc):
            if level > 0:
                h = self.downsample[level - 1](h, emb)  # (B, C, H / 2^level, W / 2^level)
                skips.append(h)
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)  # (B, C_low, H_low, W_low)
        for level, blocks in enumerate(self.dec):
            if level > 0:
                h = self.upsample[level - 1](h, emb)  # (B, C, 2 H_prev, 2 W_prev)
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)  # concat skip on channels
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)


def _check_args(
    img_resolution, in_channels, model_channels, channel_mult, num_res_blocks, attn_resolutions, resolutions, dropout
) -> None:
    """One-sentence ValueErrors for bad constructor input."""
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult}.")
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution < factor or img_resolution % factor:
        raise ValueError(
            f"img_resolution must be a positive multiple of 2**(len(channel_mult)-1)={factor}, got {img_resolution}."
        )
    if in_channels < 1:
        raise ValueError(f"in_channels must be positive, got {in_channels}.")
    if model_channels < 2 or model_channels % 2:
        raise ValueError(f"model_channels must be positive and even (it sizes the embedding), got {model_channels}.")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}.")
    for res in attn_resolutions:
        if res not in resolutions:
            raise ValueError(f"attn_resolutions entry {res} is not reachable; expected values from {resolutions}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")


# Presets name the four data-dependent arguments, so LightningCLI can set them under
# `class_path: diffusion_pl.networks.unet_tiny`; from Python any other UNet argument can be
# overridden as a keyword (jsonargparse cannot see through **overrides).


def unet_ddpm_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    **overrides,
) -> UNet:
    """DDPM's CIFAR-10 U-Net, 35,746,307 parameters (Ho et al. 2020, App. B: "35.7 million")."""
    config = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                  dropout=0.1, resample="conv")
    return UNet(img_resolution, in_channels, out_channels, num_classes, **{**config, **overrides})


def unet_ddpmpp_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    **overrides,
) -> UNet:
    """EDM's DDPM++ CIFAR-10 U-Net, 55,732,739 parameters (Karras et al. 2022; NVlabs/edm train.py --arch=ddpmpp)."""
    # Equals EDM's SongUNet(model_channels=128, channel_mult=[2,2,2], num_blocks=4,
    # resample_filter=[1,1]) without its 1,152-parameter augmentation-label layer.
    config = dict(model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                  dropout=0.13, resample="resblock", resample_proj=True, skip_rescale=True,
                  decoder_attention="last_block", embedding="positional")
    return UNet(img_resolution, in_channels, out_channels, num_classes, **{**config, **overrides})


def unet_adm_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    **overrides,
) -> UNet:
    """ADM U-Net (Dhariwal & Nichol 2021, Sec. 3) at iDDPM's CIFAR-10 size (Nichol & Dhariwal 2021), 57.1M params."""
    # Equals guided-diffusion's UNetModel(model_channels=128, channel_mult=(1,2,2,2),
    # num_res_blocks=3, attention_resolutions=16,8, num_head_channels=64,
    # use_scale_shift_norm=True, resblock_updown=True, dropout=0.3, out_channels=3);
    # learn_sigma (out_channels=6) adds 3,459.
    config = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8),
                  attn_head_channels=64, dropout=0.3, resample="resblock", resample_proj=False, scale_shift=True)
    return UNet(img_resolution, in_channels, out_channels, num_classes, **{**config, **overrides})


def unet_tiny(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    **overrides,
) -> UNet:
    """A 1.1M-parameter DDPM-style U-Net for tests and the CPU quickstart (16x16 or 32x32 images)."""
    # Attention only at the lowest resolution (img_resolution / 4), where it is cheap.
    config = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attn_resolutions=(img_resolution // 4,), dropout=0.0)
    return UNet(img_resolution, in_channels, out_channels, num_classes, **{**config, **overrides})
