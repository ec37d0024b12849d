"""Tests of diffusion_pl/codecs: the pixel and latent codecs, the frozen autoencoder."""
