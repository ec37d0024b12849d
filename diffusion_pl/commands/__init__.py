"""The project's own subcommands, one module each, and what they share.

- `sample.py`: `diffusion-pl sample` (PNGs and an ADM/EDM .npz from a checkpoint)
- `evaluate.py`: `diffusion-pl evaluate` (FID / KID / IS and bits/dim)
- `prepare.py`: `diffusion-pl prepare` (webdataset shards + manifest)
- `reconstruct_ema.py`: `diffusion-pl reconstruct-ema` (post-hoc EMA)
- `sampler_spec.py`: the `--sampler` argument (short names and class_path / init_args specs)
- `common.py`: checkpoint loading, the device launch, the one-line input error

Each command module has `main(argv) -> int`; `diffusion_pl.cli` dispatches to it. Multi-device runs
go through Lightning Fabric (DDP): every rank takes a contiguous block of sample indices, and
sample i uses seed + i, so outputs do not depend on the number of devices or the batch size.
"""
