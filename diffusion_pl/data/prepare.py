"""The names of ``diffusion-pl prepare`` where they were first importable from.

The writer is diffusion_pl.data.writer, the sources diffusion_pl.data.sources, the PNG encoder
diffusion_pl.data.png, the cache folder diffusion_pl.paths and the command line
diffusion_pl.commands.prepare. ``python -m diffusion_pl.data.prepare ...`` (or running this file)
still runs the command, as ``diffusion-pl prepare ...`` does. ``main`` imports the command line only
when called, so importing the data layer never imports diffusion_pl.commands.
"""

from __future__ import annotations

import sys

from diffusion_pl.data.png import encode_png
from diffusion_pl.data.sources import IMAGE_EXTS, cifar10_batches, cifar10_torchvision, image_folder
from diffusion_pl.data.tario import tar_members
from diffusion_pl.data.writer import (FORMAT, MANIFEST, ORDER_SEED, SHARD_PATTERN, PrepareError, Sample, Source,
                                      Unreadable, prepare, write_shards)
from diffusion_pl.data.writer import _host  # noqa: F401 - where tests of the temporary folder names find it
from diffusion_pl.paths import cache_dir

__all__ = ["FORMAT", "IMAGE_EXTS", "MANIFEST", "ORDER_SEED", "SHARD_PATTERN", "PrepareError", "Sample", "Source",
           "Unreadable", "cache_dir", "cifar10_batches", "cifar10_torchvision", "encode_png", "image_folder", "main",
           "prepare", "tar_members", "write_shards"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``diffusion-pl prepare`` (diffusion_pl.commands.prepare.main); returns an exit code."""
    from diffusion_pl.commands.prepare import main as prepare_main

    return prepare_main(argv)


if __name__ == "__main__":
    sys.exit(main())
