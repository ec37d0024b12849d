"""Every benchmark script under bench/ imports (the package moves under them; a script that no longer imports is a
benchmark nobody can rerun). Running them is for their users; the benchmark with a toy mode has its own test."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(BENCH.glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_bench_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the scripts import their siblings (bench_module) as when run
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}_under_test", script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)  # top level only: each script runs under `if __name__ == "__main__"`
    if script.name.startswith("bench_"):  # a script; other files are modules the scripts share (train_floor.py)
        assert callable(getattr(module, "main", None)), f"{script.name} has no main()"


def test_paired_sampler_reference_is_the_exact_ode_solution(monkeypatch):
    """bench_samplers --paired divides every error by that of its converged reference and measures each sample's
    distance to it: the reference must be the probability-flow ODE solution from the same x_T, to far below the
    10-NFE errors (1e-2 and more) it is compared with."""
    import torch

    from diffusion_pl.oracle import GaussianMixture
    from diffusion_pl.processes.variance_preserving import DDPMDiscrete

    monkeypatch.syspath_prepend(str(BENCH))
    import paired_error

    mix = GaussianMixture.random(3, 8, seed=0, spread=1.0, std_range=(0.1, 0.2))
    z = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    fast, exact = paired_error.reference_flow(mix, DDPMDiscrete(), z), paired_error.exact_flow(mix, DDPMDiscrete(), z)
    for a, b in zip(fast, exact):  # x at t_min, then its final denoise
        assert float((a - b).norm(dim=1).max()) < 1e-4
    assert float((fast[0] - fast[1]).norm(dim=1).mean()) > 1e-3  # the two ends differ: both are checked


@pytest.mark.slow
def test_few_step_bench_tabulates_each_objective(monkeypatch, capsys):
    """bench_few_step prints, for MeanFlow and sCM, the few-step row beside the diffusion baseline's samplers, and the
    training cost of every few-step objective relative to DenoisingLoss (a tiny run: 5 steps, 200 samples)."""
    monkeypatch.syspath_prepend(str(BENCH))
    monkeypatch.setattr(sys, "argv", ["bench_few_step.py", "--steps", "5", "--n", "200", "--iters", "1"])
    import bench_few_step

    bench_few_step.main()
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    for label in ("| MeanFlow | MeanFlow |", "| flow matching | UniPC |", "| sCM | Consistency |",
                  "| diffusion (TrigFlow, v) | DPMSolverPP |"):
        assert any(r.startswith(label) for r in rows), (label, out)
    cost = [r for r in rows if r.startswith(("| MLP", "| UNet", "| DiT"))]
    assert len(cost) == 3 and all(len(r.strip("| ").split(" | ")) == 8 for r in cost), cost
