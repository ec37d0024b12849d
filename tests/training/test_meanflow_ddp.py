"""MeanFlow's JVP under DDP: 2 CPU ranks (gloo) give the gradient of one process on the same global batch.

torch.func.jvp runs on the bare network, outside DistributedDataParallel's forward. What keeps the all-reduce
is that the whole loss runs inside a DDP-wrapped module's forward, as Lightning's DDP strategy runs
DiffusionModule.training_step; calling the unwrapped network (the usual way to take a JVP of a DDP model) is
shown to skip it, so the comparison can fail.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.support.paths import REPO, repo_pythonpath
from tests.workers.meanflow_ddp import LossModule, global_batch, grads, make_net


@pytest.mark.slow
def test_two_rank_meanflow_gradient_equals_one_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_"))}
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    env.update({"PYTHONPATH": repo_pythonpath(), "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "workers" / "meanflow_ddp.py"), str(tmp_path)],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    net = make_net()
    LossModule(net)(*global_batch()).backward()
    single = grads(net)
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in range(2)]
    for saved in ranks:
        for name, grad in single.items():
            assert torch.allclose(saved["module"][name], grad, rtol=1e-4, atol=1e-6), name
    # the unwrapped network: each rank keeps its own half's gradient
    assert any(not torch.allclose(ranks[0]["bare"][k], ranks[1]["bare"][k]) for k in single)
