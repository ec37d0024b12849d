"""U-Net presets: the reference networks of the papers, weight for weight (see each docstring).

Each preset is a function returning a configured `UNet`; `diffusion_pl.networks.PRESETS` lists them
all, and tests/cli/test_recipe_sources.py checks that every recipe's network equals its preset.
"""

from __future__ import annotations

from diffusion_pl.networks.unet import UNet

__all__ = ["unet_ddpm_cifar10", "unet_ddpmpp_cifar10", "unet_ddpmpp_score_sde", "unet_adm_cifar10",
           "unet_ncsnpp_cifar10", "unet_tiny"]

# Presets name the four data-dependent arguments and augment_dim (set by the training recipe's
# augmentation), so LightningCLI can set them under `class_path: diffusion_pl.networks.unet_presets.unet_tiny`;
# from Python any other UNet argument can be overridden as a keyword (jsonargparse cannot see
# through **overrides).


def unet_ddpm_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> UNet:
    """DDPM's CIFAR-10 U-Net, 35,746,307 parameters (Ho et al. 2020, App. B: "35.7 million")."""
    # hojonathanho/diffusion diffusion_tf/models/unet.py (ch=128, ch_mult=(1,2,2,2), 2 blocks, attention
    # at 16, dropout 0.1: scripts/run_cifar.py) with its 'SAME'-padded strided conv (nn.py:76) and
    # [sin, cos] embedding (nn.py:90-104); equal to diffusers' UNet2DModel of google/ddpm-cifar10-32
    # (tests/interop/test_interop_unet.py).
    config = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                  dropout=0.1, resample="conv", downsample_padding="same", embedding_order="sin_cos",
                  embedding_endpoint=True, norm_eps=1e-6, init="ddpm")
    return UNet(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim,
                **{**config, **overrides})


def unet_ddpmpp_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> UNet:
    """EDM's DDPM++ CIFAR-10 U-Net, 55,732,739 parameters (Karras et al. 2022; NVlabs/edm train.py --arch=ddpmpp)."""
    # Equals EDM's SongUNet(model_channels=128, channel_mult=[2,2,2], num_blocks=4,
    # resample_filter=[1,1]) without its 1,152-parameter augmentation-label layer.
    # EDM's [sin, cos] swap (networks.py:323) and init (networks.py:259-261).
    config = dict(model_channels=128, channel_mult=(2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                  dropout=0.13, resample="resblock", resample_proj=True, skip_rescale=True,
                  decoder_attention="last_block", embedding="positional", embedding_order="sin_cos",
                  embedding_endpoint=True, norm_eps=1e-6, init="edm")
    return UNet(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim,
                **{**config, **overrides})


def unet_ddpmpp_score_sde(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> UNet:
    """Score-SDE's DDPM++ CIFAR-10 U-Net (Song et al. 2021, App. H), 61,804,419 parameters."""
    # Equals yang-song/score_sde_pytorch configs/vp/cifar10_ddpmpp_continuous.py (NCSNpp with nf=128,
    # ch_mult=(1,2,2,2), 4 BigGAN blocks, attention at 16, positional embedding, no FIR, no
    # progressive input, skip_rescale, init_scale 0; the same network in configs/subvp and in
    # gnobitab/RectifiedFlow's cifar10_rf_gaussian_ddpmpp.py, which sets dropout 0.15).
    config = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                  dropout=0.1, resample="resblock", resample_proj=True, skip_rescale=True,
                  decoder_attention="last_block", embedding="positional", embedding_order="sin_cos",
                  embedding_endpoint=True, norm_eps=1e-6, init="score_sde")
    return UNet(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim,
                **{**config, **overrides})


def unet_adm_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> UNet:
    """ADM U-Net (Dhariwal & Nichol 2021, Sec. 3) at iDDPM's CIFAR-10 size (Nichol & Dhariwal 2021), 57.1M params."""
    # Equals guided-diffusion's UNetModel(model_channels=128, channel_mult=(1,2,2,2),
    # num_res_blocks=3, attention_resolutions=16,8, num_head_channels=64,
    # use_scale_shift_norm=True, resblock_updown=True, dropout=0.3, out_channels=3);
    # learn_sigma (out_channels=6) adds 3,459. Its timestep embedding is [cos, sin] without
    # endpoint (guided_diffusion/nn.py:103-121), GroupNorm eps 1e-5 (nn.py:100), the class table
    # nn.Embedding(num_classes, 4 * 128) added after the time MLP (unet.py:478, 652), PyTorch's
    # default init with zero_module (nn.py:68).
    config = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=3, attn_resolutions=(16, 8),
                  attn_head_channels=64, dropout=0.3, resample="resblock", resample_proj=False, scale_shift=True,
                  embedding_order="cos_sin", embedding_endpoint=False, norm_eps=1e-5, class_embedding="after_mlp",
                  class_null_row=False, init="adm")
    return UNet(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim,
                **{**config, **overrides})


def unet_tiny(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> UNet:
    """A 1.1M-parameter DDPM-style U-Net for tests and the CPU quickstart (16x16 or 32x32 images)."""
    # Attention only at the lowest resolution (img_resolution / 4), where it is cheap.
    config = dict(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                  attn_resolutions=(img_resolution // 4,), dropout=0.0)
    return UNet(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim,
                **{**config, **overrides})


def unet_ncsnpp_cifar10(
    img_resolution: int = 32, in_channels: int = 3, out_channels: int | None = None, num_classes: int | None = None,
    augment_dim: int = 0, **overrides,
) -> UNet:
    """NCSN++ CIFAR-10 U-Net, 62,758,787 parameters (Song et al. 2021, App. H; score_sde cifar10_ncsnpp_continuous)."""
    # Equals yang-song/score_sde_pytorch configs/ve/cifar10_ncsnpp_continuous.py (NCSNpp: nf=128,
    # ch_mult=(1,2,2,2), 4 BigGAN blocks, attention at 16, Fourier scale 16, FIR [1,3,3,1],
    # progressive_input='residual', skip_rescale), whose 62,758,915 parameters include the 128
    # frozen Fourier frequencies (a buffer here), [sin, cos] features (layerspp.py:41). Condition it
    # on log(sigma) and divide by sigma as score_sde does with `prediction.ScaledScorePrediction`.
    # Init: score_sde's default_init is xavier-uniform ("ddpm"), except that its attention q, k, v
    # start at variance scale 0.1 (NIN init_scale, layers.py:549): not reproduced.
    config = dict(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=4, attn_resolutions=(16,),
                  dropout=0.1, resample="resblock", resample_proj=True, skip_rescale=True,
                  decoder_attention="last_block", embedding="fourier", fourier_scale=16.0, noise_mult=2,
                  resample_filter=(1, 3, 3, 1), progressive_input="residual", embedding_order="sin_cos",
                  norm_eps=1e-6, init="score_sde")
    return UNet(img_resolution, in_channels, out_channels, num_classes, augment_dim=augment_dim,
                **{**config, **overrides})
