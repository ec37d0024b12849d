"""Reference images for FID: a shard set's stored images, in order, as uint8, with a cache key.

The reference statistics of diffusion_pl.evaluation.metrics are cached under the key returned here, which
names the data (a built-in set's parameters and version, the manifest's shard hashes, or the
files' paths and sizes) and the size the images are scored at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from torch import Tensor

from diffusion_pl.data.datamodule import ShardDataModule
from diffusion_pl.data import builtin
from diffusion_pl.data.shards import resolve_shards
from diffusion_pl.utils.errors import UserValueError
from diffusion_pl.data.pixels import to_uint8

__all__ = ["reference_images"]


def reference_images(data: str, batch_size: int = 250, num_workers: int = 0,
                     image_size: int | None = None) -> tuple[Iterable[Tensor], str, dict]:
    """(uint8 batches in stored order, cache key, info) of a shard set (a `shards` string).

    When the stored images are not `image_size` square, they are resized (and centre-cropped) as
    ShardDataModule(image_size=...) does for training, and the cache key says so. info holds 'count',
    'split', 'source' (from the manifest), 'image_size' (the size scored) and 'stored_size', both (H, W)
    (stored_size None for a mixed-size set, which needs `image_size`).
    """
    manifest = None
    if data.startswith("builtin:"):  # generated deterministically from its parameters and version
        key = f"{data}#v{builtin.VERSION}"
    else:
        urls, manifest = resolve_shards(data)
        if manifest is not None and manifest.get("latent") is not None:
            raise UserValueError(f"FID reference data {data} holds latents (written by `prepare --encode`): expected "
                                 "image shards (those the latents were encoded from, prepared without --encode)")
        if manifest is not None and all("sha256" in s for s in manifest["shards"]):
            key = json.dumps([manifest.get("count"), [s["sha256"] for s in manifest["shards"]]])
        else:  # no manifest: the files themselves (path and size)
            key = json.dumps([[u, Path(u).stat().st_size if Path(u).is_file() else None] for u in urls])

    def datamodule(size: int | None) -> ShardDataModule:
        # the validation stream is finite, in order and unflipped: exactly the stored images
        return ShardDataModule(shards=data, val_shards=data, batch_size=batch_size, num_workers=num_workers,
                               image_size=size, random_flip=False)

    mixed = manifest is not None and (manifest.get("mixed_sizes") or manifest.get("image_size") is None)
    if mixed and image_size is not None:  # no one stored size: every image is resized to image_size
        dm, stored = datamodule(image_size), None
        key += f"@{image_size}"
    else:
        dm = datamodule(None)
        stored = tuple(dm.output_size)
        if image_size is not None and (image_size, image_size) != stored:
            dm = datamodule(image_size)
            key += f"@{image_size}"
    info = {k: (manifest or {}).get(k) for k in ("count", "split", "source")}
    info.update(image_size=list(dm.output_size), stored_size=list(stored) if stored else None)
    return (to_uint8(images) for images, _ in dm.val_dataloader()), key, info
