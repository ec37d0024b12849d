"""Data layer: webdataset shards written by ``diffusion-pl prepare``, streamed by ShardDataModule.

- ``prepare``: CIFAR-10 (torchvision or local python batches) and image folders / tars ->
  reproducible tar shards + manifest.json (``write_shards`` is the writer itself).
- ``ShardDataModule``: batches (images float32 (B, C, H, W) in [-1, 1], labels int64 (B,)),
  split over ranks and workers, infinite for training and exactly resumable.
- ``builtin``: the seeded coloured-shapes dataset behind ``shards="builtin:shapes"``.
"""

from diffusion_pl.data.builtin import SHAPES, ensure_shapes, render_shapes
from diffusion_pl.data.datamodule import ShardDataModule, ShardStream, load_manifest, resolve_shards, to_signed_unit
from diffusion_pl.data.prepare import (
    PrepareError,
    Sample,
    cifar10_batches,
    cifar10_torchvision,
    image_folder,
    prepare,
    write_shards,
)

__all__ = [
    "SHAPES", "PrepareError", "Sample", "ShardDataModule", "ShardStream", "cifar10_batches", "cifar10_torchvision",
    "ensure_shapes", "image_folder", "load_manifest", "prepare", "render_shapes", "resolve_shards",
    "to_signed_unit", "write_shards",
]
