"""ADM's centre crop for `prepare folder --center_crop N`: the ImageNet protocol of the published FIDs.

ADM (openai/guided-diffusion, guided_diffusion/image_datasets.py:126-143, ``center_crop_arr``) and DiT
(facebookresearch/DiT train.py:85-103, the same function) bring every ImageNet image to N x N in three steps:

1. while the short side is at least 2N, halve both sides (integer halving, ``w // 2``) with PIL's BOX
   filter (an anti-aliased 2x2 average, done by hand because older PILs lacked ``reducing_gap``);
2. resize with BICUBIC so that the short side is N (the long side ``round(long * N / short)``,
   Python's round);
3. crop the centre N x N, the offset being ``(side - N) // 2`` on each axis.

The image is first made RGB (image_datasets.py:108 converts every image); grey-scale files stay
grey here, as prepare keeps them elsewhere. `center_crop_source` applies the crop to a `Source`:
each image is decoded, cropped and stored as a lossless PNG, so all images share the size N x N
and the manifest records ``"center_crop": {"size": N, "method": "adm"}``.
"""

from __future__ import annotations

import io
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from diffusion_pl.data.png import encode_png
from diffusion_pl.data.writer import PrepareError, Source, Unreadable, _reason

__all__ = ["CROP_METHOD", "adm_center_crop", "center_crop_source"]
CROP_METHOD = "adm"  # the name the manifest gives the protocol above


def adm_center_crop(image: Image.Image, size: int) -> tuple[Image.Image, int]:
    """The N x N ADM centre crop of a PIL image, and how many BOX halvings it took (see the module doc)."""
    halvings = 0
    while min(image.size) >= 2 * size:
        image = image.resize((image.size[0] // 2, image.size[1] // 2), resample=Image.BOX)
        halvings += 1
    ratio = size / min(image.size)
    width, height = (round(side * ratio) for side in image.size)
    image = image.resize((width, height), resample=Image.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size)), halvings


def _cropped(data: bytes, size: int) -> tuple[bytes, tuple[int, int, int]]:
    """PNG bytes and (H, W, C) of the ADM crop of an encoded image."""
    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("L" if im.mode in ("L", "1") else "RGB")
    out = np.asarray(adm_center_crop(im, size)[0])
    return encode_png(out), (size, size, 1 if out.ndim == 2 else 3)


def center_crop_source(src: Source, size: int) -> Source:
    """``src`` with every image ADM-centre-cropped to size x size and stored as PNG (a bad file stays `Unreadable`)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise PrepareError(f"--center_crop {size!r} is invalid: expected a positive integer side in pixels")

    def load(indices: Sequence[int]) -> Iterator[tuple | Unreadable]:
        for record in src.load(indices):
            if isinstance(record, Unreadable):
                yield record
                continue
            data, _, label, _, *origin = record
            try:
                image, shape = _cropped(data, size)
            except Exception as err:  # noqa: BLE001 - damage the header check could not see
                yield Unreadable(origin[0] if origin else "an image", _reason(err))
                continue
            yield (image, "png", label, shape, *origin)

    meta = {**src.meta, "center_crop": {"size": size, "method": CROP_METHOD}}
    return Source(src.name, src.classes, src.size, load, meta)
