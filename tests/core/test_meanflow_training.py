"""MeanFlow on the 2-D mixture: a small MLP trained with MeanFlowLoss generates in one and two steps better than
the same MLP trained for flow matching (DenoisingLoss, velocity, same steps) sampled with the best ODE sampler at
the same NFE (Euler, DPM-Solver++, UniPC, Heun). docs/guide/few_step.md has the numbers; bench/bench_few_step.py
tabulates more NFE.
"""

from __future__ import annotations

import pytest

from diffusion_pl.sampling.meanflow import MeanFlow
from tests.support.meanflow import distance, floor, flow_matching_loss, meanflow_loss, ode_samplers, train

N_SAMPLES = 10000
STEPS = 2000


@pytest.mark.slow
def test_meanflow_mlp_generates_in_one_and_two_steps():
    meanflow, flow = train(meanflow_loss(), STEPS), train(flow_matching_loss(), STEPS)
    mf = {n: distance(meanflow, MeanFlow(n), N_SAMPLES) for n in (1, 2)}
    fm = {n: min(distance(flow, s, N_SAMPLES) for s in ode_samplers(n)) for n in (1, 2)}
    print(f"SW2: exact-vs-exact {floor(N_SAMPLES):.4f}; MeanFlow 1-step {mf[1]:.4f}, 2-step {mf[2]:.4f}; "
          f"flow matching best ODE 1-NFE {fm[1]:.4f}, 2-NFE {fm[2]:.4f}")
    assert mf[1] < 0.8 * fm[1] and mf[2] < 0.5 * fm[2], (mf, fm)
    assert mf[2] < 0.15, mf
