"""diffusers' networks: UNet2DModel (unet.py) and DiTTransformer2DModel (dit.py) weights, and export folders (export.py)."""
