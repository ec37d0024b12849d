"""Other libraries' weights in and out: one folder per foreign library, one key table per network.

    diffusers/          UNet2DModel and DiTTransformer2DModel weights (unet.py, dit.py, names in keys.py) and
                        folders (export.py)
    dit_reference.py    facebookresearch/DiT's published .pt files
    importer.py         `import_pretrained`: a published model as a diffusion_pl checkpoint
    safetensors.py      the project's own export: one network's weights plus the config that samples it
    weights.py          reading foreign weight files; the one state-dict check
"""
