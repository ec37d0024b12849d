"""The built-in quickstart dataset: coloured shapes, generated once (seeded) and cached as shards.

``shapes``: small RGB images of one filled shape on a plain dark-grey background; the class is
the shape (circle, cross, diamond, square, triangle), its colour is one of six saturated palette
colours, and size, position (near the centre) and background grey level are random. Edges are
anti-aliased from each shape's signed distance (a one-pixel ramp). The distribution is kept this
simple on purpose: a 1M-parameter U-Net draws recognisable shapes after 700 steps (the quick
start); with free RGB colours and positions anywhere, 1,000 steps still gave colour blobs.
Written through the same shard writer as ``diffusion-pl prepare`` into
``$DIFFUSION_PL_CACHE/builtin/shapes-<size>px-n<count>-seed<seed>-v<VERSION>`` on first use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from diffusion_pl.data.png import encode_png
from diffusion_pl.data.writer import MANIFEST, PrepareError, Sample, write_shards
from diffusion_pl.utils.paths import cache_dir

SHAPES = ("circle", "cross", "diamond", "square", "triangle")  # sorted: class index = position
PALETTE = ((230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 220, 40), (220, 60, 220), (40, 220, 230))
CHUNK = 1024  # images rendered per vectorized numpy call
VERSION = 2  # bump when the rendering changes, so old caches are not reused


def _sdf(label: int, du: np.ndarray, dv: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) to shape ``label`` centred at the origin, radius r."""
    au, av = np.abs(du), np.abs(dv)
    if label == 0:  # circle
        return np.sqrt(du**2 + dv**2) - r
    if label == 1:  # cross: union (min) of a horizontal and a vertical bar
        return np.minimum(np.maximum(au - 0.3 * r, av - r), np.maximum(av - 0.3 * r, au - r))
    if label == 2:  # diamond
        return (au + av - 1.15 * r) / np.sqrt(2)
    if label == 3:  # square
        return np.maximum(au, av) - 0.8 * r
    # upright triangle: intersection (max) of base and two sides through the apex (0, -r)
    side = (1.7 * au - 1.054 * (dv + r)) / np.hypot(1.7, 1.054)
    return np.maximum(dv - 0.7 * r, side)


def render_shapes(count: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic images uint8 (count, size, size, 3) and labels int64 (count,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPES), count)
    r = rng.uniform(0.30, 0.42, count).astype(np.float32)[:, None, None]
    cx, cy = (0.5 + rng.uniform(-0.08, 0.08, (2, count, 1, 1))).astype(np.float32)
    bg = np.repeat(rng.uniform(0, 90, (count, 1, 1, 1)), 3, axis=-1).astype(np.float32)  # dark grey
    fg = np.array(PALETTE, np.float32)[rng.integers(0, len(PALETTE), count)][:, None, None, :]
    grid = ((np.arange(size) + 0.5) / size).astype(np.float32)
    u, v = np.meshgrid(grid, grid)  # u: x (columns), v: y (rows, downward), pixel centres in [0, 1]
    alpha = np.empty((count, size, size, 1), np.float32)
    for k in range(len(SHAPES)):
        i = labels == k
        sdf = _sdf(k, u - cx[i], v - cy[i], r[i])
        # coverage from the distance in pixels: a one-pixel linear ramp anti-aliases the edge
        alpha[i, ..., 0] = np.clip(0.5 - sdf * size, 0.0, 1.0)
    images = np.rint(bg + (fg - bg) * alpha).astype(np.uint8)
    return images, labels.astype(np.int64)


def shapes_meta(size: int = 32) -> dict:
    """What the manifest of ``shapes`` at ``size`` says, known without generating it."""
    return {"classes": list(SHAPES), "num_classes": len(SHAPES), "image_size": [size, size], "channels": 3}


def shapes_dir(size: int = 32, count: int = 10_000, seed: int = 0) -> Path:
    """Cache folder of one ``shapes`` configuration."""
    return cache_dir() / "builtin" / f"shapes-{size}px-n{count}-seed{seed}-v{VERSION}"


def ensure_shapes(size: int = 32, count: int = 10_000, seed: int = 0, shard_size: int = 500) -> Path:
    """Generate the shapes shards once (a few seconds) and return their folder."""
    if size < 8 or count < 1:
        raise ValueError(f"builtin:shapes size={size}, count={count} is invalid: expected size >= 8, count >= 1")
    out = shapes_dir(size, count, seed)
    if (out / MANIFEST).is_file():
        return out

    def samples() -> Iterator[Sample]:
        for a in range(0, count, CHUNK):
            images, labels = render_shapes(min(CHUNK, count - a), size, seed=seed * 1_000_003 + a)
            for i, (image, label) in enumerate(zip(images, labels, strict=True)):
                yield Sample(f"{a + i:08d}", encode_png(image), "png", int(label), (size, size, 3))

    try:
        write_shards(samples(), out, classes=SHAPES, shard_size=shard_size,
                     source=f"builtin:shapes?size={size}&count={count}&seed={seed}", total=count)
    except PrepareError:
        if not (out / MANIFEST).is_file():  # another process finished first: use its copy
            raise
    return out
