"""Consistency training on the 2-D Gaussian-mixture oracle: SW2 at 1 and 2 steps against diffusion training.

A small MLP (tests/core/test_mixture_training.py's, EDM preconditioning with sigma_data 0.9 on EDM's process) is
trained for `--steps` Adam steps (batch 256, fresh mixture samples each step, lr 2e-3 cosine) three ways:

- diffusion: DenoisingLoss with EDM's log-normal proposal, sampled with the ODE samplers;
- consistency training from scratch: ConsistencyLoss (ECT's schedule, its stage every steps / 8 batches);
- ECT: the diffusion network tuned for `--tune_steps` more steps with ConsistencyLoss (q = 2, 4 stages).

Each is sampled with `Consistency(steps=1)` and `Consistency(steps=2)`; the diffusion network also with
DPMSolverPP (2 and 10 NFE) and HeunODE(steps=20) (39 NFE). SW2 of 20000 samples to 20000 fresh exact ones
(128 random directions), next to the exact-vs-exact floor and the exact consistency function's 1-step
samples (the PF-ODE integrated by scipy, GaussianMixture.consistency_function).

    PYTHONPATH=. python bench/bench_consistency.py --steps 1500 --tune_steps 1500
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from diffusion_pl.consistency import ConsistencyLoss, ECTSchedule
from diffusion_pl.losses import DenoisingLoss, LogNormalNoise, OutputMSE
from diffusion_pl.prediction import EDMPreconditioning, precondition
from diffusion_pl.processes.exploding import EDM
from diffusion_pl.sampling.api import sample
from diffusion_pl.sampling.consistency import Consistency
from diffusion_pl.sampling.dpm_solver import DPMSolverPP
from diffusion_pl.sampling.ode import HeunODE
from tests.core.test_mixture_training import MIXTURE, MLP, SIGMA_DATA, sliced_wasserstein

N = 20000
BATCH = 256


def fit(model, net, loss_fn, process, prediction, steps: int, seed: int) -> float:
    """Adam (lr 2e-3, cosine) for `steps` batches; returns the wall time in seconds."""
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for step in range(steps):
        x0 = MIXTURE.sample(BATCH, g).float()
        loss = loss_fn(model, x0, process, prediction, generator=g, images_seen=step * BATCH).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    return time.perf_counter() - start


def sw2(model, process, prediction, sampler) -> tuple[float, int]:
    out = sample(model, process, prediction, sampler, (N, 2), generator=torch.Generator().manual_seed(2))
    return sliced_wasserstein(out.x, MIXTURE.sample(N, torch.Generator().manual_seed(100))), out.nfe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--tune_steps", type=int, default=1500)
    parser.add_argument("--exact", action="store_true", help="also the exact consistency function (slow: the ODE)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    process, prediction = EDM(), EDMPreconditioning(sigma_data=SIGMA_DATA)
    floor = sliced_wasserstein(MIXTURE.sample(N, torch.Generator().manual_seed(7)),
                               MIXTURE.sample(N, torch.Generator().manual_seed(100)))
    print(f"exact-vs-exact floor: {floor:.4f}")
    if args.exact:
        z = process.prior_std() * torch.randn(N, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        x = MIXTURE.consistency_function(z, process.t_max, process, rtol=1e-8, atol=1e-8)
        exact = sliced_wasserstein(x, MIXTURE.sample(N, torch.Generator().manual_seed(100)))
        print(f"exact consistency function, 1 step: {exact:.4f}")

    def new_net():
        torch.manual_seed(0)
        net = MLP()
        return net, precondition(net, process, prediction)

    results = {}
    net, diffusion = new_net()
    seconds = fit(diffusion, net, DenoisingLoss(LogNormalNoise(), OutputMSE()), process, prediction, args.steps, 1)
    diffusion.eval()
    for name, sampler in [("Consistency(1)", Consistency(1)), ("Consistency(2)", Consistency(2)),
                          ("DPMSolverPP(2)", DPMSolverPP(steps=2)), ("DPMSolverPP(10)", DPMSolverPP(steps=10)),
                          ("HeunODE(20)", HeunODE(steps=20))]:
        results[("diffusion", name)] = sw2(diffusion, process, prediction, sampler)
    print(f"diffusion: {args.steps} steps in {seconds:.0f} s")

    schedule = ECTSchedule(q=2.0, images_per_stage=max(1, args.steps * BATCH // 8))
    net_ct, ct = new_net()
    seconds = fit(ct, net_ct, ConsistencyLoss(schedule=schedule), process, prediction, args.steps, 1)
    ct.eval()
    print(f"consistency training from scratch: {args.steps} steps in {seconds:.0f} s")

    net_ect = copy.deepcopy(net)
    ect = precondition(net_ect, process, prediction)
    ect.train()
    tune = ECTSchedule(q=2.0, images_per_stage=max(1, args.tune_steps * BATCH // 4))
    seconds = fit(ect, net_ect, ConsistencyLoss(schedule=tune), process, prediction, args.tune_steps, 3)
    ect.eval()
    print(f"ECT (tuned from diffusion): {args.tune_steps} more steps in {seconds:.0f} s")
    for label, model in [("CT scratch", ct), ("ECT tuned", ect)]:
        for name, sampler in [("Consistency(1)", Consistency(1)), ("Consistency(2)", Consistency(2))]:
            results[(label, name)] = sw2(model, process, prediction, sampler)
    print("\n| model | sampler | NFE | SW2 |\n|---|---|---|---|")
    for (label, name), (value, nfe) in results.items():
        print(f"| {label} | {name} | {nfe} | {value:.4f} |")


if __name__ == "__main__":
    main()
