"""A tiny AutoencoderKL config (random weights, seeded) shared by the latent tests: 3 -> 4 channels, downsample 2."""

from __future__ import annotations

TINY_VAE_CONFIG = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "latent_channels": 4,
    "norm_num_groups": 8,
    "layers_per_block": 1,
}


def tiny_autoencoder(**kwargs):
    from diffusion_pl.codecs.autoencoder import Autoencoder

    return Autoencoder(config=TINY_VAE_CONFIG, **kwargs)
