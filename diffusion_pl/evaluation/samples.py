"""Samples on disk, as `diffusion-pl sample` writes them: a folder of PNGs or an ADM/EDM .npz (arr_0 uint8 NHWC).

`evaluate(..., samples=PATH)` scores them (diffusion_pl/evaluation/evaluate.py): `inspect_samples` checks
the files and gives their count and size before any slow work, `read_samples` streams a rank's share.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from diffusion_pl.utils.errors import UserValueError

__all__ = ["read_rgb", "read_samples", "inspect_samples"]


def read_rgb(path: str | Path) -> np.ndarray:
    """uint8 (H, W, 3) of an image file (a writable copy); grey and RGBA become RGB (alpha dropped)."""
    with Image.open(path) as im:
        return np.array(im.convert("RGB"))


def read_samples(path: str | Path, indices: range, batch_size: int) -> Iterator[torch.Tensor]:
    """uint8 (B, 3, H, W) batches of the given sample indices of a PNG folder (sorted) or an .npz arr_0."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.png"))
        for a in range(indices.start, indices.stop, batch_size):
            batch = np.stack([read_rgb(f) for f in files[a:min(a + batch_size, indices.stop)]])
            yield torch.from_numpy(batch).permute(0, 3, 1, 2)  # NHWC -> NCHW
        return
    images = np.load(path, mmap_mode="r")["arr_0"]
    for a in range(indices.start, indices.stop, batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[a:min(a + batch_size, indices.stop)]))
        yield batch.permute(0, 3, 1, 2).expand(-1, 3, -1, -1)  # NHWC -> NCHW


def inspect_samples(path: str | Path, what: str = "samples") -> tuple[int, int, int]:
    """(N, H, W) of a PNG folder (all of one size) or an .npz (checking arr_0 is uint8 (N, H, W, C)); one-line
    errors name the input as `what`."""
    path = Path(path)
    if path.is_dir():
        return _inspect_folder(path, what)
    try:
        with np.load(path) as npz:
            arr = npz["arr_0"]
    except (OSError, ValueError, KeyError) as err:
        raise UserValueError(f"{what} {path} is not an .npz with arr_0 ({type(err).__name__}): expected the "
                             "ADM/EDM sample format") from err
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] not in (1, 3) or arr.shape[0] < 2:
        raise UserValueError(f"{what} {path} arr_0 is {arr.dtype} {arr.shape}: expected uint8 (N >= 2, H, W, 3)")
    return arr.shape[0], arr.shape[1], arr.shape[2]


def _inspect_folder(path: Path, what: str) -> tuple[int, int, int]:
    files = sorted(path.glob("*.png"))
    if len(files) < 2:
        raise UserValueError(f"{what} {path} holds {len(files)} PNG files: expected at least 2")
    sizes = {}
    for file in files:  # headers only, on every rank: a bad folder fails before any collective
        try:
            with Image.open(file) as im:
                sizes.setdefault(im.size, file)
        except OSError as err:
            raise UserValueError(f"{what} {file} cannot be read ({type(err).__name__}): expected a PNG "
                                 "image") from err
        if len(sizes) > 1:
            (w0, h0), (w1, h1) = sizes
            raise UserValueError(f"{what} {file} is {h1}x{w1} but {sizes[w0, h0].name} is {h0}x{w0}: "
                                 "expected PNGs of one size")
    ((width, height),) = sizes
    return len(files), height, width
