"""Samplers for every process and parameterization, behind one entry point `sample`.

    out = sample(model, process, prediction, sampler, shape, seeds=..., guidance=..., progress=...)
    out.x, out.nfe

Families (one file each): posterior steps (DDPM, DDIM), the reverse SDE (EulerMaruyama,
PredictorCorrector, AnnealedLangevin), the probability-flow ODE (EulerODE, HeunODE,
AdaptiveODE), EDM's stochastic sampler (EDMStochastic), DPM-Solver++(2M) (DPMSolverPP). Time
grids live in `grids`, noise sources (per-sample seeds) in `noise`.
"""

from diffusion_pl.sampling.api import SampleOutput, sample
from diffusion_pl.sampling.base import Sampler
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.sampling.edm import EDMStochastic
from diffusion_pl.sampling.grids import (ExplicitGrid, KarrasGrid, LogSNRGrid, QuadraticGrid, TimeGrid, TimestepGrid,
                                        UniformGrid)
from diffusion_pl.sampling.noise import GeneratorNoise, Noise, SeededNoise
from diffusion_pl.sampling.ode import AdaptiveODE, EulerODE, HeunODE
from diffusion_pl.sampling.posterior import DDIM, DDPM
from diffusion_pl.sampling.sde import AnnealedLangevin, EulerMaruyama, PredictorCorrector

__all__ = [
    "sample", "SampleOutput", "Sampler",
    "TimeGrid", "UniformGrid", "QuadraticGrid", "KarrasGrid", "LogSNRGrid", "ExplicitGrid", "TimestepGrid",
    "Noise", "GeneratorNoise", "SeededNoise",
    "DDPM", "DDIM", "EulerMaruyama", "PredictorCorrector", "AnnealedLangevin",
    "EulerODE", "HeunODE", "AdaptiveODE", "EDMStochastic", "DPMSolverPP",
]
