"""Samplers for every process and parameterization, behind one entry point `api.sample`.

    out = sample(model, process, prediction, sampler, shape, seeds=..., guidance=..., progress=...)
    out.x, out.nfe

Families (one file each): posterior steps (posterior.py: DDPM, DDIM), the reverse SDE (sde.py:
EulerMaruyama, PredictorCorrector, AnnealedLangevin), the probability-flow ODE (ode.py: EulerODE,
HeunODE, AdaptiveODE), EDM's stochastic sampler (edm.py: EDMStochastic), DPM-Solver++ 2M / 3M and
its SDE variant (dpm_solver.py: DPMSolverPP, DPMSolverPPSDE), UniPC (unipc.py: UniPC). The base class
is in base.py, time grids in grids.py, noise sources (per-sample seeds) in noise.py. The package root re-exports the public ones (`diffusion_pl.HeunODE`).
"""
