"""Tests of diffusion_pl/interop: diffusers U-Net and DiT conversion, import and export."""
