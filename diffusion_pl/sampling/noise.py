"""Where a sampler's randomness comes from: one generator for the batch, or one seed per sample.

With `SeededNoise`, sample i draws its initial noise and every step's noise from its own
torch.Generator seeded with seeds[i] (as in EDM's generate.py), so an image depends on its seed
only, not on the batch size or on its neighbours. Draws happen on the CPU and are moved to the
device afterwards, so a seed gives the same noise on every device.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["Noise", "GeneratorNoise", "SeededNoise"]


class Noise:
    """A source of standard normal noise for a batch."""

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
        raise NotImplementedError

    def randn_like(self, x: Tensor) -> Tensor:
        """Standard normal noise shaped like x, in x's dtype and device."""
        return self.randn(tuple(x.shape), x.dtype, x.device)


class GeneratorNoise(Noise):
    """All samples draw from one torch.Generator (or torch's global RNG when generator is None)."""

    def __init__(self, generator: torch.Generator | None = None) -> None:
        self.generator = generator

    def randn(self, shape, dtype=torch.float32, device=None) -> Tensor:
        if self.generator is None:
            return torch.randn(shape, dtype=dtype, device=device)
        z = torch.randn(shape, generator=self.generator, dtype=dtype, device=self.generator.device)
        return z.to(device) if device is not None else z


class SeededNoise(Noise):
    """One CPU generator per sample, seeded with seeds[i]; draws are stacked along the batch (EDM, Karras et al. 2022)."""

    def __init__(self, seeds: Sequence[int] | Tensor) -> None:
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, Tensor) else seeds)]
        if not seeds:
            raise ValueError("seeds must hold one integer per sample, got an empty list")
        self.seeds = seeds
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]

    def randn(self, shape, dtype=torch.float32, device=None) -> Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"SeededNoise holds {len(self.generators)} seeds but the batch has {shape[0]} samples")
        z = torch.stack([torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators])
        return z.to(device) if device is not None else z
