"""sCT on the 2-D mixture: a small MLP trained with SCMLoss generates in one step (`pytest -s` prints the numbers
docs/guide/few_step.md quotes; bench/bench_few_step.py --objective scm tabulates more samplers and NFE)."""

from __future__ import annotations

import pytest
import torch

from diffusion_pl.prediction import VPrediction, precondition
from diffusion_pl.processes.interpolants import Trigonometric
from diffusion_pl.sampling.consistency import Consistency
from diffusion_pl.scm import SCMLoss
from tests.support.meanflow import TimeMLP, distance, floor, train

N_SAMPLES = 10000  # samples compared by SW2 (as the MeanFlow training test)

STEPS = 2000


@pytest.mark.slow
def test_sct_mlp_generates_in_one_step():
    process, prediction = Trigonometric(), VPrediction()
    torch.manual_seed(0)
    before = distance(precondition(TimeMLP(), process, prediction), Consistency(1), N_SAMPLES, process, prediction)
    model = train(SCMLoss(warmup_steps=STEPS // 4), STEPS, net=TimeMLP, process=process, prediction=prediction)
    after = distance(model, Consistency(1), N_SAMPLES, process, prediction)
    print(f"SW2 at 1 step: untrained {before:.4f}, after {STEPS} sCT steps {after:.4f}; "
          f"exact-vs-exact {floor(N_SAMPLES):.4f}")
    assert after < 0.2 * before and after < 0.15, (before, after)
