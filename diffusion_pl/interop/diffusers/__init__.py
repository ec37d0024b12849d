"""diffusers' networks: UNet2DModel (unet.py) and DiTTransformer2DModel (dit.py) weights, export folders (export.py),
and their weight names in one table per network (keys.py), which import and export both read."""
