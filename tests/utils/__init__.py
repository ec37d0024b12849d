"""Tests of diffusion_pl/utils: the checkpoint reader, the Lightning internals the package reads."""
