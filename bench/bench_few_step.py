"""Few-step generation on the 2-D mixture oracle: MeanFlow at 1, 2, 4 NFE against flow matching's ODE samplers,
and the training cost of MeanFlowLoss's JVP (not a test).

    python bench/bench_few_step.py [--steps 2000] [--n 20000] [--threads 1] [--skip-quality] [--skip-cost]

Quality: the same small MLP (tests/support/meanflow.py) trained with MeanFlowLoss and with DenoisingLoss flow
matching (rectified flow, velocity prediction, `--steps` Adam steps of 256 samples each), then sliced-Wasserstein-2
distance between `--n` samples and `--n` exact mixture samples: MeanFlow's sampler at 1, 2, 4 NFE, Euler,
DPM-Solver++(2M), UniPC-bh2 and Heun at 1, 2, 4, 10, 20 and 35 NFE for both models (the MeanFlow model read as a
velocity model), and the exact-vs-exact floor at that n. Heun takes 2 NFE a step: at odd NFE it runs one fewer
(the cell shows the NFE used).
Cost: CPU milliseconds per training step (loss, backward) of MeanFlowLoss relative to DenoisingLoss on that MLP
(batch 256) and on a tiny UNet and DiT with interval_embedding=True (batch 16 of 3x16x16), medians of --iters steps.
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

from diffusion_pl.networks.dit import DiT  # noqa: E402
from diffusion_pl.networks.unet import UNet  # noqa: E402
from diffusion_pl.prediction import VelocityPrediction, precondition  # noqa: E402
from diffusion_pl.processes.interpolants import RectifiedFlow  # noqa: E402
from diffusion_pl.sampling.meanflow import MeanFlow  # noqa: E402
from tests.support.meanflow import (IntervalMLP, MIXTURE, distance, floor, flow_matching_loss,  # noqa: E402
                                    meanflow_loss, ode_samplers, train)
from diffusion_pl.sampling.ode import HeunODE  # noqa: E402

NFES = (1, 2, 4, 10, 20, 35)


def samplers_at(nfe: int) -> dict:
    """name -> sampler with NFE = nfe (Heun: the largest even NFE not above it, absent at 1)."""
    out = {type(s).__name__: s for s in ode_samplers(nfe) if type(s).__name__ != "HeunODE"}
    if nfe >= 2:
        out["HeunODE"] = HeunODE(nfe // 2, final_denoise=False)
    return out


def quality(steps: int, n: int) -> None:
    t0 = time.perf_counter()
    meanflow, flow = train(meanflow_loss(), steps), train(flow_matching_loss(), steps)
    print(f"trained 2 x {steps} steps in {time.perf_counter() - t0:.0f} s; SW2 over {n} samples, "
          f"exact-vs-exact floor {floor(n):.4f}\n")
    print("| model | sampler | " + " | ".join(f"{k} NFE" for k in NFES) + " |")
    print("|---|---|" + "---|" * len(NFES))
    cells = [f"{distance(meanflow, MeanFlow(k), n):.4f}" if k <= 4 else "-" for k in NFES]
    print("| MeanFlow | MeanFlow | " + " | ".join(cells) + " |", flush=True)
    for label, model in (("flow matching", flow), ("MeanFlow as velocity", meanflow)):
        for name in ("EulerODE", "DPMSolverPP", "UniPC", "HeunODE"):
            cells = []
            for k in NFES:
                sampler = samplers_at(k).get(name)
                used = "" if sampler is None or name != "HeunODE" or k % 2 == 0 else f" ({k - 1})"
                cells.append("-" if sampler is None else f"{distance(model, sampler, n):.4f}{used}")
            print(f"| {label} | {name} | " + " | ".join(cells) + " |", flush=True)


def step_ms(model, loss_fn, x0: torch.Tensor, iters: int) -> float:
    """Median CPU ms of one loss + backward."""
    process, prediction = RectifiedFlow(), VelocityPrediction()
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(iters + 2):  # 2 warm-up steps (the first JVP loads torch's decompositions)
        c = time.process_time()
        loss_fn(model, x0, process, prediction, generator=g).loss.mean().backward()
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
    print("\n| network | DenoisingLoss ms/step | MeanFlowLoss ms/step | ratio |\n|---|---|---|---|")
    for name, (build, x0) in nets.items():
        torch.manual_seed(0)
        model = precondition(build(), RectifiedFlow(), VelocityPrediction())
        fm, mf = step_ms(model, flow_matching_loss(), x0, iters), step_ms(model, meanflow_loss(), x0, iters)
        print(f"| {name} | {fm:.1f} | {mf:.1f} | {mf / fm:.2f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000, help="training steps of each model")
    parser.add_argument("--n", type=int, default=20000, help="samples per distance")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--iters", type=int, default=20, help="timed training steps per network and loss")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-cost", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.skip_quality:
        quality(args.steps, args.n)
    if not args.skip_cost:
        cost(args.iters)


if __name__ == "__main__":
    main()
