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
| downsample_padding  | same          | -              | -             |
| embedding_order     | sin_cos       | sin_cos        | cos_sin       |
| embedding_endpoint  | True          | True           | False         |
| norm_eps            | 1e-6          | 1e-6           | 1e-5          |
| norm_groups         | None (32)     | None (32)      | None (32)     |
| class_embedding     | -             | input, null    | after_mlp     |
| init                | ddpm          | edm            | adm           |

NCSN++ (Song et al. 2021, App. H; `unet_ncsnpp_cifar10`) is the DDPM++ column plus random Fourier
features of log(sigma) (embedding="fourier", noise_mult=2), FIR resampling
(resample_filter=(1, 3, 3, 1)) and the residual input pyramid (progressive_input="residual"),
both in `diffusion_pl.networks.fir`.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_pl.networks.base import ScoreNetwork
from diffusion_pl.networks.checkpointing import check_checkpoint_option, run_block
from diffusion_pl.networks.embeddings import ClassEmbedding, batch_noise_label, embedding_mlp, noise_embedding
from diffusion_pl.networks.fir import ResidualInput
from diffusion_pl.networks.unet_blocks import INIT_SCHEMES, ConvResample, ResBlock, SwapHalves, group_norm, init_unet

__all__ = ["UNet"]


class UNet(ScoreNetwork):
    """U-Net score network with the options of DDPM, DDPM++ and ADM (see the module table).

    Args:
        img_resolution: input height and width (required; `diffusion-pl fit` fills it from the data when
            a recipe leaves it out).
        in_channels: image channels; None: 3, or the data's channels under `diffusion-pl fit`.
        out_channels: output channels; None means in_channels.
        num_classes: None for unconditional; else labels 0..num_classes-1 plus the null label num_classes
            (unless class_null_row=False).
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
        augment_dim: length of the augmentation-label vector (EDM's non-leaking augmentation,
            Karras et al. 2022, App. B.6); 0: none. When > 0, a bias-free linear map of the labels is
            added to the noise embedding before the embedding MLP (NVlabs/edm training/networks.py
            SongUNet.map_augment).
        noise_mult: noise-embedding width as a multiple of model_channels (EDM's channel_mult_noise;
            NCSN++: 2, its 128 Fourier frequencies give 256 features). Class and augmentation labels are
            embedded at the same width.
        resample_filter: separable FIR taps of the resampling residual blocks; (1, 1) is nearest up /
            average-pool down, NCSN++ uses (1, 3, 3, 1) (`diffusion_pl.networks.fir`).
        progressive_input: "residual" adds NCSN++'s input pyramid, a FIR-downsampled 3x3 convolution of
            the previous level, to the output of every encoder downsampling (score_sde
            progressive_input='residual', EDM's encoder_type='residual'); "none" (DDPM++, ADM) does not.
        downsample_padding: padding of resample="conv"'s strided convolution: "same" pads only bottom and
            right (DDPM's TensorFlow 'SAME'), "symmetric" pads 1 on every side (ADM's Downsample).
        embedding_order: [cos, sin] (ADM, EDM's PositionalEmbedding) or [sin, cos] (DDPM; EDM's SongUNet
            swaps to it, networks.py:323) halves of the noise embedding.
        embedding_endpoint: sinusoid frequencies 10000^(-i/(K-1)) reaching 1/10000 (DDPM, DDPM++) or
            10000^(-i/K) (ADM), for i < K = half the embedding width.
        norm_eps: GroupNorm epsilon: 1e-6 (DDPM, DDPM++) or 1e-5 (ADM).
        norm_groups: groups of every GroupNorm (diffusers' UNet2DModel `norm_num_groups`; it must divide every
            normalised width); None: 32, fewer in layers under 128 channels so that each group keeps at
            least 4 channels (EDM's rule; all three families use 32 groups at their widths).
        class_embedding: "input": class table added to the noise embedding before the MLP (EDM);
            "after_mlp": a table of conditioning-vector width added after it (ADM).
        class_null_row: whether the class table has the null label num_classes (classifier-free
            guidance); False as in ADM, then `null_label` is None and class_labels are required.
        init: weight initialisation of "ddpm", "score_sde", "edm" or "adm" (`unet_blocks.init_unet`).
        checkpoint_activations: recompute each residual block (and resampler) in the backward pass instead of
            keeping its activations (`diffusion_pl.networks.checkpointing`): less memory, about one more
            forward pass per step; only while training with gradients. Outputs, gradients and weights are
            those without it.
        interval_embedding: a second noise embedding, of `interval` = c_noise(t) - c_noise(r), summed with the
            first before the embedding MLP: the (t, t - r) conditioning of MeanFlow (Geng et al. 2025, Sec. 4.3,
            Table 1c). Off by default (the network and its state_dict are then unchanged).
        noise_label_scale: multiplies the noise label (and the interval) before the embeddings. 1: the process's
            label as is (1000 t for the continuous-time processes); 0.001 embeds t itself, as MeanFlow's PyTorch
            port embeds raw t in [0, 1] (Gsunshine/py-meanflow meanflow/models/unet.py:370-372), which keeps the
            embedding's frequencies, and so d/dt of the network, 1000 times lower.
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
        augment_dim: int = 0,
        noise_mult: int = 1,
        resample_filter: tuple[int, ...] = (1, 1),
        progressive_input: Literal["none", "residual"] = "none",
        downsample_padding: Literal["symmetric", "same"] = "symmetric",
        embedding_order: Literal["cos_sin", "sin_cos"] = "cos_sin",
        embedding_endpoint: bool = True,
        norm_eps: float = 1e-6,
        norm_groups: int | None = None,
        class_embedding: Literal["input", "after_mlp"] = "input",
        class_null_row: bool = True,
        init: Literal["ddpm", "score_sde", "edm", "adm"] = "ddpm",
        checkpoint_activations: bool = False,
        interval_embedding: bool = False,
        noise_label_scale: float = 1.0,
    ) -> None:
        # the declared interface (networks/base.py): shapes, classes, null label, augmentation labels
        super().__init__(img_resolution, in_channels, out_channels, num_classes, augment_dim, class_null_row)
        img_resolution, in_channels = self.img_resolution, self.in_channels
        _check_ncsnpp_args(noise_mult, resample_filter, progressive_input, resample)
        levels = len(channel_mult)
        resolutions = tuple(img_resolution >> level for level in range(levels))
        _check_args(img_resolution, model_channels, channel_mult, num_res_blocks, attn_resolutions, resolutions,
                    dropout, norm_groups)
        _check_reference_args(embedding_order, class_embedding, init)
        self.checkpoint_activations = check_checkpoint_option("UNet", checkpoint_activations)
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
            return ResBlock(cin, cout, emb_channels, dropout, skip_scale, scale_shift, mode, resample_proj, num_heads,
                            resample_filter, norm_eps, norm_groups)

        def resampler(ch: int, res: int, mode: Literal["up", "down"]) -> nn.Module:
            return block(ch, ch, res, mode=mode) if resample == "resblock" else ConvResample(ch, mode,
                                                                                            downsample_padding)

        # Mapping network: noise label (+ class) -> conditioning vector (DDPM, Sec. B).
        noise_channels = model_channels * noise_mult
        self.map_noise = noise_embedding(embedding, noise_channels, endpoint=embedding_endpoint,
                                         fourier_scale=fourier_scale)
        self.noise_order = SwapHalves() if embedding_order == "sin_cos" else nn.Identity()
        # ADM adds its class table after the MLP, at the conditioning width (guided_diffusion/unet.py:478, 652).
        self.class_after_mlp = class_embedding == "after_mlp"
        label_channels = emb_channels if self.class_after_mlp else noise_channels
        self.map_label = (ClassEmbedding(num_classes, label_channels, null_row=class_null_row)
                          if num_classes is not None else None)
        self.map_augment = nn.Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_emb = embedding_mlp(noise_channels, emb_channels)
        self.takes_interval = bool(interval_embedding)
        if isinstance(noise_label_scale, bool) or not isinstance(noise_label_scale, (int, float)) or \
                not (math.isfinite(noise_label_scale) and noise_label_scale > 0):
            raise ValueError(f"noise_label_scale must be a positive number (1: the process's noise label), got "
                             f"{noise_label_scale!r}")
        self.noise_label_scale = float(noise_label_scale)
        self.map_interval = noise_embedding(embedding, noise_channels, endpoint=embedding_endpoint,
                                            fourier_scale=fourier_scale) if interval_embedding else None

        # Encoder: every module's output is kept as a skip connection.
        self.conv_in = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        ch, skips = model_channels, [model_channels]
        self.downsample, self.enc = nn.ModuleList(), nn.ModuleList()
        # NCSN++'s input pyramid: level l gets a FIR-downsampled conv of level l-1 (the image at l = 0).
        self.input_pyramid = nn.ModuleList() if progressive_input == "residual" else None
        aux_channels = in_channels
        for level, (mult, res) in enumerate(zip(channel_mult, resolutions)):
            if level > 0:
                self.downsample.append(resampler(ch, res * 2, "down"))
                if self.input_pyramid is not None:
                    self.input_pyramid.append(ResidualInput(aux_channels, ch, resample_filter, skip_scale))
                    aux_channels = ch
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

        self.norm_out = group_norm(ch, norm_eps, norm_groups)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        self.conv_out.zero_init = True
        self.init = init
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Initialise as DDPM, EDM or ADM do (`init` option; see `unet_blocks.init_unet`)."""
        init_unet(self, self.init)

    def forward(
        self, x: Tensor, noise_label: Tensor, class_labels: Tensor | None = None, augment_labels: Tensor | None = None,
        interval: Tensor | None = None,
    ) -> Tensor:
        # x: (B, C_in, H, W), noise_label: (B,), class_labels: (B,) int64 or None,
        # augment_labels: (B, augment_dim) or None (no augmentation: zeros),
        # interval: (B,) c_noise(t) - c_noise(r) or None (r = t), with interval_embedding only -> (B, C_out, H, W)
        B = x.shape[0]
        scale = self.noise_label_scale
        emb = self.noise_order(self.map_noise(scale * batch_noise_label(noise_label, B))).to(x.dtype)  # (B, noise_ch)
        if self.map_interval is not None:
            interval = torch.zeros_like(noise_label) if interval is None else interval
            emb = emb + self.noise_order(self.map_interval(scale * batch_noise_label(interval, B))).to(x.dtype)
        elif interval is not None:
            raise ValueError("UNet got an interval but was built without one: expected interval_embedding=True")
        if self.map_label is not None and not self.class_after_mlp:
            emb = emb + self.map_label(class_labels, B).to(x.dtype)  # None -> null label
        if self.map_augment is not None and augment_labels is not None:
            # None means all-zero labels, whose bias-free image is exactly 0.
            emb = emb + self.map_augment(augment_labels.to(x.dtype))  # (B, model_channels)
        emb = self.map_emb(emb)  # (B, E)
        if self.map_label is not None and self.class_after_mlp:
            emb = emb + self.map_label(class_labels, B).to(x.dtype)  # (B, E)

        ckpt = self.checkpoint_activations  # run_block checkpoints each block when set (and training)
        h = self.conv_in(x)  # (B, model_channels, H, W)
        skips, aux = [h], x
        for level, blocks in enumerate(self.enc):
            if level > 0:
                h = run_block(self, ckpt, self.downsample[level - 1], h, emb)  # (B, C, H / 2^level, W / 2^level)
                if self.input_pyramid is not None:
                    h = aux = self.input_pyramid[level - 1](aux, h)  # NCSN++ residual input pyramid
                skips.append(h)
            for block in blocks:
                h = run_block(self, ckpt, block, h, emb)
                skips.append(h)
        for block in self.mid:
            h = run_block(self, ckpt, block, h, emb)  # (B, C_low, H_low, W_low)
        for level, blocks in enumerate(self.dec):
            if level > 0:
                h = run_block(self, ckpt, self.upsample[level - 1], h, emb)  # (B, C, 2 H_prev, 2 W_prev)
            for block in blocks:
                # the concatenation inside the block's checkpoint: only h and the skip are kept
                h = run_block(self, ckpt, functools.partial(_with_skip, block), h, skips.pop(), emb)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, H, W)


def _with_skip(block: nn.Module, h: Tensor, skip: Tensor, emb: Tensor) -> Tensor:
    """A decoder block on h with the encoder's skip concatenated on channels."""
    return block(torch.cat([h, skip], dim=1), emb)  # (B, C_h + C_skip, H, W) in


def _check_reference_args(embedding_order, class_embedding, init) -> None:
    """One-sentence ValueErrors for the reference-matching options."""
    if embedding_order not in ("cos_sin", "sin_cos"):
        raise ValueError(f"embedding_order must be 'cos_sin' or 'sin_cos', got {embedding_order!r}.")
    if class_embedding not in ("input", "after_mlp"):
        raise ValueError(f"class_embedding must be 'input' or 'after_mlp', got {class_embedding!r}.")
    if init not in INIT_SCHEMES:
        raise ValueError(f"init must be one of {', '.join(map(repr, INIT_SCHEMES))}, got {init!r}.")


def _check_args(
    img_resolution, model_channels, channel_mult, num_res_blocks, attn_resolutions, resolutions, dropout, norm_groups
) -> None:
    """One-sentence ValueErrors for bad constructor input."""
    if not channel_mult or min(channel_mult) < 1:
        raise ValueError(f"channel_mult must be a non-empty tuple of positive ints, got {channel_mult}.")
    factor = 2 ** (len(channel_mult) - 1)
    if img_resolution < factor or img_resolution % factor:
        raise ValueError(
            f"img_resolution must be a positive multiple of 2**(len(channel_mult)-1)={factor}, got {img_resolution}."
        )
    if model_channels < 2 or model_channels % 2:
        raise ValueError(f"model_channels must be positive and even (it sizes the embedding), got {model_channels}.")
    if num_res_blocks < 1:
        raise ValueError(f"num_res_blocks must be at least 1, got {num_res_blocks}.")
    for res in attn_resolutions:
        if res not in resolutions:
            raise ValueError(f"attn_resolutions entry {res} is not reachable; expected values from {resolutions}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
    if norm_groups is not None and (isinstance(norm_groups, bool) or not isinstance(norm_groups, int)
                                    or norm_groups < 1):
        raise ValueError(f"norm_groups must be None or a positive integer, got {norm_groups!r}.")


def _check_ncsnpp_args(noise_mult, resample_filter, progressive_input, resample) -> None:
    """One-sentence ValueErrors for the NCSN++ options (the filter taps are checked by `fir.fir_filter`)."""
    if not isinstance(noise_mult, int) or noise_mult < 1:
        raise ValueError(f"noise_mult must be a positive integer, got {noise_mult}.")
    if progressive_input not in ("none", "residual"):
        raise ValueError(f"progressive_input must be 'none' or 'residual', got {progressive_input!r}.")
    if resample == "conv" and tuple(resample_filter) != (1, 1):
        raise ValueError(f"resample_filter={tuple(resample_filter)} needs resample='resblock': DDPM's "
                         "convolutional resampling has no FIR filter.")
