"""Tests of diffusion_pl/data: preparing shards, streaming them, latent shards."""
