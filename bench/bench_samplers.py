"""Sampler benchmark on the analytic oracle: sliced-Wasserstein error against NFE, and wall time per NFE.

    python bench/bench_samplers.py [--n 4000] [--dim 64] [--threads 1]

Data: a 3-component Gaussian mixture in 64 dimensions (`GaussianMixture.random(3, 64, seed=3,
spread=0.5, std_range=(0.1, 0.2))`), whose exact network (the oracle, eps-prediction) drives every
sampler, ours and diffusers'. Process: DDPMDiscrete (1000 linear betas 1e-4..0.02), diffusers'
default schedule, so that diffusers' DDIMScheduler and DPMSolverMultistepScheduler run on the same
process; our samplers use their default grids on it. Error: sliced Wasserstein-2 distance
(256 random directions) between n generated samples and 20 n exact samples, all samplers starting
from the same x_T. Each of our samplers is run at the largest number of steps whose NFE is at
most the column's NFE (the cell shows the NFE used when it differs); AdaptiveODE's row uses rtol =
atol in {1e-2, 1e-3, 1e-4, 1e-5} (its NFE in the cell). ms/NFE is the median wall time per
network evaluation, oracle included. A second table runs the few-step multistep solvers on four
grids at 5, 10, 20 and 100 NFE, with the ratio of its 10-NFE error to the sampler's 1000-NFE error in
the first table (the converged error). `--rows` runs only the named rows of the first table (and then
neither AdaptiveODE nor diffusers' schedulers). `--sweep` runs instead only the settings table of the
third-order question: DPM-Solver++ 3M (published and `exact_quadratic` weights) and UniPC orders 2 and 3
(bh1, bh2), each with `lower_order_final` on and off, on log-SNR grids whose ramp starts at noise level
80 (the default: one step from t_max ~ 157 down to 80 first), at t_max itself (no separate first step) or
at 20 (a longer first step), at 5, 10 and 20 NFE, against DPMSolverPP's 1000-NFE error on the default grid.
`--paired` runs instead the low-noise measure of paired_error.py at `--paired_nfe` (default 10): common random
numbers per seed, the ratio to the converged error as mean +- standard error over seeds, and the pathwise
distance to the ODE solution from the same x_T; candidates are chosen on `--select_seeds` and measured again on
`--confirm_seeds`. `--check_reference` compares that module's converged reference with a DOP853 solve.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from functools import partial

import torch

from diffusion_pl.oracle import GaussianMixture
from diffusion_pl.prediction import EpsPrediction
from diffusion_pl.processes.variance_preserving import DDPMDiscrete
from diffusion_pl.sampling.posterior import DDIM, DDPM
from diffusion_pl.sampling.ode import AdaptiveODE, EulerODE, HeunODE
from diffusion_pl.sampling.sde import AnnealedLangevin, EulerMaruyama, PredictorCorrector
from diffusion_pl.sampling.dpm_solver import DPMSolverPP, DPMSolverPPSDE
from diffusion_pl.sampling.edm import EDMStochastic
from diffusion_pl.sampling.grids import KarrasGrid, LogSNRGrid, TimestepGrid, UniformGrid
from diffusion_pl.sampling.unipc import UniPC
from diffusion_pl.sampling.api import sample
from paired_error import check_reference, search

NFES = [5, 10, 20, 35, 50, 100, 1000]
SAMPLERS = {cls.__name__: cls for cls in [DDIM, DDPM, EulerMaruyama, PredictorCorrector, AnnealedLangevin, EulerODE,
                                          HeunODE, EDMStochastic, DPMSolverPP]}
SAMPLERS.update({"DPMSolverPP order 3": partial(DPMSolverPP, order=3), "DPMSolverPPSDE": DPMSolverPPSDE,
                 "DPMSolverPPSDE order 3": partial(DPMSolverPPSDE, order=3), "UniPC order 2": partial(UniPC, order=2),
                 "UniPC": UniPC})
# the few-step solvers on the grids their papers use: log-SNR uniform (DPM-Solver), uniform in t (UniPC's
# "time_uniform"), EDM's rho = 7 ramp, and diffusers' integer timesteps ('linspace')
GRID_NFES = [5, 10, 20, 100]
GRID_SAMPLERS = ["DPMSolverPP", "DPMSolverPP order 3", "UniPC order 2", "UniPC"]
GRIDS = {"logSNR": LogSNRGrid(), "time-uniform": UniformGrid(), "Karras rho=7": KarrasGrid(7.0),
         "diffusers timesteps": TimestepGrid()}
RTOLS = [1e-2, 1e-3, 1e-4, 1e-5]
SWEEP_NFES = [5, 10, 20]
SWEEP_SOLVERS = {"DPMSolverPP 2M": partial(DPMSolverPP, order=2),
                 "DPMSolverPP 3M": partial(DPMSolverPP, order=3),
                 "DPMSolverPP 3M exact_quadratic": partial(DPMSolverPP, order=3, exact_quadratic=True),
                 **{f"UniPC order {k} {v}": partial(UniPC, order=k, variant=v) for k in (2, 3) for v in ("bh2", "bh1")}}
SWEEP_GRIDS = {"logSNR from 80": LogSNRGrid(), "logSNR from t_max": LogSNRGrid(1e4), "logSNR from 20": LogSNRGrid(20.0)}


class SlicedW2:
    """SW2 to a large reference sample along fixed unit directions: the reference's quantiles at x's levels."""

    def __init__(self, ref: torch.Tensor, num_directions: int = 256, seed: int = 2) -> None:
        g = torch.Generator().manual_seed(seed)
        self.directions = torch.randn(ref.shape[1], num_directions, generator=g, dtype=torch.float64)
        self.directions /= self.directions.norm(dim=0)
        self.ref = (ref.double() @ self.directions).sort(0).values  # (m, P), sorted once

    def __call__(self, x: torch.Tensor) -> float:
        px = (x.double() @ self.directions).sort(0).values  # (n, P)
        levels = ((torch.arange(len(x), dtype=torch.float64) + 0.5) / len(x) * len(self.ref)).long()
        return float(((px - self.ref[levels]) ** 2).mean().sqrt())


def keep_freed_memory() -> None:
    """Stop glibc from returning freed blocks to the OS after every call.

    The oracle's float64 temporaries are several MB; by default glibc unmaps them when freed, so
    every network evaluation page-faults them in again (measured: 46 ms -> 13 ms per oracle call
    at n = 4000, most of it system time). Linux/glibc only; elsewhere a no-op.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
    libc.mallopt(m_trim_threshold, 1 << 30)
    libc.mallopt(m_mmap_threshold, 1 << 25)


def nfe_law(sampler_cls, model, process, pred, dim) -> tuple[int, int]:
    """NFE = a * steps + b, read off two one-sample runs."""
    n1, n2 = (sample(model, process, pred, sampler_cls(steps=s), (1, dim)).nfe for s in (1, 2))
    return n2 - n1, 2 * n1 - n2


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def diffusers_run(scheduler, eps_model, x_T, nfe):
    scheduler.set_timesteps(nfe)
    x = x_T * scheduler.init_noise_sigma
    for k in scheduler.timesteps:
        x = scheduler.step(eps_model(x, k), k, x).prev_sample
    return x


def sweep(model, process, pred, sliced_w2, x_T, args) -> None:
    """The few-step solvers over weights, orders, lower_order_final and the grid's start (see the docstring)."""
    def run(make, nfe):  # all of these solvers take NFE = steps + 1
        return sliced_w2(sample(model, process, pred, make(steps=nfe - 1), (args.n, args.dim), noise=x_T).x)

    converged = run(DPMSolverPP, 1000)
    print(f"\nconverged error (DPMSolverPP, 1000 NFE, default grid): {converged:.4f}, n = {args.n}\n")
    print("| solver | grid | lower_order_final | " + " | ".join(f"NFE {n}" for n in SWEEP_NFES)
          + " | NFE 10 / converged |")
    print("|" + "---|" * (len(SWEEP_NFES) + 4))
    for name, make in SWEEP_SOLVERS.items():
        for grid_name, grid in SWEEP_GRIDS.items():
            for lof in (True, False) if "2M" not in name else (True,):  # lower_order_final keeps 2M at 2
                cells = [run(partial(make, grid=grid, lower_order_final=lof), nfe) for nfe in SWEEP_NFES]
                print(f"| {name} | {grid_name} | {lof} | " + " | ".join(f"{e:.4f}" for e in cells)
                      + f" | {cells[1] / converged:.2f}x |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", nargs="+", choices=sorted(SAMPLERS), help="only these rows of the first table")
    parser.add_argument("--sweep", action="store_true", help="only the settings table of the few-step solvers")
    parser.add_argument("--paired", action="store_true",
                        help="only the paired (common random numbers, several seeds) search of the few-step solvers")
    parser.add_argument("--paired_nfe", type=int, default=10)
    parser.add_argument("--select_seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--confirm_seeds", type=int, nargs="+", default=list(range(100, 116)))
    parser.add_argument("--check_reference", action="store_true",
                        help="only compare the paired search's converged reference with a DOP853 solve (seed 0)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()

    mix = GaussianMixture.random(3, args.dim, seed=3, spread=0.5, std_range=(0.1, 0.2))
    process, pred = DDPMDiscrete(1000, 1e-4, 0.02), EpsPrediction()
    model = mix.model(process, pred)
    if args.check_reference or args.paired:
        start = time.perf_counter()
        if args.check_reference:
            check_reference(mix, process, 0, args.n)
        else:
            search(model, process, pred, mix, args.paired_nfe, args.select_seeds, args.confirm_seeds, args.n, SlicedW2)
        print(f"runtime {time.perf_counter() - start:.0f} s")
        return
    sliced_w2 = SlicedW2(mix.sample(20 * args.n, torch.Generator().manual_seed(1)))
    x_T = torch.randn(args.n, args.dim, generator=torch.Generator().manual_seed(0))
    floors = [sliced_w2(mix.sample(args.n, torch.Generator().manual_seed(10 + k)).float()) for k in range(5)]
    floor = sum(floors) / len(floors)
    start = time.perf_counter()
    if args.sweep:
        sweep(model, process, pred, sliced_w2, x_T, args)
        print(f"runtime {time.perf_counter() - start:.0f} s")
        return

    rows: dict[str, dict[int, tuple[float, int]]] = {}
    ms_per_nfe: dict[str, float] = {}
    for name, cls in SAMPLERS.items():
        if args.rows and name not in args.rows:
            continue
        a, b = nfe_law(cls, model, process, pred, args.dim)
        cells, times = {}, []
        for target in NFES:
            steps = (target - b) // a
            if steps < 1:
                continue
            out, dt = timed(lambda: sample(model, process, pred, cls(steps=steps), (args.n, args.dim), noise=x_T,
                                           generator=torch.Generator().manual_seed(4)))
            cells[target] = (sliced_w2(out.x), out.nfe)
            times.append(dt / out.nfe)
        rows[name], ms_per_nfe[name] = cells, 1e3 * sorted(times)[len(times) // 2]
        print(f"  done {name}", flush=True)
    cells, times = {}, []
    for rtol in RTOLS if not args.rows else []:
        out, dt = timed(lambda: sample(model, process, pred, AdaptiveODE(rtol=rtol, atol=rtol), (args.n, args.dim),
                                       noise=x_T))
        cells[f"rtol {rtol:g}"] = (sliced_w2(out.x), out.nfe)
        times.append(dt / out.nfe)
    adaptive = cells
    ms_per_nfe["AdaptiveODE"] = 1e3 * sorted(times)[len(times) // 2] if times else float("nan")

    try:
        import diffusers
    except ImportError:
        diffusers = None
    diffusers = None if args.rows else diffusers
    if diffusers is not None:
        def eps_model(x, k):  # diffusers' integer timestep k is the process time (k + 1) / 1000
            return model(x, torch.full((len(x),), (int(k) + 1) / 1000.0), None)

        betas = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
        for name, make in [
            ("diffusers DDIMScheduler", lambda: diffusers.DDIMScheduler(**betas, clip_sample=False, set_alpha_to_one=True)),
            ("diffusers DPMSolverMultistep", lambda: diffusers.DPMSolverMultistepScheduler(**betas)),
        ]:
            cells, times = {}, []
            for target in NFES:
                x, dt = timed(lambda: diffusers_run(make(), eps_model, x_T, target))
                cells[target] = (sliced_w2(x), target)
                times.append(dt / target)
            rows[name], ms_per_nfe[name] = cells, 1e3 * sorted(times)[len(times) // 2]

    print(f"\nGaussian-mixture oracle ({args.dim}-D, 3 components), DDPMDiscrete, n = {args.n}; SW2 to data "
          f"(exact n-sample floor {floor:.4f}, mean of 5 draws); cell = SW2 [NFE used if not the column's]\n")
    header = "| sampler | " + " | ".join(f"NFE {n}" for n in NFES) + " | ms/NFE |"
    print(header)
    print("|" + "---|" * (len(NFES) + 2))
    for name, cells in rows.items():
        entries = []
        for target in NFES:
            if target not in cells:
                entries.append("-")
            else:
                err, used = cells[target]
                entries.append(f"{err:.4f}" + ("" if used == target else f" [{used}]"))
        print(f"| {name} | " + " | ".join(entries) + f" | {ms_per_nfe[name]:.1f} |")
    if adaptive:
        print("| AdaptiveODE | " + " | ".join(f"{k}: {e:.4f} [{n}]" for k, (e, n) in adaptive.items())
              + " | | | " + f"{ms_per_nfe['AdaptiveODE']:.1f} |")

    # the targets: per sampler, the smallest NFE from which on every column stays within 1.1x of its
    # 1000-NFE error (a single column can dip below by chance: n samples carry their own noise)
    reach = {}
    for name, cells in rows.items():
        if 1000 not in cells or not cells[1000][0] == cells[1000][0]:  # missing or nan
            continue
        within = [t for t in NFES if t in cells and cells[t][0] <= 1.1 * cells[1000][0]]
        settled = [t for t in within if all(u in within for u in NFES if u >= t and u in cells)]
        if settled:
            reach[name] = cells[min(settled)][1]
    print("\nNFE from which the error stays within 1.1x of the 1000-NFE error:",
          ", ".join(f"{k} {v}" for k, v in sorted(reach.items(), key=lambda kv: kv[1])))
    ours_reach = {k: v for k, v in reach.items() if not k.startswith("diffusers") and v <= 35}
    best = min(ours_reach.items(), key=lambda kv: kv[1]) if ours_reach else None
    print("target (best sampler within 1.1x of its 1000-step error at <= 35 NFE):",
          f"met by {best[0]} at NFE {best[1]}" if best else "not met")
    if diffusers is not None and "DPMSolverPP" in rows:
        ours_dpm, theirs = rows["DPMSolverPP"].get(10), rows["diffusers DPMSolverMultistep"][10]
        print(f"target (DPM-Solver++ at 10 NFE no worse than diffusers'): ours {ours_dpm[0]:.4f} vs diffusers "
              f"{theirs[0]:.4f}: {'met' if ours_dpm[0] <= theirs[0] else 'not met'}")
    grid_rows = {}
    for name in [name for name in GRID_SAMPLERS if name in rows]:
        for grid_name, grid in GRIDS.items():  # all of these solvers take NFE = steps + 1
            cells = [sliced_w2(sample(model, process, pred, SAMPLERS[name](steps=nfe - 1, grid=grid),
                                      (args.n, args.dim), noise=x_T).x) for nfe in GRID_NFES]
            grid_rows[f"{name}, {grid_name}"] = cells
    print("\n| sampler, grid | " + " | ".join(f"NFE {n}" for n in GRID_NFES) + " | NFE 10 / converged |")
    print("|" + "---|" * (len(GRID_NFES) + 2))
    for name, cells in grid_rows.items():
        converged = rows.get(name.split(",")[0], {}).get(1000, (float("nan"),))[0]
        print(f"| {name} | " + " | ".join(f"{e:.4f}" for e in cells) + f" | {cells[1] / converged:.2f}x |")
    print(f"runtime {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
