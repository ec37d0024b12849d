"""The one entry point: noise -> time grid -> steps -> samples.

`sample` wraps the model into a `Denoiser` (parameterization, classifier-free or auto-guidance,
x0 clipping), draws x_T from the prior N(0, prior_std^2 I) with the chosen noise source, runs
the sampler and reports the samples with the number of network evaluations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from diffusion_pl.guidance import Guidance
from diffusion_pl.prediction import Denoiser, Model, Prediction
from diffusion_pl.processes.base import Process
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.sampling.noise import GeneratorNoise, Noise, SeededNoise

__all__ = ["SampleOutput", "sample"]


@dataclass
class SampleOutput:
    """Samples x (in the sampling dtype, float32 by default), network evaluations nfe, and the float64 grid used."""

    x: Tensor
    nfe: int
    times: Tensor


def _device(model: Model, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if isinstance(model, nn.Module):
        p = next(model.parameters(), None)
        if p is not None:
            return p.device
    return torch.device("cpu")


@torch.no_grad()
def sample(model: Model, process: Process, prediction: Prediction, sampler: Sampler, shape: Sequence[int], *,
           noise: Tensor | None = None, class_labels: Tensor | None = None, guidance: Guidance = Guidance(),
           seeds: Sequence[int] | Tensor | None = None, generator: torch.Generator | None = None,
           device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
           progress: bool = False) -> SampleOutput:
    """Draw shape[0] samples with `sampler` from `model` in the model contract (x_t, t, class_labels) -> F.

    noise: standard normal (shape) for x_T = prior_std * noise; drawn from the noise source if None.
    seeds: one int per sample; all randomness of sample i then comes from its own generator
    (same seed, same sample, whatever the batch). Otherwise `generator` (or torch's global RNG).
    guidance: every guidance option in one value (diffusion_pl/guidance.py): the weight w with the null
    label (classifier-free guidance) or a guide model (autoguidance, Karras et al. 2024), the noise-level
    interval, the guided channels and x0 clipping. `Guidance()` samples unguided and unclipped.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (n, D) or (n, C, H, W), got {shape}")
    if seeds is not None and generator is not None:
        raise ValueError("pass either seeds (one per sample) or generator, not both")
    device = _device(model, device)
    source: Noise = SeededNoise(seeds) if seeds is not None else GeneratorNoise(generator)
    if seeds is not None and len(source.seeds) != shape[0]:
        raise ValueError(f"seeds must hold one integer per sample: got {len(source.seeds)} seeds for {shape[0]} samples")
    if noise is None:
        noise = source.randn(shape, dtype, device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must have the sample shape {shape}, got {tuple(noise.shape)}")
    if class_labels is not None:
        class_labels = torch.as_tensor(class_labels, device=device)
        if class_labels.shape != (shape[0],):
            raise ValueError(f"class_labels must have shape ({shape[0]},), got {tuple(class_labels.shape)}")
    x = process.prior_std() * noise.to(device=device, dtype=dtype)
    denoiser = Denoiser(model, process, prediction, guidance)
    x = sampler.run(denoiser, x, source, class_labels, progress=progress)
    return SampleOutput(x=x, nfe=denoiser.nfe, times=sampler.times(process))
