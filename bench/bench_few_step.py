"""Few-step generation on the 2-D mixture oracle: MeanFlow and sCM at 1, 2, 4 NFE against a diffusion model's ODE
samplers at equal training steps, and the training cost of each few-step objective (not a test).

    python bench/bench_few_step.py [--objectives meanflow scm] [--steps 2000] [--n 20000] [--threads 1]
                                   [--skip-quality] [--skip-cost]

Quality: a small MLP (tests/support/meanflow.py) trained with the few-step objective and the same MLP trained as a
diffusion model on the same process (`--steps` Adam steps of 256 samples each), then sliced-Wasserstein-2
distance between `--n` samples and `--n` exact mixture samples: the objective's sampler at 1, 2, 4 NFE, Euler,
DPM-Solver++(2M), UniPC-bh2 and Heun at 1, 2, 4, 10, 20 and 35 NFE for the diffusion model (and for a MeanFlow
model read as a velocity model), and the exact-vs-exact floor at that n. Heun takes 2 NFE a step: at odd NFE it
runs one fewer (the cell shows the NFE used).
- meanflow: MeanFlowLoss against flow matching (rectified flow, velocity prediction), MeanFlow's sampler.
- scm: SCMLoss (warm-up over the first quarter of the steps, adaptive weight) against DenoisingLoss with
  logit-normal times (TrigFlow, v-prediction), the Consistency sampler (re-noising on its default grid).
Cost: CPU milliseconds per training step (loss, backward) of MeanFlowLoss (rectified flow, velocity), SCMLoss
(TrigFlow, v) and ECT's ConsistencyLoss (EDM, EDM preconditioning) relative to DenoisingLoss (rectified flow,
velocity) on the MLP (batch 256) and on a tiny UNet and DiT with interval_embedding=True (batch 16 of 3x16x16),
medians of --iters steps.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the training helper is the test's (tests/support/meanflow.py)

from diffusion_pl.consistency import ConsistencyLoss  # noqa: E402
from diffusion_pl.networks.dit import DiT  # noqa: E402
from diffusion_pl.networks.unet import UNet  # noqa: E402
from diffusion_pl.prediction import EDMPreconditioning, VelocityPrediction, VPrediction, precondition  # noqa: E402
from diffusion_pl.processes.exploding import EDM  # noqa: E402
from diffusion_pl.processes.interpolants import RectifiedFlow, Trigonometric  # noqa: E402
from diffusion_pl.sampling.consistency import Consistency  # noqa: E402
from diffusion_pl.sampling.meanflow import MeanFlow  # noqa: E402
from diffusion_pl.sampling.ode import HeunODE  # noqa: E402
from diffusion_pl.scm import SCMLoss  # noqa: E402
from tests.support.meanflow import (IntervalMLP, MIXTURE, TimeMLP, distance, floor,  # noqa: E402
                                    flow_matching_loss, meanflow_loss, ode_samplers, train)

NFES = (1, 2, 4, 10, 20, 35)


def samplers_at(nfe: int) -> dict:
    """name -> sampler with NFE = nfe (Heun: the largest even NFE not above it, absent at 1)."""
    out = {type(s).__name__: s for s in ode_samplers(nfe) if type(s).__name__ != "HeunODE"}
    if nfe >= 2:
        out["HeunODE"] = HeunODE(nfe // 2, final_denoise=False)
    return out


def table(n: int, process, prediction, few_step: tuple, baselines: tuple) -> None:
    """Print the SW2 table: `few_step` = (label, model, sampler of k NFE), `baselines` = ((label, model), ...)."""
    label, model, sampler_of = few_step
    print(f"SW2 over {n} samples, exact-vs-exact floor {floor(n):.4f}\n")
    print("| model | sampler | " + " | ".join(f"{k} NFE" for k in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    cells = [f"{distance(model, sampler_of(k), n, process, prediction):.4f}" if k <= 4 else "-" for k in NFES]
    print(f"| {label} | {type(sampler_of(1)).__name__} | " + " | ".join(cells) + " |", flush=True)
    for label, model in baselines:
        for name in ("EulerODE", "DPMSolverPP", "UniPC", "HeunODE"):
            cells = []
            for k in NFES:
                sampler = samplers_at(k).get(name)
                used = "" if sampler is None or name != "HeunODE" or k % 2 == 0 else f" ({k - 1})"
                value = None if sampler is None else distance(model, sampler, n, process, prediction)
                cells.append("-" if value is None else f"{value:.4f}{used}")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)


def quality_meanflow(steps: int, n: int) -> None:
    t0 = time.perf_counter()
    meanflow, flow = train(meanflow_loss(), steps), train(flow_matching_loss(), steps)
    print(f"\nMeanFlow: trained 2 x {steps} steps in {time.perf_counter() - t0:.0f} s; ", end="")
    table(n, RectifiedFlow(), VelocityPrediction(), ("MeanFlow", meanflow, MeanFlow),
          (("flow matching", flow), ("MeanFlow as velocity", meanflow)))


def quality_scm(steps: int, n: int) -> None:
    process, prediction = Trigonometric(), VPrediction()
    t0 = time.perf_counter()
    scm = train(SCMLoss(warmup_steps=steps // 4), steps, net=TimeMLP, process=process, prediction=prediction)
    diffusion = train(flow_matching_loss(), steps, net=TimeMLP, process=process, prediction=prediction)
    print(f"\nsCM: trained 2 x {steps} steps in {time.perf_counter() - t0:.0f} s; ", end="")
    table(n, process, prediction, ("sCM", scm, Consistency), (("diffusion (TrigFlow, v)", diffusion),))


def step_ms(model, loss_fn, x0: torch.Tensor, iters: int, process, prediction) -> float:
    """Median CPU ms of one loss + backward."""
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(iters + 2):  # 2 warm-up steps (the first JVP loads torch's decompositions)
        extra = {"step": i} if getattr(loss_fn, "takes_step", False) else {}
        c = time.process_time()
        loss_fn(model, x0, process, prediction, generator=g, **extra).loss.mean().backward()
        if i >= 2:
            times.append(1000 * (time.process_time() - c))
    return statistics.median(times)


def cost(iters: int) -> None:
    nets = {
        "MLP (2-D, batch 256)": (lambda: IntervalMLP(), MIXTURE.sample(256, torch.Generator().manual_seed(0)).float()),
        "UNet (3x16x16, ch 32, batch 16)": (lambda: UNet(img_resolution=16, in_channels=3, model_channels=32,
                                                         channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                                                         dropout=0.0, interval_embedding=True),
                                            torch.randn(16, 3, 16, 16)),
        "DiT (3x16x16, patch 2, width 64, depth 4, batch 16)": (
            lambda: DiT(img_resolution=16, in_channels=3, patch_size=2, hidden_size=64, depth=4, num_heads=4,
                        interval_embedding=True), torch.randn(16, 3, 16, 16)),
    }
    objectives = {  # name -> (loss, process, prediction); DenoisingLoss first, the denominator
        "DenoisingLoss": (flow_matching_loss, RectifiedFlow(), VelocityPrediction()),
        "MeanFlowLoss": (meanflow_loss, RectifiedFlow(), VelocityPrediction()),
        "SCMLoss": (lambda: SCMLoss(warmup_steps=0), Trigonometric(), VPrediction()),
        "ConsistencyLoss": (ConsistencyLoss, EDM(), EDMPreconditioning()),
    }
    names = list(objectives)
    print("\n| network | " + " | ".join(f"{k} ms/step" for k in names) + " | "
          + " | ".join(f"{k} / DenoisingLoss" for k in names[1:]) + " |")
    print("|---|" + "---|" * (2 * len(names) - 1))
    for name, (build, x0) in nets.items():
        ms = []
        for make_loss, process, prediction in objectives.values():
            torch.manual_seed(0)
            model = precondition(build(), process, prediction)
            ms.append(step_ms(model, make_loss(), x0, iters, process, prediction))
        print(f"| {name} | " + " | ".join(f"{m:.1f}" for m in ms) + " | "
              + " | ".join(f"{m / ms[0]:.2f}" for m in ms[1:]) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objectives", nargs="+", choices=("meanflow", "scm"), default=["meanflow", "scm"],
                        help="the few-step objectives whose quality table is printed")
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each model")
    parser.add_argument("--n", type=int, default=20000, help="samples per distance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="timed training steps per network and loss")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_quality:
        for objective in args.objectives:
            {"meanflow": quality_meanflow, "scm": quality_scm}[objective](args.steps, args.n)
    if not args.skip_cost:
        cost(args.iters)


if __name__ == "__main__":
    main()
